"""The Decoupled SOLO head (Wang et al., "SOLO: Segmenting Objects by Locations", ECCV 2020,
sec. 3.4): the S^2 mask channels of a level are replaced by two sets of S channels, X and Y, and
the mask of grid cell (i, j) (row i, column j) is sigmoid(X_j) * sigmoid(Y_i).

`DecoupledSOLOHead` is a `solo_head.InstanceHead` like `SOLOHead`: the constructor, the targets,
the loss, the post-processing and the hand-out's names are the base's, so `model.py`, training,
inference and the export use it unchanged. What is its own is the network and `cell_masks`:

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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from solo_head import InstanceHead, Size, coord_channels

# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, c, h, w) to (B, c, *size)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def decoupled_masks(
    x_maps: Tensor, y_maps: Tensor, img_idx: Tensor, cell_idx: Tensor, logits: bool = False
) -> Tensor:
    """Masks of the requested cells: cell k = i*S + j of image b is X[b, j] * Y[b, i].

    Args:
        x_maps, y_maps: (B, S, h, w) of one level: probabilities, or logits when `logits`
            (then the sigmoid is taken of the K gathered rows only, not of all B x S).
        img_idx, cell_idx: (K,) int64 image and cell (row-major in the S x S grid) per request.
    Returns:
        (K, h, w) float32 soft masks in the order of the requests.
    """
    B, S, h, w = x_maps.shape
    rows, cols = cell_idx // S, cell_idx % S  # i, j
    # One index into the (B*S, h, w) maps (the ONNX export gathers it with one Gather).
    x = x_maps.reshape(B * S, h, w)[img_idx * S + cols].float()  # (K, h, w)
    y = y_maps.reshape(B * S, h, w)[img_idx * S + rows].float()
    if logits:
        x, y = torch.sigmoid(x), torch.sigmoid(y)
    return x * y


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class DecoupledSOLOHead(InstanceHead):
    """Decoupled SOLO category and X/Y mask branches over the five levels (module docstring).

    `forward(fpn_feats, eval=False)` -> (lvl_cate_preds, lvl_x_preds, lvl_y_preds):
    training: per level (B, C, S, S) category logits and (B, S, 2Hf_l, 2Wf_l) X and Y logits;
    eval=True: category probabilities after point NMS, and sigmoid(X), sigmoid(Y) resized to
    (B, S, H/4, W/4) on every level (the authors' order: sigmoid, then resize).

    Its own setting (`solo_head.HeadConfig`): shared_xy_tower, False for separate X and Y towers
    with one coordinate channel each (DecoupledSOLOHead), True for one tower with both
    (DecoupledSOLOLightHead).
    """

    model = "decoupled_solo"

    # --- network ---

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

    def prior_convs(self) -> list[nn.Conv2d]:
        """The category output and every X / Y output (WXinlong/SOLO init_weights)."""
        return [self.cate_out, *self.mask_out_x, *self.mask_out_y]

    def forward_single_level(
        self, feat: Tensor, level: int, eval: bool = False, upsampled_size: Size | None = None
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

    # --- the masks of cells ---

    def cell_masks(
        self, preds: tuple, level: int, img_idx: Tensor, cell_idx: Tensor, eval: bool = False
    ) -> Tensor:
        """Soft masks (K, h, w) sigmoid(X_j) * sigmoid(Y_i) of the cells (`decoupled_masks`);
        training outputs are logits, eval outputs already probabilities."""
        _, lvl_x, lvl_y = preds
        return decoupled_masks(lvl_x[level], lvl_y[level], img_idx, cell_idx, logits=not eval)

    def mask_probs(self, x_pred: Tensor, y_pred: Tensor) -> Tensor:
        """All S^2 masks of a level from its X and Y logits, (B, S, h, w) -> (B, S^2, h, w)
        probabilities. For plots and tests; training and inference use only chosen cells."""
        B, S, h, w = x_pred.shape
        img_idx = torch.arange(B, device=x_pred.device).repeat_interleave(S * S)
        cell_idx = torch.arange(S * S, device=x_pred.device).repeat(B)
        probs = decoupled_masks(x_pred, y_pred, img_idx, cell_idx, logits=True)
        return probs.reshape(B, S * S, h, w)  # (B*S*S, h, w) -> (B, S*S, h, w)
