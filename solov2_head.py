"""The SOLOv2 head (Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020):
a kernel branch predicts, for every grid cell, the weights of a 1x1 convolution that is applied to
one shared mask-feature map ("dynamic convolution", paper sec. 3.2), instead of SOLO's S^2 output
channels per level.

`SOLOv2Head` is a `solo_head.InstanceHead` like `SOLOHead`: the constructor, the targets, the
loss, the post-processing and the hand-out's names are the base's, so `model.py`, training,
inference and the export use it unchanged. What is its own is the network and `cell_masks`:

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

from config import CIS680
from solo_head import (
    InstanceHead,
    _conv_gn_relu,
    coord_channels,
    dice_loss,
    level_positives,
    mask_logits_for_cells,
)

# --------------------------------------------------------------------------------------------
# config (the authors' SOLOv2 settings are config.MODEL_DEFAULTS' and config.CIS680's)
# --------------------------------------------------------------------------------------------

MASK_FEAT_LEVELS = 4  # P2..P5 feed the mask-feature branch (authors: start_level 0, end_level 3)
MASK_STRIDE = 4  # of the mask features (and, by default, of the masks the dice loss compares)

# --------------------------------------------------------------------------------------------
# pure functions
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
        in_channels: int = CIS680.fpn_channels,
        feat_channels: int = CIS680.mask_feat_channels,
        out_channels: int = CIS680.kernel_channels,
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


class SOLOv2Head(InstanceHead):
    """SOLOv2 kernel, category and mask-feature branches (see the module docstring).

    `forward(fpn_feats, eval=False)` -> (lvl_cate_preds, lvl_kernel_preds, mask_feats):
    training: per level (B, C, S, S) category logits and (B, E, S, S) kernels, and the
    (B, E, H/4, W/4) mask features; eval=True: the category maps are probabilities after point
    NMS, the rest unchanged.

    Settings of its own (`solo_head.HeadConfig`): seg_feat_channels, stacked_convs (width D and
    depth of the kernel and category towers), kernel_channels (E, the mask features' channels
    and the length of a dynamic kernel), mask_feat_channels (width of the mask-feature branch)
    and mask_loss_stride: input pixels per pixel of the masks that the dice loss compares: 4,
    the mask features' own stride (the authors), or 2 or 1, for which the mask logits are
    bilinearly upsampled 2 or 4 times first (`upsample_logits`); inference then resizes logits
    rather than probabilities, as trained (`postprocess.finish_single`).
    """

    model = "solov2"

    @property
    def mask_upsample(self) -> int:
        """How many times the dice loss upsamples the mask logits (4 / mask_loss_stride)."""
        return MASK_STRIDE // self.mask_loss_stride

    @property
    def resize_logits(self) -> bool:
        return self.mask_upsample > 1

    # --- network ---

    def _init_layers(self) -> None:
        """Kernel tower (F + 2 -> D), category tower (F -> D), their output convs, mask branch."""
        D, Fin = self.seg_feat_channels, self.in_channels
        self.kernel_convs = self._tower(Fin + 2)
        self.cate_convs = self._tower(Fin)
        # Both outputs are conv3x3 on the S x S grid, as the authors' solo_kernel / solo_cate.
        self.kernel_out = nn.Conv2d(D, self.kernel_channels, 3, padding=1)
        self.cate_out = nn.Conv2d(D, self.cate_out_channels, 3, padding=1)
        self.mask_feat_branch = MaskFeatBranch(
            Fin, self.mask_feat_channels, self.kernel_channels, MASK_FEAT_LEVELS, self.gn_groups
        )

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

    # --- the masks of cells ---

    def cell_mask_logits(
        self, preds: tuple, level: int, img_idx: Tensor, cell_idx: Tensor
    ) -> Tensor:
        """Mask logits (K, Hf, Wf): the kernel of cell cell_idx[k] on `level` applied to image
        img_idx[k]'s mask features (`dynamic_mask_logits`)."""
        _, lvl_kernel_preds, mask_feats = preds
        B, E, S, _ = lvl_kernel_preds[level].shape
        flat = lvl_kernel_preds[level].permute(0, 2, 3, 1).reshape(B, S * S, E)  # (B,S*S,E)
        return dynamic_mask_logits(mask_feats, flat[img_idx, cell_idx], img_idx).float()

    def cell_masks(
        self, preds: tuple, level: int, img_idx: Tensor, cell_idx: Tensor, eval: bool = False
    ) -> Tensor:
        """sigmoid of `cell_mask_logits`: (K, Hf, Wf)."""
        return torch.sigmoid(self.cell_mask_logits(preds, level, img_idx, cell_idx))

    def candidate_masks(
        self, preds: tuple, cell: Tensor, static: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(probabilities, logits) (n, Hf, Wf) of cells `cell` (n,) numbered over all levels,
        for one image; the logits only with `resize_logits`. Every level's kernels share the
        mask features, so one dynamic convolution serves all levels, in PyTorch and in the ONNX
        graph alike (`static` changes nothing)."""
        _, lvl_kernel_preds, mask_feats = preds
        E = mask_feats.shape[1]
        # per level (1, E, S, S) -> (S*S, E), then all levels, numbered as the cells
        kernels = torch.cat([k[0].permute(1, 2, 0).reshape(-1, E) for k in lvl_kernel_preds])
        logits = dynamic_mask_logits(mask_feats, kernels[cell], torch.zeros_like(cell)).float()
        return torch.sigmoid(logits), (logits if self.resize_logits else None)

    def mask_target_sizes(self, preds: tuple) -> list[tuple[int, int]]:
        """H/4 x W/4 (times `mask_upsample`) on every level."""
        h, w = preds[2].shape[-2:]
        u = self.mask_upsample
        return [(u * h, u * w)] * len(preds[0])

    def positive_dice(self, preds: tuple, img_ins: Sequence, img_ind: Sequence) -> list[Tensor]:
        """The dice terms of every level's positive cells at once: all levels' kernels share
        the mask features, so one dynamic convolution serves them (one product per image, not
        one per image and level); the logits upsampled `mask_upsample` times, then the
        sigmoid."""
        _, lvl_kernel_preds, mask_feats = preds
        kernels, img_idxs, targets = [], [], []
        for level, kernel_pred in enumerate(lvl_kernel_preds):
            img_idx, cell_idx, target = level_positives(img_ind, img_ins, level)
            B, E, S, _ = kernel_pred.shape
            flat = kernel_pred.permute(0, 2, 3, 1).reshape(B, S * S, E)  # (B, S*S, E)
            kernels.append(flat[img_idx, cell_idx])  # (K_l, E)
            img_idxs.append(img_idx)
            targets.append(target)  # (K_l, u Hf, u Wf)
        kernels = torch.cat(kernels)
        if kernels.shape[0] == 0:
            return []
        logits = dynamic_mask_logits(mask_feats, kernels, torch.cat(img_idxs)).float()
        probs = torch.sigmoid(upsample_logits(logits, self.mask_upsample))  # (K, u Hf, u Wf)
        return [dice_loss(probs, torch.cat(targets), self.dice_eps)]

    def mask_logits(self, mask_feats: Tensor, kernel_pred: Tensor) -> Tensor:
        """All S^2 mask logits of a level (SOLO's ins_pred), (B, E, Hf, Wf) and (B, E, S, S) ->
        (B, S^2, Hf, Wf). For plots and tests; training and inference use only chosen cells."""
        B, E, S, _ = kernel_pred.shape
        kernels = kernel_pred.permute(0, 2, 3, 1).reshape(B * S * S, E)  # (B,E,S,S)->(B*S*S,E)
        img_idx = torch.arange(B, device=kernels.device).repeat_interleave(S * S)
        logits = dynamic_mask_logits(mask_feats, kernels, img_idx)  # (B*S*S, Hf, Wf)
        return logits.reshape(B, S * S, *logits.shape[-2:])
