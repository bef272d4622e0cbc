"""The SOLOv2 head (Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020):
a kernel branch predicts, for every grid cell, the weights of a 1x1 convolution that is applied to
one shared mask-feature map ("dynamic convolution", paper sec. 3.2), instead of SOLO's S^2 output
channels per level.

`SOLOv2Head` keeps `SOLOHead`'s interface (it subclasses it: constructor style, `target`,
`FocalLoss`, `DiceLoss`, `points_nms`, `MatrixNMS`, `PlotGT`, `PlotInfer` are SOLO's), so
`model.py`, training and inference use it unchanged:

    lvl_cate_preds, lvl_kernel_preds, mask_feats = head(backbone(images))    # logits, kernels
    losses = head.loss(preds, boxes_list, labels_list, masks_list)           # total, cate, mask
    results = head.PostProcess(head(backbone(images), eval=True), metas)     # masks/labels/scores

Following the authors (WXinlong/SOLO solov2_head.py + mask_feat_head.py; AdelaiDet solov2.py):
- Kernel and category branches per level on the NewFPN features (strides 8, 8, 16, 32, 32, the
  same P2-halving / P6-to-P5 trick as SOLO): the level feature with coordinate channels, resized
  to S x S, feeds the kernel tower (stacked_convs x conv3x3 D, GN, ReLU; a conv3x3 to E
  outputs); the same resized feature without the coordinate channels feeds the category tower
  (C outputs, prior bias -log(99)). Authors: D = 512, 4 convs, E = 256.
- Mask-feature branch (`MaskFeatBranch`, paper Fig. 4) on the backbone's P2..P5: level i is
  brought to stride 4 by i blocks of (conv3x3 128 GN ReLU, bilinear x2) (level 0, already at
  stride 4, by one conv without upsampling, as the authors' code), coordinate channels added at
  P5 only, the four summed, then conv1x1 to E with GN and ReLU: (B, E, H/4, W/4).
- Mask of a cell = its kernel (E,) applied as a 1x1 conv to its image's mask features, computed
  for the positive cells only in training and for the candidates only in inference, as one
  matrix product per image (`dynamic_mask_logits`), never a loop over cells.
- Targets are SOLO's (`solo_head.target_single_img`) with every level's masks at the
  mask-feature size H/4 x W/4 (the authors' solov2_target_single rescales by 1/4 on every level).
- `mask_loss_stride` (not in the paper; default 4, the authors'): 2 or 1 compares the masks in
  the dice loss at stride 2 or at the input's resolution, the mask logits bilinearly upsampled
  2 or 4 times (`upsample_logits`), and inference then resizes the kept masks' logits rather than
  their probabilities. The CPU preset uses 2 (docs/cpu_preset.md, round four).
- Post-processing as the authors' get_seg_single, through `postprocess.finish_single`: category
  score > 0.1, masks by dynamic convolution, binarise at 0.5, drop masks not larger than the
  level's stride, score x maskness, top 500, Matrix NMS (gaussian, sigma 2), keep >= 0.05, top
  100, upsample x4, crop the padding, resize to the original size.

As in `SOLOHead`, the network returns LOGITS in training and the losses apply the sigmoid;
`forward(..., eval=True)` returns category probabilities after point NMS.

Shape legend: B batch, N instances, L pyramid levels (5), S grid size of a level, C classes without
background, H x W padded input, Hf x Wf = H/4 x W/4 the mask-feature size, D tower width
(seg_feat_channels), E kernel channels (kernel_channels), F FPN channels, K positive (or
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
    focal_loss,
    focal_normalizer,
    mask_logits_for_cells,
)

# --------------------------------------------------------------------------------------------
# config (the authors' SOLOv2 R50 settings; tuples, never lists)
# --------------------------------------------------------------------------------------------

TOWER_CHANNELS = 512  # D of the kernel and category towers (authors: seg_feat_channels=512)
STACKED_CONVS = 4  # convs per tower (authors)
KERNEL_CHANNELS = 256  # E: mask-feature channels = weights of one 1x1 dynamic kernel (authors)
MASK_FEAT_CHANNELS = 128  # width of the mask-feature branch's convs (authors)
MASK_FEAT_LEVELS = 4  # P2..P5 feed the mask-feature branch (authors: start_level 0, end_level 3)
MASK_STRIDE = 4  # of the mask features (and, by default, of the masks the dice loss compares)
# Post-processing (authors' test_cfg): score_thr, nms_pre, max_per_img, update_thr.
CATE_THRESH, PRE_NMS_NUM, KEEP_INSTANCE, UPDATE_THRESH = 0.1, 500, 100, 0.05

# --------------------------------------------------------------------------------------------
# pure functions (also used by decoupled_head.py)
# --------------------------------------------------------------------------------------------


def dynamic_mask_logits(mask_feats: Tensor, kernels: Tensor, img_idx: Tensor) -> Tensor:
    """Dynamic convolution (paper sec. 3.2): kernel k as a 1x1 conv on image img_idx[k]'s features.

    Equals `F.conv2d(mask_feats[img_idx[k]][None], kernels[k].view(1, E, 1, 1))[0, 0]` for each
    k, computed as one (K_b, E) @ (E, Hf*Wf) product per image (`mask_logits_for_cells` with the
    kernels as the weight rows and no bias); no loop over cells.

    Args:
        mask_feats: (B, E, Hf, Wf) mask features.
        kernels: (K, E) one dynamic kernel per requested mask.
        img_idx: (K,) int64 image of each kernel.
    Returns:
        (K, Hf, Wf) mask logits in the order of `kernels`.
    """
    B, E, Hf, Wf = mask_feats.shape
    K = kernels.shape[0]
    if kernels.dim() != 2 or kernels.shape[1] != E or img_idx.shape != (K,):
        raise ValueError(
            f"dynamic_mask_logits: expected kernels (K, {E}) and img_idx (K,) for mask features "
            f"{tuple(mask_feats.shape)}, got {tuple(kernels.shape)} and {tuple(img_idx.shape)}"
        )
    weight = kernels.reshape(K, E, 1, 1)  # (K, E) -> (K, E, 1, 1), a conv weight
    bias = kernels.new_zeros(K)  # the authors' dynamic kernels have no bias
    rows = torch.arange(K, device=kernels.device)
    return mask_logits_for_cells(mask_feats, img_idx, rows, weight, bias)


def upsample_logits(logits: Tensor, factor: int) -> Tensor:
    """(K, h, w) mask logits -> (K, factor h, factor w), bilinear (align_corners=False).

    Logits, not probabilities: a straight edge is a linear ramp of logits, which bilinear
    interpolation keeps, so its zero crossing (the boundary at threshold 0.5) lands between the
    coarse pixels; upsampled probabilities blur it instead. factor 1 returns `logits`.
    """
    if factor == 1:
        return logits
    return F.interpolate(
        logits[:, None], scale_factor=factor, mode="bilinear", align_corners=False
    )[:, 0]  # (K, h, w) -> (K, 1, h, w) -> (K, 1, fh, fw) -> (K, fh, fw)


def category_loss(
    lvl_cate_preds: Sequence[Tensor],
    img_lvl_cate_label: Sequence[Sequence[Tensor]],
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_norm: str = "positives",
) -> Tensor:
    """SOLO's category loss over a batch: `focal_loss` of all cells of all levels and images.

    lvl_cate_preds: per level (B, C, S, S) logits; img_lvl_cate_label: per image, per level
    (S, S) int64 in 0..C. Normaliser `focal_normalizer(focal_norm)`. Returns a float32 scalar.
    """
    C = lvl_cate_preds[0].shape[1]
    # (B, C, S, S) -> (B*S*S, C) per level, cells row-major within image and level, matching the
    # (S, S) -> (S*S,) flattening of the labels stacked over images.
    logits = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, C) for p in lvl_cate_preds])
    targets = torch.cat(
        [torch.stack(lvl_labels).flatten() for lvl_labels in zip(*img_lvl_cate_label, strict=True)]
    )  # per level (B, S, S) -> (B*S*S,), then all levels
    normalizer = focal_normalizer(targets, C, focal_norm)
    return focal_loss(logits, targets, focal_alpha, focal_gamma, normalizer)


def check_labels(labels_list: Sequence[Tensor], num_classes: int, who: str) -> None:
    """Raise a ValueError unless every label is a class id in 1..num_classes - 1."""
    labels = torch.cat([lab.reshape(-1) for lab in labels_list])
    if labels.numel() and not (1 <= labels.min() <= labels.max() < num_classes):
        raise ValueError(
            f"{who}: labels must be class ids in 1..{num_classes - 1}, got values "
            f"{labels.min().item()}..{labels.max().item()}"
        )


def solov2_loss(
    lvl_cate_preds: Sequence[Tensor],
    lvl_kernel_preds: Sequence[Tensor],
    mask_feats: Tensor,
    img_lvl_ins_label: Sequence[Sequence[Tensor]],
    img_lvl_cate_label: Sequence[Sequence[Tensor]],
    img_lvl_ins_ind_label: Sequence[Sequence[Tensor]],
    mask_loss_weight: float = 3.0,
    cate_loss_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_norm: str = "positives",
    dice_eps: float = 1e-3,
    mask_upsample: int = 1,
) -> dict[str, Tensor | int]:
    """L = cate_w L_cate + mask_w L_mask (paper eq. 1 of SOLO, sec. 3.3 of SOLOv2).

    L_mask is the mean dice loss of the positive cells' dynamic masks; their kernels from all
    levels go through one `dynamic_mask_logits` call. With `mask_upsample` u > 1 the mask
    logits are bilinearly upsampled u times before the sigmoid and the dice loss, against
    targets u times the mask-feature size (`SOLOv2Head`'s `mask_loss_stride`).

    Args:
        lvl_cate_preds: per level (B, C, S, S) category logits.
        lvl_kernel_preds: per level (B, E, S, S) dynamic kernels.
        mask_feats: (B, E, Hf, Wf) mask features.
        img_lvl_*: `SOLOv2Head.target` output: per image, per level (P, u Hf, u Wf) uint8 /
            (S, S) int64 / (S*S,) bool.
    Returns:
        dict with "total", "cate", "mask" scalars and "num_pos" (int, positive cells). With no
        positive cell the mask loss is a zero still connected to the graph.
    """
    cate = category_loss(lvl_cate_preds, img_lvl_cate_label, focal_alpha, focal_gamma, focal_norm)

    # Positive (image, cell) pairs per level, image-major then increasing cell: the order in
    # which `target` stores the positive masks.
    kernels, img_idxs, targets = [], [], []
    for level, kernel_pred in enumerate(lvl_kernel_preds):
        B, E, S, _ = kernel_pred.shape
        ins_ind = torch.stack([lvl[level] for lvl in img_lvl_ins_ind_label])  # (B, S*S)
        img_idx, cell_idx = ins_ind.nonzero(as_tuple=True)  # (K_l,), (K_l,)
        if img_idx.numel() == 0:
            continue
        flat = kernel_pred.permute(0, 2, 3, 1).reshape(B, S * S, E)  # (B,E,S,S) -> (B,S*S,E)
        kernels.append(flat[img_idx, cell_idx])  # (K_l, E)
        img_idxs.append(img_idx)
        targets.append(torch.cat([lvl[level] for lvl in img_lvl_ins_label]))  # (K_l, Hf, Wf)
    # An exact zero that keeps every kernel and mask-feature parameter in the graph, also without
    # positives: DistributedDataParallel needs a gradient for each.
    anchor = 0.0 * (sum(k.float().sum() for k in lvl_kernel_preds) + mask_feats.float().sum())
    num_pos = 0
    mask = anchor
    if kernels:
        logits = dynamic_mask_logits(mask_feats, torch.cat(kernels), torch.cat(img_idxs))
        logits = upsample_logits(logits.float(), mask_upsample)  # (K, u Hf, u Wf)
        dice = dice_loss(torch.sigmoid(logits), torch.cat(targets), dice_eps)  # (K,)
        num_pos = dice.numel()
        mask = dice.mean() + anchor
    total = cate_loss_weight * cate + mask_loss_weight * mask
    return {"total": total, "cate": cate, "mask": mask, "num_pos": num_pos}


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class MaskFeatBranch(nn.Module):
    """SOLOv2's unified mask-feature branch (paper sec. 3.2.2, Fig. 4; authors' MaskFeatHead).

    `forward([P2, P3, P4, P5])` -> (B, out_channels, H/4, W/4). Level i > 0 goes through i blocks
    of (conv3x3 feat_channels GN ReLU, bilinear x2); level 0 (already at stride 4) through one
    conv; the coarsest level gets the two coordinate channels first (CoordConv, paper sec.
    3.2.2: "to provide position information"). The levels are summed, then conv1x1 to
    out_channels with GN and ReLU. Each x2 upsampling goes to the exact size of the next finer
    level, so any input size works (for H, W % 32 == 0 this is exactly x2).
    """

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = MASK_FEAT_CHANNELS,
        out_channels: int = KERNEL_CHANNELS,
        num_levels: int = MASK_FEAT_LEVELS,
        gn_groups: int = 32,
    ):
        super().__init__()
        self.num_levels = num_levels
        groups = math.gcd(gn_groups, feat_channels)  # GroupNorm needs groups | channels
        self.level_convs = nn.ModuleList()
        for level in range(num_levels):
            extra = 2 if level == num_levels - 1 else 0  # coordinate channels at the coarsest
            in_first = in_channels + extra
            blocks = [
                _conv_gn_relu(in_first if k == 0 else feat_channels, feat_channels, groups)
                for k in range(max(level, 1))  # P2: one conv; P(2+i): i conv + x2 blocks
            ]
            self.level_convs.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(
            nn.Conv2d(feat_channels, out_channels, 1, bias=False),
            nn.GroupNorm(math.gcd(gn_groups, out_channels), out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """feats: [P2 (B, F, H/4, W/4), .., P5 (B, F, H/32, W/32)] -> (B, out, H/4, W/4)."""
        if len(feats) != self.num_levels:
            raise ValueError(
                f"MaskFeatBranch expects {self.num_levels} levels (P2..P5), got {len(feats)}"
            )
        total = None
        for level, (feat, blocks) in enumerate(zip(feats, self.level_convs, strict=True)):
            if level == self.num_levels - 1:
                B, _, h, w = feat.shape
                feat = torch.cat([feat, coord_channels(B, h, w, feat)], dim=1)  # (B, F+2, h, w)
            for k, block in enumerate(blocks):
                feat = block(feat)
                if level > 0:  # bilinear x2, to the size of the level below
                    size = feats[level - 1 - k].shape[-2:]
                    feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
            total = feat if total is None else total + feat
        return self.out(total)


class SOLOv2Head(SOLOHead):
    """SOLOv2 kernel, category and mask-feature branches (see the module docstring).

    `forward(fpn_feats, eval=False)` -> (lvl_cate_preds, lvl_kernel_preds, mask_feats):
    training: per level (B, C, S, S) category logits and (B, E, S, S) kernels, and the
    (B, E, H/4, W/4) mask features; eval=True: the category maps are probabilities after point
    NMS, the rest unchanged.

    As in `SOLOHead`, `eval` is the hand-out's flag, independent of `nn.Module.eval()`.
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 256,
        seg_feat_channels: int = TOWER_CHANNELS,
        stacked_convs: int = STACKED_CONVS,
        strides: tuple[int, ...] = STRIDES,
        scale_ranges: tuple[tuple[float, float], ...] = SCALE_RANGES,
        epsilon: float = EPSILON,
        num_grids: tuple[int, ...] = NUM_GRIDS,
        kernel_channels: int = KERNEL_CHANNELS,
        mask_feat_channels: int = MASK_FEAT_CHANNELS,
        mask_loss_stride: int = MASK_STRIDE,
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
    ):
        """Args as `SOLOHead`'s (same names, the authors' SOLOv2 defaults), plus:
        seg_feat_channels, stacked_convs: width D and depth of the kernel and category towers.
        kernel_channels: E, the mask features' channels and the length of a dynamic kernel.
        mask_feat_channels: width of the mask-feature branch's convs.
        mask_loss_stride: input pixels per pixel of the masks that the dice loss compares: 4,
            the mask features' own stride (the authors), or 2 or 1, for which the mask logits
            are bilinearly upsampled 2 or 4 times first (`upsample_logits`); inference then
            resizes logits rather than probabilities, as trained (`postprocess.finish_single`).
        """
        if mask_loss_stride not in (1, 2, 4):
            raise ValueError(f"mask_loss_stride must be 1, 2 or 4, got {mask_loss_stride!r}")
        # Read by `_init_layers`, which SOLOHead.__init__ calls (plain ints may be set before
        # nn.Module.__init__).
        self.kernel_channels = kernel_channels
        self.mask_feat_channels = mask_feat_channels
        self.mask_loss_stride = mask_loss_stride
        self.mask_upsample = MASK_STRIDE // mask_loss_stride
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

    def _init_layers(self) -> None:
        """Kernel tower (F + 2 -> D), category tower (F -> D), their output convs, mask branch."""
        D, G, Fin = self.seg_feat_channels, self.gn_groups, self.in_channels
        self.kernel_convs = nn.Sequential(
            *[_conv_gn_relu(Fin + 2 if i == 0 else D, D, G) for i in range(self.stacked_convs)]
        )
        self.cate_convs = nn.Sequential(
            *[_conv_gn_relu(Fin if i == 0 else D, D, G) for i in range(self.stacked_convs)]
        )
        # Both outputs are conv3x3 on the S x S grid, as the authors' solo_kernel / solo_cate.
        self.kernel_out = nn.Conv2d(D, self.kernel_channels, 3, padding=1)
        self.cate_out = nn.Conv2d(D, self.cate_out_channels, 3, padding=1)
        self.mask_feat_branch = MaskFeatBranch(
            Fin, self.mask_feat_channels, self.kernel_channels, MASK_FEAT_LEVELS, G
        )

    def _init_weights(self) -> None:
        """Two choices (`init`): "authors": every conv normal(0, 0.01), zero biases, the
        category bias at the prior -log(99) (WXinlong/SOLO init_weights); "xavier":
        xavier_uniform_, zero biases. GroupNorm keeps weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if self.init == "authors":
                    nn.init.normal_(module.weight, mean=0.0, std=0.01)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.init == "authors":
            nn.init.constant_(self.cate_out.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(
        self, fpn_feats: Sequence[Tensor], eval: bool = False
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """fpn_feats: [P2..P6] from the backbone, (B, F, H/4..H/64, ...).

        Returns (lvl_cate_preds, lvl_kernel_preds, mask_feats), see the class docstring.
        """
        feats = self.NewFPN(fpn_feats)
        lvl_cate_preds, lvl_kernel_preds = self.MultiApply(
            self.forward_single_level, feats, range(len(feats)), eval=eval
        )
        mask_feats = self.mask_feat_branch(fpn_feats[:MASK_FEAT_LEVELS])  # (B, E, H/4, W/4)
        return lvl_cate_preds, lvl_kernel_preds, mask_feats

    def forward_single_level(
        self, feat: Tensor, level: int, eval: bool = False
    ) -> tuple[Tensor, Tensor]:
        """One level: feat (B, F, Hf_l, Wf_l) -> (cate (B, C, S, S), kernels (B, E, S, S)).

        eval=True: cate is sigmoid + point NMS.
        """
        B, _, Hf, Wf = feat.shape
        S = self.num_grids[level]
        coords = coord_channels(B, Hf, Wf, feat)  # (B, 2, Hf, Wf)
        kernel_feat = F.interpolate(
            torch.cat([feat, coords], dim=1), size=(S, S), mode="bilinear", align_corners=False
        )  # (B, F+2, S, S)
        cate_feat = kernel_feat[:, :-2]  # (B, F, S, S): the same grid without the coordinates
        kernel_pred = self.kernel_out(self.kernel_convs(kernel_feat))  # (B, E, S, S)
        cate_pred = self.cate_out(self.cate_convs(cate_feat))  # (B, C, S, S) logits
        if eval:
            cate_pred = self.points_nms(torch.sigmoid(cate_pred))
        return cate_pred, kernel_pred

    def mask_logits(self, mask_feats: Tensor, kernel_pred: Tensor) -> Tensor:
        """All S^2 mask logits of a level (SOLO's ins_pred), (B, E, Hf, Wf) and (B, E, S, S) ->
        (B, S^2, Hf, Wf). For plots and tests; training and inference use only chosen cells."""
        B, E, S, _ = kernel_pred.shape
        kernels = kernel_pred.permute(0, 2, 3, 1).reshape(B * S * S, E)  # (B,E,S,S)->(B*S*S,E)
        img_idx = torch.arange(B, device=kernels.device).repeat_interleave(S * S)
        logits = dynamic_mask_logits(mask_feats, kernels, img_idx)  # (B*S*S, Hf, Wf)
        return logits.reshape(B, S * S, *logits.shape[-2:])

    # --- loss ---

    def loss(
        self,
        preds: tuple[Sequence[Tensor], Sequence[Tensor], Tensor],
        boxes_list: Sequence[Tensor],
        labels_list: Sequence[Tensor],
        masks_list: Sequence[Tensor],
        padded_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor | int]:
        """Targets (every level's masks at the mask-feature size, times `mask_upsample` when
        `mask_loss_stride` < 4) and `solov2_loss` of a batch.

        preds: `forward(..., eval=False)` output; the rest as `SOLOHead.loss`. Returns
        dict(total=, cate=, mask=, num_pos=).
        """
        lvl_cate_preds, lvl_kernel_preds, mask_feats = preds
        if padded_size is None:
            padded_size = tuple(masks_list[0].shape[-2:])
        check_labels(labels_list, self.num_classes, "SOLOv2Head.loss")
        u = self.mask_upsample
        h, w = mask_feats.shape[-2:]
        sizes = [(u * h, u * w)] * len(lvl_cate_preds)  # H/4 x W/4 (x u) on every level
        device = mask_feats.device
        img_ins, img_cate, img_ind = self.target(
            sizes,
            [b.to(device) for b in boxes_list],
            [lab.to(device) for lab in labels_list],
            [m.to(device) for m in masks_list],
            padded_size,
        )
        return solov2_loss(
            lvl_cate_preds,
            lvl_kernel_preds,
            mask_feats,
            img_ins,
            img_cate,
            img_ind,
            mask_loss_weight=self.mask_loss_weight,
            cate_loss_weight=self.cate_loss_weight,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            focal_norm=self.focal_norm,
            dice_eps=self.dice_eps,
            mask_upsample=self.mask_upsample,
        )

    # --- inference ---

    @torch.no_grad()
    def PostProcessImg(
        self,
        lvl_cate_scores: Sequence[Tensor],
        lvl_kernel_preds: Sequence[Tensor],
        mask_feat: Tensor,
        input_size: tuple[int, int],
        padded_size: tuple[int, int],
        orig_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        """One image: candidates over all levels, their kernels, dynamic conv, `finish_single`.

        lvl_cate_scores: per level (C, S, S) after point NMS; lvl_kernel_preds: per level
        (E, S, S); mask_feat (E, Hf, Wf). Cells are numbered level by level, row-major in each.
        """
        E = lvl_kernel_preds[0].shape[0]
        # per level (E, S, S) -> (S*S, E), then all levels, numbered as the candidates' cells
        kernels = torch.cat([k.permute(1, 2, 0).reshape(-1, E) for k in lvl_kernel_preds])
        cell_idx, labels, scores = self.candidates(lvl_cate_scores)
        logits = dynamic_mask_logits(
            mask_feat[None], kernels[cell_idx], torch.zeros_like(cell_idx)
        )  # (n, Hf, Wf)
        level_of, _ = cell_levels(cell_idx, self.num_grids)
        logits = logits.float()
        return self.finish_candidates(
            torch.sigmoid(logits),
            labels,
            scores,
            level_of,
            input_size,
            padded_size,
            orig_size,
            mask_logits=logits if self.mask_upsample > 1 else None,
        )
