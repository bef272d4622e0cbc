"""The Decoupled SOLO head (Wang et al., "SOLO: Segmenting Objects by Locations", ECCV 2020,
sec. 3.4): the S^2 mask channels of a level are replaced by two sets of S channels, X and Y, and
the mask of grid cell (i, j) (row i, column j) is sigmoid(X_j) * sigmoid(Y_i).

`DecoupledSOLOHead` keeps `SOLOHead`'s interface (it subclasses it: constructor, `target`,
targets, `FocalLoss`, `DiceLoss`, `points_nms`, `MatrixNMS`, `PlotGT`, `PlotInfer` are SOLO's),
so `model.py`, training and inference use it unchanged:

    lvl_cate_preds, lvl_x_preds, lvl_y_preds = head(backbone(images))        # logits
    losses = head.loss(preds, boxes_list, labels_list, masks_list)           # total, cate, mask
    results = head.PostProcess(head(backbone(images), eval=True), metas)     # masks/labels/scores

Following the authors (WXinlong/SOLO decoupled_solo_head.py and decoupled_solo_light_head.py):
- The category branch is SOLO's (the level feature resized to S x S, tower, conv3x3 to C).
- Decoupled SOLO: two mask towers, X with the level feature plus the x coordinate channel only,
  Y with the y coordinate channel only (DecoupledSOLOHead's ins_convs_x / ins_convs_y); each
  upsampled x2 and closed by a conv3x3 to S channels per level, bias at the prior -log(99).
  The light variant (`shared_xy_tower=True`, DecoupledSOLOLightHead) has one mask tower with
  both coordinate channels and the two conv3x3 outputs on it.
- Targets are SOLO's (`solo_head.target_single_img`, masks at 2Hf x 2Wf of each level); the loss
  is the dice of sigmoid(X_j) * sigmoid(Y_i) for the positive cells only (gathered rows, never the
  S^2 products); the category loss as SOLO.
- Post-processing as the authors' get_seg_single, through `postprocess.finish_single`: X and Y
  are sigmoid-ed and resized to H/4 x W/4 per level in `forward(eval=True)`, masks are built for
  the candidate cells only, then SOLO's steps (score > 0.1, binarise 0.5, drop masks not larger
  than the stride, maskness, top 500, Matrix NMS, keep >= 0.05, top 100).

As in `SOLOHead`, the network returns LOGITS in training; eval=True returns probabilities.

Shape legend: B batch, L pyramid levels (5), S grid size of a level, C classes without
background, H x W padded input, D tower width, F FPN channels, Hf_l x Wf_l level l's feature size
after NewFPN, h_l x w_l = 2Hf_l x 2Wf_l its mask size, h4 x w4 = H/4 x W/4, K positive (or
candidate) cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from solo_head import (
    EPSILON,
    NUM_GRIDS,
    PRIOR_PROB,
    SCALE_RANGES,
    STRIDES,
    SOLOHead,
    _conv_gn_relu,
    cell_levels,
    coord_channels,
    dice_loss,
)
from solov2_head import (
    CATE_THRESH,
    KEEP_INSTANCE,
    PRE_NMS_NUM,
    UPDATE_THRESH,
    category_loss,
    check_labels,
)

# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, c, h, w) to (B, c, *size)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def decoupled_masks(x_probs: Tensor, y_probs: Tensor, img_idx: Tensor, cell_idx: Tensor) -> Tensor:
    """Masks of the requested cells: cell k = i*S + j of image b is x_probs[b, j] * y_probs[b, i].

    Args:
        x_probs, y_probs: (B, S, h, w) probabilities of one level.
        img_idx, cell_idx: (K,) int64 image and cell (row-major in the S x S grid) per request.
    Returns:
        (K, h, w) soft masks in the order of the requests.
    """
    S = x_probs.shape[1]
    rows, cols = cell_idx // S, cell_idx % S  # i, j
    return x_probs[img_idx, cols] * y_probs[img_idx, rows]


def decoupled_solo_loss(
    lvl_cate_preds: Sequence[Tensor],
    lvl_x_preds: Sequence[Tensor],
    lvl_y_preds: Sequence[Tensor],
    img_lvl_ins_label: Sequence[Sequence[Tensor]],
    img_lvl_cate_label: Sequence[Sequence[Tensor]],
    img_lvl_ins_ind_label: Sequence[Sequence[Tensor]],
    mask_loss_weight: float = 3.0,
    cate_loss_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_norm: str = "positives",
    dice_eps: float = 1e-3,
) -> dict[str, Tensor | int]:
    """L = cate_w L_cate + mask_w L_mask with the decoupled masks of the positive cells.

    Args:
        lvl_cate_preds: per level (B, C, S, S) category logits.
        lvl_x_preds, lvl_y_preds: per level (B, S, h_l, w_l) X and Y logits.
        img_lvl_*: `target` output: per image, per level (P, h_l, w_l) uint8 / (S, S) int64 /
            (S*S,) bool.
    Returns:
        dict with "total", "cate", "mask" scalars and "num_pos" (int, positive cells).
    """
    cate = category_loss(lvl_cate_preds, img_lvl_cate_label, focal_alpha, focal_gamma, focal_norm)
    lvl_dice = []
    for level, (x_pred, y_pred) in enumerate(zip(lvl_x_preds, lvl_y_preds, strict=True)):
        ins_ind = torch.stack([lvl[level] for lvl in img_lvl_ins_ind_label])  # (B, S*S)
        img_idx, cell_idx = ins_ind.nonzero(as_tuple=True)  # image-major, increasing cell
        if img_idx.numel() == 0:
            continue
        targets = torch.cat([lvl[level] for lvl in img_lvl_ins_label])  # (K, h_l, w_l)
        S = x_pred.shape[1]
        rows, cols = cell_idx // S, cell_idx % S
        # Gather the K logit rows first, then the sigmoid: (K, h, w) each, not (B, S, h, w).
        probs = torch.sigmoid(x_pred[img_idx, cols].float()) * torch.sigmoid(
            y_pred[img_idx, rows].float()
        )
        lvl_dice.append(dice_loss(probs, targets, dice_eps))
    num_pos = sum(d.numel() for d in lvl_dice)
    # An exact zero that keeps every mask parameter in the graph (DistributedDataParallel).
    anchor = 0.0 * sum(
        x.float().sum() + y.float().sum() for x, y in zip(lvl_x_preds, lvl_y_preds, strict=True)
    )
    mask = torch.cat(lvl_dice).mean() + anchor if num_pos else anchor
    total = cate_loss_weight * cate + mask_loss_weight * mask
    return {"total": total, "cate": cate, "mask": mask, "num_pos": num_pos}


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class DecoupledSOLOHead(SOLOHead):
    """Decoupled SOLO category and X/Y mask branches over the five levels (module docstring).

    `forward(fpn_feats, eval=False)` -> (lvl_cate_preds, lvl_x_preds, lvl_y_preds):
    training: per level (B, C, S, S) category logits and (B, S, 2Hf_l, 2Wf_l) X and Y logits;
    eval=True: category probabilities after point NMS, and sigmoid(X), sigmoid(Y) resized to
    (B, S, H/4, W/4) on every level (the authors' order: sigmoid, then resize).
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 256,
        seg_feat_channels: int = 256,
        stacked_convs: int = 7,
        strides: tuple[int, ...] = STRIDES,
        scale_ranges: tuple[tuple[float, float], ...] = SCALE_RANGES,
        epsilon: float = EPSILON,
        num_grids: tuple[int, ...] = NUM_GRIDS,
        mask_loss_weight: float = 3.0,
        cate_loss_weight: float = 1.0,
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        focal_norm: str = "positives",
        dice_eps: float = 1e-3,
        init: str = "authors",
        gn_groups: int = 32,
        cate_thresh: float = CATE_THRESH,
        ins_thresh: float = 0.5,
        pre_NMS_num: int = PRE_NMS_NUM,
        keep_instance: int = KEEP_INSTANCE,
        IoU_thresh: float = 0.5,
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        update_thresh: float = UPDATE_THRESH,
        filter_small_masks: bool = True,
        shared_xy_tower: bool = False,
    ):
        """Args as `SOLOHead`'s (same names; towers 7 x 256 as the authors' Decoupled SOLO R50,
        post-processing defaults the authors' test_cfg), plus:
        shared_xy_tower: False: separate X and Y towers with one coordinate channel each
            (DecoupledSOLOHead); True: one tower with both (DecoupledSOLOLightHead).
        """
        # Read by `_init_layers`, which SOLOHead.__init__ calls (plain values may be set before
        # nn.Module.__init__).
        self.shared_xy_tower = shared_xy_tower
        super().__init__(
            num_classes=num_classes,
            in_channels=in_channels,
            seg_feat_channels=seg_feat_channels,
            stacked_convs=stacked_convs,
            strides=strides,
            scale_ranges=scale_ranges,
            epsilon=epsilon,
            num_grids=num_grids,
            mask_loss_weight=mask_loss_weight,
            cate_loss_weight=cate_loss_weight,
            focal_gamma=focal_gamma,
            focal_alpha=focal_alpha,
            focal_norm=focal_norm,
            dice_eps=dice_eps,
            init=init,
            gn_groups=gn_groups,
            cate_thresh=cate_thresh,
            ins_thresh=ins_thresh,
            pre_NMS_num=pre_NMS_num,
            keep_instance=keep_instance,
            IoU_thresh=IoU_thresh,
            nms_kernel=nms_kernel,
            nms_sigma=nms_sigma,
            update_thresh=update_thresh,
            filter_small_masks=filter_small_masks,
        )

    # --- network ---

    def _tower(self, in_channels: int) -> nn.Sequential:
        D, G = self.seg_feat_channels, self.gn_groups
        return nn.Sequential(
            *[_conv_gn_relu(in_channels if i == 0 else D, D, G) for i in range(self.stacked_convs)]
        )

    def _init_layers(self) -> None:
        """Category tower (F -> D); X and Y towers (F + 1 -> D each) or one shared (F + 2 -> D);
        per level conv3x3 D -> S for X and for Y; conv3x3 D -> C for the category."""
        D, Fin = self.seg_feat_channels, self.in_channels
        self.cate_convs = self._tower(Fin)
        if self.shared_xy_tower:
            self.mask_convs = self._tower(Fin + 2)
        else:
            self.mask_convs_x = self._tower(Fin + 1)
            self.mask_convs_y = self._tower(Fin + 1)
        self.cate_out = nn.Conv2d(D, self.cate_out_channels, 3, padding=1)
        self.mask_out_x = nn.ModuleList([nn.Conv2d(D, S, 3, padding=1) for S in self.num_grids])
        self.mask_out_y = nn.ModuleList([nn.Conv2d(D, S, 3, padding=1) for S in self.num_grids])

    def _init_weights(self) -> None:
        """Two choices (`init`): "authors": convs normal(0, 0.01), the category and X / Y output
        biases at the prior -log(99) (WXinlong/SOLO init_weights); "xavier": xavier_uniform_,
        zero biases. GroupNorm keeps weight 1, bias 0."""
        prior_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if self.init == "authors":
                    nn.init.normal_(module.weight, mean=0.0, std=0.01)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.init == "authors":
            nn.init.constant_(self.cate_out.bias, prior_bias)
            for conv in (*self.mask_out_x, *self.mask_out_y):
                nn.init.constant_(conv.bias, prior_bias)

    def forward(
        self, fpn_feats: Sequence[Tensor], eval: bool = False
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """fpn_feats: [P2..P6] from the backbone, (B, F, H/4..H/64, ...).

        Returns (lvl_cate_preds, lvl_x_preds, lvl_y_preds), see the class docstring.
        """
        feats = self.NewFPN(fpn_feats)
        Hf0, Wf0 = feats[0].shape[-2:]
        return self.MultiApply(
            self.forward_single_level,
            feats,
            range(len(feats)),
            eval=eval,
            upsampled_size=(2 * Hf0, 2 * Wf0),  # H/4 x W/4: the level-0 mask size
        )

    def forward_single_level(
        self,
        feat: Tensor,
        level: int,
        eval: bool = False,
        upsampled_size: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One level: feat (B, F, Hf, Wf) -> cate (B, C, S, S), X and Y (B, S, 2Hf, 2Wf).

        eval=True: cate is sigmoid + point NMS; X and Y are sigmoid-ed, resized to
        `upsampled_size`.
        """
        B, _, Hf, Wf = feat.shape
        S = self.num_grids[level]
        cate_feat = F.interpolate(feat, size=(S, S), mode="bilinear", align_corners=False)
        cate_pred = self.cate_out(self.cate_convs(cate_feat))  # (B, C, S, S) logits
        coords = coord_channels(B, Hf, Wf, feat)  # (B, 2, Hf, Wf): x, then y
        mask_size = (2 * Hf, 2 * Wf)  # x2 upsampling before the output convs (authors)
        if self.shared_xy_tower:
            mask_feat = self.mask_convs(torch.cat([feat, coords], dim=1))  # (B, D, Hf, Wf)
            x_feat = y_feat = _resize(mask_feat, mask_size)  # (B, D, 2Hf, 2Wf)
        else:
            x_feat = self.mask_convs_x(torch.cat([feat, coords[:, :1]], dim=1))  # x coordinate
            y_feat = self.mask_convs_y(torch.cat([feat, coords[:, 1:]], dim=1))  # y coordinate
            x_feat, y_feat = _resize(x_feat, mask_size), _resize(y_feat, mask_size)
        x_pred = self.mask_out_x[level](x_feat)  # (B, S, 2Hf, 2Wf): column j of the grid
        y_pred = self.mask_out_y[level](y_feat)  # (B, S, 2Hf, 2Wf): row i of the grid
        if eval:
            cate_pred = self.points_nms(torch.sigmoid(cate_pred))
            size = tuple(upsampled_size) if upsampled_size is not None else mask_size
            x_pred = _resize(torch.sigmoid(x_pred), size)  # (B, S, H/4, W/4)
            y_pred = _resize(torch.sigmoid(y_pred), size)
        return cate_pred, x_pred, y_pred

    def mask_logits(self, *args, **kwargs):
        """Decoupled masks are products of probabilities, not logits: use `mask_probs`."""
        raise NotImplementedError("DecoupledSOLOHead has no mask logits; use mask_probs")

    def mask_probs(self, x_pred: Tensor, y_pred: Tensor) -> Tensor:
        """All S^2 masks of a level from its X and Y logits, (B, S, h, w) -> (B, S^2, h, w)
        probabilities. For plots and tests; training and inference use only chosen cells."""
        B, S, h, w = x_pred.shape
        img_idx = torch.arange(B, device=x_pred.device).repeat_interleave(S * S)
        cell_idx = torch.arange(S * S, device=x_pred.device).repeat(B)
        probs = decoupled_masks(torch.sigmoid(x_pred), torch.sigmoid(y_pred), img_idx, cell_idx)
        return probs.reshape(B, S * S, h, w)  # (B*S*S, h, w) -> (B, S*S, h, w)

    # --- loss ---

    def loss(
        self,
        preds: tuple[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]],
        boxes_list: Sequence[Tensor],
        labels_list: Sequence[Tensor],
        masks_list: Sequence[Tensor],
        padded_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor | int]:
        """SOLO targets and `decoupled_solo_loss` of a batch; arguments as `SOLOHead.loss`.

        Returns dict(total=, cate=, mask=, num_pos=).
        """
        lvl_cate_preds, lvl_x_preds, lvl_y_preds = preds
        if padded_size is None:
            padded_size = tuple(masks_list[0].shape[-2:])
        check_labels(labels_list, self.num_classes, "DecoupledSOLOHead.loss")
        sizes = [tuple(x.shape[-2:]) for x in lvl_x_preds]
        device = lvl_x_preds[0].device
        img_ins, img_cate, img_ind = self.target(
            sizes,
            [b.to(device) for b in boxes_list],
            [lab.to(device) for lab in labels_list],
            [m.to(device) for m in masks_list],
            padded_size,
        )
        return decoupled_solo_loss(
            lvl_cate_preds,
            lvl_x_preds,
            lvl_y_preds,
            img_ins,
            img_cate,
            img_ind,
            mask_loss_weight=self.mask_loss_weight,
            cate_loss_weight=self.cate_loss_weight,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            focal_norm=self.focal_norm,
            dice_eps=self.dice_eps,
        )

    # --- inference ---

    @torch.no_grad()
    def PostProcessImg(
        self,
        lvl_cate_scores: Sequence[Tensor],
        lvl_x_probs: Sequence[Tensor],
        lvl_y_probs: Sequence[Tensor],
        input_size: tuple[int, int],
        padded_size: tuple[int, int],
        orig_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        """One image: candidates over all levels, their decoupled masks only, `finish_single`.

        lvl_cate_scores: per level (C, S, S) after point NMS; lvl_x_probs / lvl_y_probs: per
        level (S, h4, w4). Cells are numbered level by level, row-major in each.
        """
        cell_idx, labels, scores = self.candidates(lvl_cate_scores)
        level_of, local = cell_levels(cell_idx, self.num_grids)
        h4, w4 = lvl_x_probs[0].shape[-2:]
        mask_probs = lvl_x_probs[0].new_zeros((cell_idx.numel(), h4, w4), dtype=torch.float32)
        for level, (x_probs, y_probs) in enumerate(zip(lvl_x_probs, lvl_y_probs, strict=True)):
            rows = (level_of == level).nonzero(as_tuple=True)[0]
            if rows.numel():
                mask_probs[rows] = decoupled_masks(
                    x_probs[None].float(),
                    y_probs[None].float(),
                    torch.zeros_like(rows),
                    local[rows],
                )
        return self.finish_candidates(
            mask_probs, labels, scores, level_of, input_size, padded_size, orig_size
        )
