"""The SOLO head (hand-out section 6; Wang et al., "SOLO: Segmenting Objects by Locations", 2020):
network, training targets, losses and inference, with the hand-out's method names.

`SOLOHead` holds the two towers and `forward`; everything else is a small free function below
that the methods wrap (`target_single_img`, `focal_loss`, `dice_loss`, `mask_logits_for_cells`,
...), so each can be tested alone on the CPU.

Training:
    lvl_cate_preds, lvl_mask_feats = head(backbone(images))            # logits, tower features
    losses = head.loss((lvl_cate_preds, lvl_mask_feats), boxes_list, labels_list, masks_list)
    losses["total"].backward()                                         # also "cate", "mask"
Inference:
    preds = head(backbone(images), eval=True)          # probabilities after point NMS
    results = head.PostProcess(preds, metas)           # per image: masks, labels, scores

Deviations from the hand-out, and why:
- The hand-out puts a Sigmoid after both output convs. Here the network returns LOGITS in
  training and the losses apply the sigmoid themselves (focal loss in the log-sum-exp form,
  dice on sigmoid probabilities): the log of a saturated sigmoid is -inf in float32/float16.
  `forward(..., eval=True)` applies the sigmoid.
- The mask branch's S^2-channel output (about 166 M floats for one 800x1088 image over the
  five levels) is never built. `forward` returns the mask-tower features before the 1x1
  output conv; the loss computes the 1x1 conv only for the positive cells' rows of its weight
  (`mask_logits_for_cells`) and inference only for the cells above `cate_thresh`. The result is
  the same as the full computation (tests/test_solo_head.py); benchmarks/bench_mask_memory.py
  measures the saving.
- Targets store only the positive mask channels (see contract.md); `target_single_img`.
- Focal normalisation is a setting: "positives" (authors, default) or "entries" (hand-out);
  see `focal_loss`. Initialisation is a setting: "authors" (default) or "xavier" (hand-out);
  see `SOLOHead._init_weights`.

Run `python solo_head.py` to save the per-level ground-truth plots (hand-out 6.6 / Part A) of
five images of the built-in data set to outputs/gt_levels (`--out`, `--num`, `--cis680`;
`--preset cpu` for the CPU preset's grids, scale ranges and input size).

Shape legend: B batch, N ground-truth instances, L pyramid levels (5), S grid size of a level,
C classes without background (labels 1..C, 0 = background), H x W padded input, D tower width
(seg_feat_channels), Hf_l x Wf_l level l's feature size after NewFPN (stride 8, 8, 16, 32, 32),
h_l x w_l = 2Hf_l x 2Wf_l its mask size, h4 x w4 = H/4 x W/4, K positive (or candidate) cells.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import dataset
import postprocess
from config import CIS680, MODELS, PRESETS, Config, model_config, preset
from synthetic import ensure_builtin_dataset
from visualize import draw_instances, plot_gt_levels

# --------------------------------------------------------------------------------------------
# config (the hand-out's settings are config.CIS680's; a head's are a `HeadConfig`, below)
# --------------------------------------------------------------------------------------------

STRIDES = CIS680.strides  # after NewFPN, pixels of the padded input per feature cell
SCALE_RANGES = CIS680.scale_ranges  # sqrt(w h) bounds per level, pixels
NUM_GRIDS = CIS680.num_grids  # S per level
EPSILON = CIS680.epsilon  # centre-region scale (paper sec. 3.3.1: (cx, cy, eps w, eps h))
Size = tuple[int, int]  # (h, w)
PRIOR_PROB = 0.01  # focal-loss prior (RetinaNet sec. 4.1): start every class at p = 0.01
FOCAL_NORMS = ("positives", "entries")
INITS = ("authors", "xavier")

# --------------------------------------------------------------------------------------------
# pure functions: plumbing
# --------------------------------------------------------------------------------------------


def multi_apply(func: Callable, *args, **kwargs) -> tuple[list, ...]:
    """map `func` over zipped `args` and transpose: [(a1, b1), (a2, b2)] -> ([a1, a2], [b1, b2]).

    A plain sequential map (errata 6), the hand-out's MultiApply.
    """
    pfunc = partial(func, **kwargs) if kwargs else func
    return tuple(map(list, zip(*map(pfunc, *args), strict=True)))


def new_fpn(fpn_feats: Sequence[Tensor]) -> list[Tensor]:
    """Strides [4, 8, 16, 32, 64] -> [8, 8, 16, 32, 32] (hand-out 6.2).

    P2 is resized (bilinear) to P3's size, i.e. halved, to save memory; P6 is resized to P5's
    size, following the paper. Shapes: [(B,F,H/4,W/4), (B,F,H/8,..), .., (B,F,H/64,..)] ->
    [(B,F,H/8,W/8), (B,F,H/8,W/8), (B,F,H/16,..), (B,F,H/32,..), (B,F,H/32,..)].
    """
    if len(fpn_feats) != 5:
        raise ValueError(f"NewFPN expects the 5 backbone levels P2..P6, got {len(fpn_feats)}")
    p2, p3, p4, p5, p6 = fpn_feats
    return [
        F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False),
        p3,
        p4,
        p5,
        F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False),
    ]


def coord_channels(batch: int, height: int, width: int, like: Tensor) -> Tensor:
    """CoordConv channels (paper sec. 3.2): x then y, each linspace(-1, 1); (B, 2, H, W)."""
    ys = torch.linspace(-1, 1, height, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1, 1, width, device=like.device, dtype=like.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)  # (2,H,W) -> (B,2,H,W)


def featmap_sizes_for(
    padded_size: tuple[int, int], strides: Sequence[int] = STRIDES
) -> list[tuple[int, int]]:
    """Mask-target sizes (2Hf_l, 2Wf_l) = (2H / stride_l, 2W / stride_l) for H, W % 32 == 0."""
    H, W = padded_size
    return [(2 * H // s, 2 * W // s) for s in strides]


# --------------------------------------------------------------------------------------------
# pure functions: mask logits (the 1x1 output conv, all channels or only some)
# --------------------------------------------------------------------------------------------


def image_sizes(
    meta: dict | None, padded_size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(input_size, orig_size) of one image from its meta; defaults: padded size, no resize."""
    meta = meta or {}
    input_size = tuple(meta.get("input_size", padded_size))
    return input_size, tuple(meta.get("orig_size", input_size))


def image_frame(meta: dict | None, padded_size: tuple[int, int], pad_to: int) -> tuple[int, int]:
    """The frame one image has on its own: its input size (h, w) rounded up to multiples of
    pad_to, as `dataset.preprocess` pads it, at most the batch's padded size (H, W).

    Without a meta (or its "input_size") the image's frame is the batch's.
    """
    if not meta or "input_size" not in meta:
        return int(padded_size[0]), int(padded_size[1])
    step = max(1, int(pad_to or 1))
    h, w = (int(v) for v in meta["input_size"])
    return (
        min(int(padded_size[0]), -(-h // step) * step),
        min(int(padded_size[1]), -(-w // step) * step),
    )


def cell_levels(cell_idx: Tensor, num_grids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Level and within-level index of cells numbered over all levels (level by level, row-major).

    (n,) int64 -> level (n,) int64 in 0..L-1, local (n,) int64 in 0..S_level^2 - 1.
    """
    sizes = torch.tensor(num_grids, device=cell_idx.device).pow(2)  # (L,) cells per level
    ends = sizes.cumsum(0)
    # Levels whose cells all come before: a comparison and a sum, which the ONNX export takes.
    level = (cell_idx[:, None] >= ends[None]).sum(1)  # (n, L) -> (n,)
    return level, cell_idx - (ends - sizes)[level]


def mask_logits_full(mask_feat: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The vanilla mask output: all S^2 channels (hand-out). (B,D,h,w) -> (B,S^2,h,w).

    weight (S^2, D, 1, 1) and bias (S^2,) of the level's 1x1 conv.
    """
    return F.conv2d(mask_feat, weight, bias)


def mask_logits_for_cells(
    mask_feat: Tensor, img_idx: Tensor, cell_idx: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    """Only the channels asked for: row `cell_idx[k]` of the 1x1 conv on image `img_idx[k]`.

    Equals `mask_logits_full(mask_feat, weight, bias)[img_idx, cell_idx]` without building the
    other S^2 - K channels: one (K_b, D) @ (D, h*w) product per image, no loop over cells.

    Args:
        mask_feat: (B, D, h, w) mask-tower features.
        img_idx: (K,) int64 image of each requested channel.
        cell_idx: (K,) int64 channel (cell k = i*S + j) of each.
        weight: (S^2, D, 1, 1); bias: (S^2,).
    Returns:
        (K, h, w) logits in the order of the requests.
    """
    B, D, h, w = mask_feat.shape
    K = cell_idx.numel()
    if K == 0:
        return mask_feat.new_zeros((0, h, w))
    kernels = weight[cell_idx].reshape(K, D)  # (K, D, 1, 1) -> (K, D)
    biases = bias[cell_idx].unsqueeze(1)  # (K,) -> (K, 1)
    if B == 1:  # one image (inference, the ONNX graph): one product, no grouping
        return torch.addmm(biases, kernels, mask_feat.reshape(D, h * w)).reshape(K, h, w)
    # One (D, h*w) view per image. unbind, not feat_flat[b]: the backward of each [b] writes
    # a zero gradient of the whole batch, and these add up (the CPU preset's training step,
    # timed side by side: 1-2 % faster).
    feat_flat = mask_feat.reshape(B, D, h * w).unbind(0)  # (B, D, h, w) -> B x (D, h*w)
    order = torch.argsort(img_idx, stable=True)  # requests grouped by image
    counts = torch.bincount(img_idx, minlength=B).tolist()
    chunks, start = [], 0
    for b, count in enumerate(counts):
        if count:
            rows = order[start : start + count]
            chunks.append(torch.addmm(biases[rows], kernels[rows], feat_flat[b]))  # (K_b, h*w)
            start += count
    grouped = torch.cat(chunks)  # (K, h*w) in `order`
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(K, device=order.device)
    return grouped[inverse].reshape(K, h, w)  # back to request order; (K, h*w) -> (K, h, w)


# --------------------------------------------------------------------------------------------
# pure functions: targets (hand-out 6.5)
# --------------------------------------------------------------------------------------------


def instance_scales(boxes: Tensor) -> Tensor:
    """sqrt(w * h) of x1y1x2y2 boxes in padded-input pixels; (N, 4) -> (N,)."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return torch.sqrt(widths * heights)


def mask_centres(masks: Tensor) -> Tensor:
    """Centres of mass (cy, cx) in pixels, pixel (r, c) covering [r, r+1) x [c, c+1).

    The authors (scipy.ndimage.center_of_mass) count pixel r at r, half a pixel above this;
    here a filled box's centre of mass equals its box centre. (N, H, W) -> (N, 2) float64;
    an empty mask gives (0, 0).
    """
    N, H, W = masks.shape
    area = masks.flatten(1).sum(1).double().clamp(min=1)  # (N,)
    rows = masks.sum(2, dtype=torch.float64)  # (N, H) pixels per row
    cols = masks.sum(1, dtype=torch.float64)  # (N, W) pixels per column
    row_pos = torch.arange(H, device=masks.device, dtype=torch.float64) + 0.5
    col_pos = torch.arange(W, device=masks.device, dtype=torch.float64) + 0.5
    return torch.stack([(rows * row_pos).sum(1) / area, (cols * col_pos).sum(1) / area], dim=1)


def centre_cells(
    centre: tuple[float, float],
    half_size: tuple[float, float],
    padded_size: tuple[int, int],
    num_grid: int,
) -> tuple[int, int, int, int]:
    """Rows top..down and columns left..right (inclusive) of an instance's positive cells.

    Cell index = floor(coordinate / padded size * S). The centre region (cy +- half_h,
    cx +- half_w) is clipped to the grid and to the centre cell +- 1 (paper sec. 3.3.1), so at
    most 3 x 3 cells are positive and the centre cell always is.
    """
    (cy, cx), (half_h, half_w), (H, W), S = centre, half_size, padded_size, num_grid

    def cell(value: float, size: int) -> int:
        return min(max(math.floor(value * S / size), 0), S - 1)

    row, col = cell(cy, H), cell(cx, W)
    top = max(cell(cy - half_h, H), row - 1)
    down = min(cell(cy + half_h, H), row + 1)
    left = max(cell(cx - half_w, W), col - 1)
    right = min(cell(cx + half_w, W), col + 1)
    return top, down, left, right


def downsample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Binary masks to a level's mask size: average over each block, then >= 0.5.

    With H, W multiples of the level's size (padded input % 32 == 0) "area" interpolation is
    exactly the average over each (H/h) x (W/w) block; otherwise it averages the overlapping
    pixels. (N, H, W) uint8 -> (N, h, w) uint8 in {0, 1}.
    """
    N = masks.shape[0]
    if N == 0:
        return masks.new_zeros((0, *size))
    soft = F.interpolate(masks[:, None].float(), size=tuple(size), mode="area")  # (N,1,h,w)
    return (soft[:, 0] >= 0.5).to(torch.uint8)  # (N, 1, h, w) -> (N, h, w)


@torch.no_grad()
def target_single_img(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    featmap_sizes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int] | None = None,
    num_grids: Sequence[int] = NUM_GRIDS,
    scale_ranges: Sequence[tuple[float, float]] = SCALE_RANGES,
    epsilon: float = EPSILON,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """SOLO targets of one image on every level (hand-out 6.5.2), positive channels only.

    - scale = sqrt(w h) of the box; level l takes the instance when lower_l <= scale <= upper_l
      (the ranges overlap, so an instance may sit on two levels);
    - centre = the mask's centre of mass; region half-sizes 0.5 eps w and 0.5 eps h;
      positive cells from `centre_cells` (at most 3 x 3 around the centre cell);
    - channel k = i*S + j (row-major); its mask target is the instance mask downsampled to the
      level's (2Hf, 2Wf) by `downsample_masks`, kept binary;
    - skipped on a level: instances with an empty mask, and instances whose mask vanishes at
      that level's size (dice against an empty target is a constant with no gradient);
    - CONFLICT RULE: when two instances claim one cell, the one with the smaller mask area wins
      the cell (category and mask). Instances are written in decreasing mask area (ties: later
      index written last), each overwriting earlier ones: a small object has few cells and is
      hard to recover elsewhere, a large one keeps its other cells and other levels. (The
      authors overwrite in annotation order, which depends on the file.)

    Args:
        gt_boxes: (N, 4) float x1y1x2y2 in padded-input pixels.
        gt_labels: (N,) int64 in 1..C.
        gt_masks: (N, H, W) uint8 {0, 1} in the padded frame.
        featmap_sizes: per level (h_l, w_l) = (2Hf_l, 2Wf_l), the mask-prediction size.
        padded_size: (H, W); default gt_masks' size.
        num_grids, scale_ranges, epsilon: per-level S, (lower, upper), centre-region scale.
    Returns:
        lvl_ins_label: per level (P_l, h_l, w_l) uint8, the P_l positive channels' masks in
            increasing channel index;
        lvl_cate_label: per level (S, S) int64 in 0..C;
        lvl_ins_ind_label: per level (S*S,) bool, True on the positive channels.
    """
    N = gt_labels.shape[0]
    H, W = tuple(padded_size) if padded_size is not None else tuple(gt_masks.shape[-2:])
    if gt_boxes.shape != (N, 4) or gt_masks.shape != (N, H, W):
        raise ValueError(
            f"target_single_img: expected boxes ({N}, 4) and masks ({N}, {H}, {W}) for {N} "
            f"labels, got boxes {tuple(gt_boxes.shape)} and masks {tuple(gt_masks.shape)}"
        )
    if not len(featmap_sizes) == len(num_grids) == len(scale_ranges):
        raise ValueError("featmap_sizes, num_grids and scale_ranges need one entry per level")
    device = gt_masks.device
    gt_labels = gt_labels.to(device=device, dtype=torch.int64)

    # Per-instance scalars as python numbers, fetched once (no device sync per instance).
    boxes = gt_boxes.to(device=device, dtype=torch.float64)
    scales = instance_scales(boxes).tolist()
    half_hs = (0.5 * epsilon * (boxes[:, 3] - boxes[:, 1])).tolist()
    half_ws = (0.5 * epsilon * (boxes[:, 2] - boxes[:, 0])).tolist()
    areas = gt_masks.flatten(1).sum(1)  # (N,) pixel counts
    centres = mask_centres(gt_masks).tolist()  # N x [cy, cx]
    # Decreasing area, so that smaller instances are written last and win shared cells.
    write_order = torch.argsort(areas, descending=True, stable=True).tolist()
    areas = areas.tolist()

    lvl_ins_label, lvl_cate_label, lvl_ins_ind_label = [], [], []
    for size, S, (lower, upper) in zip(featmap_sizes, num_grids, scale_ranges, strict=True):
        size = tuple(int(v) for v in size)
        on_level = [n for n in write_order if areas[n] > 0 and lower <= scales[n] <= upper]
        small_masks = downsample_masks(gt_masks[on_level], size)  # (n_l, h_l, w_l)
        nonempty = small_masks.flatten(1).any(1).tolist()
        # owner[i, j]: index (into gt_*) of the instance that owns cell (i, j), -1 for none.
        owner = torch.full((S, S), -1, dtype=torch.int64)
        row_of = torch.full((max(N, 1),), -1, dtype=torch.int64)  # instance -> small_masks row
        for row, n in enumerate(on_level):
            if not nonempty[row]:
                continue
            top, down, left, right = centre_cells(centres[n], (half_hs[n], half_ws[n]), (H, W), S)
            owner[top : down + 1, left : right + 1] = n
            row_of[n] = row
        owner = owner.to(device)
        ins_ind_label = owner.flatten() >= 0  # (S, S) -> (S*S,)
        if N:
            cate_label = torch.where(owner >= 0, gt_labels[owner.clamp(min=0)], 0)  # (S, S)
        else:
            cate_label = torch.zeros_like(owner)
        pos_rows = row_of.to(device)[owner.flatten()[ins_ind_label]]  # (P,) increasing k
        lvl_ins_label.append(small_masks[pos_rows])  # (P, h_l, w_l)
        lvl_cate_label.append(cate_label)
        lvl_ins_ind_label.append(ins_ind_label)
    return lvl_ins_label, lvl_cate_label, lvl_ins_ind_label


# --------------------------------------------------------------------------------------------
# pure functions: losses (hand-out 6.9)
# --------------------------------------------------------------------------------------------


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    normalizer: float | Tensor = 1.0,
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017) summed over every entry, divided by `normalizer`.

    Equals torchvision.ops.sigmoid_focal_loss(logits, one_hot, alpha, gamma, "sum") /
    normalizer, computed from logits (binary_cross_entropy_with_logits is the stable
    log-sigmoid). Targets 0 are background: all C entries of that row are negatives.

    Normalisers in use (`focal_normalizer`): "positives" = number of positive cells + 1 (the
    authors'); "entries" = N * C, i.e. the mean over entries (the hand-out's 1/(S^2 C)).

    Args:
        logits: (N, C) category logits.
        targets: (N,) int64 in 0..C.
    Returns:
        scalar float32.
    """
    logits = logits.float()
    C = logits.shape[1]
    one_hot = F.one_hot(targets.long(), C + 1)[:, 1:].to(logits.dtype)  # (N, C+1) -> (N, C)
    probs = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")  # (N, C)
    p_t = probs * one_hot + (1 - probs) * (1 - one_hot)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * one_hot + (1 - alpha) * (1 - one_hot)) * loss
    return loss.sum() / normalizer


def focal_normalizer(targets: Tensor, num_classes: int, mode: str = "positives") -> float:
    """The divisor of the summed focal loss; targets (N,) in 0..C, num_classes = C.

    "positives" (authors, default): number of positive cells + 1. The sum is then a loss per
    object, as in RetinaNet: positives are ~0.1 % of the S^2 x C entries, and dividing by all
    entries ("entries", hand-out: 1 / (S^2 C)) makes the category gradient ~1000x smaller than
    the authors' against an unchanged mask loss, so the classifier barely moves at the
    hand-out's learning rate (errata 4).
    """
    if mode == "positives":
        return float((targets > 0).sum().item()) + 1.0
    if mode == "entries":
        return float(max(targets.numel() * num_classes, 1))
    raise ValueError(f"focal_norm must be one of {FOCAL_NORMS}, got {mode!r}")


def dice_loss(pred_probs: Tensor, targets: Tensor, eps: float = 1e-3) -> Tensor:
    """1 - 2 sum(p q) / (sum(p^2) + eps + sum(q^2) + eps) per mask (paper eq. 3, errata 5).

    `eps` (the authors' 0.001) is added to BOTH sums so an empty prediction against an empty
    target is 1 - 0 / (2 eps) = 1 rather than 0 / 0. A perfect binary prediction of area A
    gives eps / (A + eps), about 1e-5 for a 100-pixel mask.

    Args:
        pred_probs: (K, h, w) probabilities.  targets: (K, h, w) {0, 1}.
    Returns:
        (K,) float32 losses.
    """
    K = pred_probs.shape[0]
    p = pred_probs.float().reshape(K, -1) if K else pred_probs.new_zeros((0, 1))  # (K, h*w)
    q = targets.float().reshape(K, -1) if K else p  # (K, h, w) -> (K, h*w)
    inter = (p * q).sum(1)
    return 1 - 2 * inter / ((p * p).sum(1) + eps + (q * q).sum(1) + eps)


def category_loss(
    lvl_cate_preds: Sequence[Tensor],
    img_lvl_cate_label: Sequence[Sequence[Tensor]],
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_norm: str = "positives",
) -> Tensor:
    """The category loss of a batch: `focal_loss` of all cells of all levels and images.

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


def level_positives(
    img_lvl_ins_ind_label: Sequence[Sequence[Tensor]],
    img_lvl_ins_label: Sequence[Sequence[Tensor]],
    level: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The positive (image, cell) pairs of one level and their target masks.

    Image-major, then increasing cell: the order in which `target_single_img` stores the
    positive masks. Returns img_idx (K,) int64, cell_idx (K,) int64 (i*S + j), targets
    (K, h_l, w_l) uint8.
    """
    ins_ind = torch.stack([lvl[level] for lvl in img_lvl_ins_ind_label])  # (B, S*S)
    img_idx, cell_idx = ins_ind.nonzero(as_tuple=True)  # (K,), (K,)
    return img_idx, cell_idx, torch.cat([lvl[level] for lvl in img_lvl_ins_label])


def total_loss(
    cate: Tensor,
    lvl_dice: Sequence[Tensor],
    anchor: Tensor,
    mask_loss_weight: float = 3.0,
    cate_loss_weight: float = 1.0,
) -> dict[str, Tensor | int]:
    """L = cate_w L_cate + mask_w L_mask (hand-out 6.9): L_mask is the mean of the positive
    cells' dice terms, `lvl_dice` (per level (K_l,)); `anchor` an exact zero added to it.

    Returns dict with "total", "cate", "mask" scalars and "num_pos" (int, positive cells). With
    no positive cell the mask loss is the anchor: zero, still connected to the graph.
    """
    num_pos = sum(d.numel() for d in lvl_dice)
    mask = torch.cat(list(lvl_dice)).mean() + anchor if num_pos else anchor
    total = cate_loss_weight * cate + mask_loss_weight * mask
    return {"total": total, "cate": cate, "mask": mask, "num_pos": num_pos}


def check_labels(labels_list: Sequence[Tensor], num_classes: int, who: str) -> None:
    """Raise a ValueError unless every label is a class id in 1..num_classes - 1."""
    labels = torch.cat([lab.reshape(-1) for lab in labels_list])
    if labels.numel() and not (1 <= labels.min() <= labels.max() < num_classes):
        raise ValueError(
            f"{who}: labels must be class ids in 1..{num_classes - 1}, got values "
            f"{labels.min().item()}..{labels.max().item()}"
        )


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


def _conv_gn_relu(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


@dataclass(frozen=True)
class HeadConfig:
    """Every setting a head reads, under `config.Config`'s names; `head_config` makes one from a
    Config, and a head is built from one whole (`SOLOHead(num_classes, head_cfg)`).

    The fields without a Config counterpart: in_channels (the FPN's channels), gn_groups (the
    towers' GroupNorm groups), shared_xy_tower (Decoupled SOLO light), and three settings no
    preset changes (cate_loss_weight, dice_eps, filter_small_masks), which keep their defaults.
    """

    in_channels: int  # F, the FPN's channels
    seg_feat_channels: int  # D, tower width
    stacked_convs: int  # tower depth
    strides: tuple[int, ...]  # per level after NewFPN
    scale_ranges: tuple[tuple[float, float], ...]  # sqrt(w h) bounds per level
    num_grids: tuple[int, ...]  # S per level
    epsilon: float  # centre-region scale
    mask_loss_weight: float  # lambda
    focal_alpha: float
    focal_gamma: float
    focal_norm: str  # "positives" (authors) or "entries" (hand-out); `focal_normalizer`
    init: str  # "authors" or "xavier" (hand-out); `InstanceHead._init_weights`
    gn_groups: int
    cate_thresh: float  # post-processing (hand-out 6.10) ...
    ins_thresh: float
    pre_nms_num: int
    keep_instance: int
    nms_kernel: str
    nms_sigma: float
    update_thresh: float  # ... drop decayed scores below this
    kernel_channels: int  # SOLOv2: E, mask-feature channels = length of a dynamic kernel
    mask_feat_channels: int  # SOLOv2: width of the mask-feature branch
    mask_loss_stride: int  # SOLOv2: 4 (authors), 2 or 1; see `SOLOv2Head`
    shared_xy_tower: bool = False  # Decoupled SOLO: one X/Y tower (light) or two
    cate_loss_weight: float = 1.0
    dice_eps: float = 1e-3  # added to both denominator sums of the dice loss (authors)
    # Drop candidates whose binary mask (at H/4 x W/4) has no more pixels than its level's
    # stride, as the authors' get_seg_single does.
    filter_small_masks: bool = True

    def __post_init__(self):
        # tuples, never lists (a checkpoint's json gives lists)
        object.__setattr__(self, "strides", tuple(self.strides))
        object.__setattr__(self, "scale_ranges", tuple(tuple(r) for r in self.scale_ranges))
        object.__setattr__(self, "num_grids", tuple(self.num_grids))
        if not len(self.scale_ranges) == len(self.num_grids) == len(self.strides) == 5:
            raise ValueError("strides, scale_ranges and num_grids need 5 entries (P2..P6)")
        if self.focal_norm not in FOCAL_NORMS:
            raise ValueError(f"focal_norm must be one of {FOCAL_NORMS}, got {self.focal_norm!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.mask_loss_stride not in (1, 2, 4):
            raise ValueError(f"mask_loss_stride must be 1, 2 or 4, got {self.mask_loss_stride!r}")


def head_config(cfg: Config) -> HeadConfig:
    """The head settings of a `config.Config`: its fields of the same names, the FPN's channels
    as the head's input, GroupNorm groups min(32, D), and the shared X/Y tower of
    `decoupled_solo_light`."""
    shared = {f.name for f in fields(HeadConfig)} & {f.name for f in fields(Config)}
    return HeadConfig(
        **{name: getattr(cfg, name) for name in shared},
        in_channels=cfg.fpn_channels,
        gn_groups=min(32, cfg.seg_feat_channels),
        shared_xy_tower=cfg.model == "decoupled_solo_light",
    )


class InstanceHead(nn.Module):
    """What SOLO, Decoupled SOLO and SOLOv2 share; the heads differ only where the papers do.

    A head defines its layers (`_init_layers`), the convs whose bias starts at the focal prior
    (`prior_convs`), `forward(fpn_feats, eval)` -> a tuple whose first entry is the per-level
    category maps, and `cell_masks`: the masks of given cells of one level, the one place where
    a head's masks are made, used by the loss, by post-processing and by the ONNX export. This
    class holds the rest: the targets, the loss (labels checked, targets, category focal loss,
    the dice of the positive cells' masks), the post-processing (candidates, their masks,
    `postprocess.finish_single`) and, in one block at the end, the hand-out's method names.

    `eval` is the hand-out's flag and independent of `nn.Module.train()/eval()` (GroupNorm
    has no running statistics); a validation loss uses eval=False under torch.no_grad().
    """

    model = "solo"  # the config.MODELS entry whose cis680 settings a bare head takes

    def __init__(self, num_classes: int = 4, cfg: HeadConfig | None = None, **overrides):
        """num_classes: C + 1, counting background (hand-out: 4 = 3 classes + background).
        cfg: the head's settings (`head_config`); default the cis680 preset's for this head's
        model (the hand-out's, the authors' for Decoupled SOLO and SOLOv2). overrides: fields
        of HeadConfig to change (`pre_NMS_num`, the hand-out's spelling, is pre_nms_num)."""
        super().__init__()
        if "pre_NMS_num" in overrides:
            overrides["pre_nms_num"] = overrides.pop("pre_NMS_num")
        cfg = replace(cfg or head_config(model_config(CIS680, self.model)), **overrides)
        self.num_classes = num_classes
        self.cate_out_channels = num_classes - 1
        # Every setting as a plain attribute (head.num_grids, head.ins_thresh, ...), settable.
        for f in fields(cfg):
            setattr(self, f.name, getattr(cfg, f.name))
        self._init_layers()
        self._init_weights()

    # --- network ---

    def _init_layers(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define its layers")

    def prior_convs(self) -> list[nn.Conv2d]:
        """The output convs whose bias starts at the focal prior under init="authors"."""
        return [self.cate_out]

    def _tower(self, in_channels: int) -> nn.Sequential:
        """stacked_convs x (conv3x3 D, GroupNorm, ReLU), the first from `in_channels`."""
        D, G = self.seg_feat_channels, self.gn_groups
        return nn.Sequential(
            *[_conv_gn_relu(in_channels if i == 0 else D, D, G) for i in range(self.stacked_convs)]
        )

    def _init_weights(self) -> None:
        """Two choices (`init`); GroupNorm keeps weight 1, bias 0 in both.

        "authors" (default; WXinlong/SOLO, the RetinaNet init): conv weights normal(0, 0.01),
        zero biases, and the biases of `prior_convs` at the prior -log((1 - 0.01) / 0.01) =
        -log(99). Every category starts at p = 0.01, so the focal loss of the ~99.9 % negative
        entries starts small instead of swamping the first steps with a huge, noisy gradient.
        "xavier" (hand-out 6.1.3): xavier_uniform_ weights, zero biases (every p near 0.5).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if self.init == "authors":
                    nn.init.normal_(module.weight, mean=0.0, std=0.01)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.init == "authors":
            prior_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
            for conv in self.prior_convs():
                nn.init.constant_(conv.bias, prior_bias)

    def forward(self, fpn_feats: Sequence[Tensor], eval: bool = False) -> tuple[list, ...]:
        """fpn_feats: [P2..P6] from the backbone, (B, F, H/4..H/64, ...) -> the head's outputs,
        per level, from `forward_single_level` on the NewFPN levels (SOLO, Decoupled SOLO;
        SOLOv2 adds its mask-feature branch). eval=True: the level-0 mask size H/4 x W/4 is
        every level's (`upsampled_size`)."""
        feats = self.NewFPN(fpn_feats)
        Hf0, Wf0 = feats[0].shape[-2:]
        return self.MultiApply(
            self.forward_single_level,
            feats,
            range(len(feats)),
            eval=eval,
            upsampled_size=(2 * Hf0, 2 * Wf0),  # H/4 x W/4: the level-0 mask size
        )

    def cell_masks(
        self, preds: tuple, level: int, img_idx: Tensor, cell_idx: Tensor, eval: bool = False
    ) -> Tensor:
        """The soft masks of cells `cell_idx` (K,) (i*S + j on `level`) of images `img_idx`
        (K,), from `forward(..., eval)` output: (K, h, w) float32 probabilities, at the level's
        mask size in training and at H/4 x W/4 with eval=True."""
        raise NotImplementedError(f"{type(self).__name__} must define cell_masks")

    # --- targets (hand-out 6.5) ---

    def target(
        self,
        lvl_featmap_sizes: Sequence[tuple[int, int]],
        boxes_list: Sequence[Tensor],
        labels_list: Sequence[Tensor],
        masks_list: Sequence[Tensor],
        padded_size: tuple[int, int] | None = None,
    ) -> tuple[list[list[Tensor]], list[list[Tensor]], list[list[Tensor]]]:
        """Targets of a batch: `target_single_img` per image (via MultiApply).

        lvl_featmap_sizes: per level the mask size (h_l, w_l). Returns (img_lvl_ins_label,
        img_lvl_cate_label, img_lvl_ins_ind_label): per image, per level (P, h_l, w_l) uint8,
        (S, S) int64, (S*S,) bool.
        """
        sizes = [tuple(int(v) for v in size) for size in lvl_featmap_sizes]
        return self.MultiApply(
            self.target_single_img,
            boxes_list,
            labels_list,
            masks_list,
            featmap_sizes=sizes,
            padded_size=padded_size,
        )

    def target_single_img(
        self,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_masks: Tensor,
        featmap_sizes: Sequence[tuple[int, int]],
        padded_size: tuple[int, int] | None = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """One image with this head's grids, ranges and epsilon; see `target_single_img`."""
        return target_single_img(
            gt_boxes,
            gt_labels,
            gt_masks,
            featmap_sizes,
            padded_size,
            self.num_grids,
            self.scale_ranges,
            self.epsilon,
        )

    def mask_target_sizes(self, preds: tuple) -> list[tuple[int, int]]:
        """Per level the size of the masks the dice loss compares: the size of the level's
        mask outputs, preds[1] (SOLO: mask features, Decoupled SOLO: X)."""
        return [tuple(p.shape[-2:]) for p in preds[1]]

    # --- loss (hand-out 6.9) ---

    def loss(
        self,
        preds: tuple,
        boxes_list: Sequence[Tensor],
        labels_list: Sequence[Tensor],
        masks_list: Sequence[Tensor],
        padded_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor | int]:
        """Build the targets and compute L = L_cate + 3 L_mask for a batch.

        preds: `forward(..., eval=False)` output. boxes_list / labels_list / masks_list: per
        image (N, 4) / (N,) / (N, H, W) as in the data-set contract; padded_size defaults to
        the masks' (H, W). Returns dict(total=, cate=, mask=, num_pos=); see `total_loss`.
        """
        if padded_size is None:
            padded_size = tuple(masks_list[0].shape[-2:])
        check_labels(labels_list, self.num_classes, f"{type(self).__name__}.loss")
        device = preds[0][0].device
        img_ins, img_cate, img_ind = self.target(
            self.mask_target_sizes(preds),
            [b.to(device) for b in boxes_list],
            [lab.to(device) for lab in labels_list],
            [m.to(device) for m in masks_list],
            padded_size,
        )
        cate = category_loss(
            preds[0], img_cate, self.focal_alpha, self.focal_gamma, self.focal_norm
        )
        lvl_dice = self.positive_dice(preds, img_ins, img_ind)
        # An exact zero that keeps every parameter of the head in the graph, also on levels (or
        # whole batches) without positives: DistributedDataParallel needs a gradient for each.
        anchor = 0.0 * sum(p.float().sum() for p in self.parameters())
        return total_loss(cate, lvl_dice, anchor, self.mask_loss_weight, self.cate_loss_weight)

    def positive_dice(self, preds: tuple, img_ins: Sequence, img_ind: Sequence) -> list[Tensor]:
        """The dice terms of the positive cells' masks against their targets, level by level
        (`cell_masks` of the training outputs): a list of (K_l,) for the levels with any.
        img_ins / img_ind: `target`'s img_lvl_ins_label / img_lvl_ins_ind_label."""
        lvl_dice = []
        for level in range(len(self.num_grids)):
            img_idx, cell_idx, targets = level_positives(img_ind, img_ins, level)
            if img_idx.numel():
                probs = self.cell_masks(preds, level, img_idx, cell_idx)
                lvl_dice.append(dice_loss(probs, targets, self.dice_eps))
        return lvl_dice

    # --- inference (hand-out 6.10) ---

    # Resize the kept masks' logits, not their probabilities (`postprocess.finish_single`);
    # a head that does gives them from `candidate_masks`.
    resize_logits = False

    @torch.no_grad()
    def PostProcess(
        self,
        preds: tuple,
        metas: Sequence[dict] | None = None,
        padded_size: tuple[int, int] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Per-image instances from `forward(..., eval=True)` output (hand-out 6.10.1).

        preds: the head's eval outputs, each a tensor or a per-level list of tensors with the
        batch first; the last is at H/4 x W/4. metas: per image dicts with "input_size" (h, w)
        and "orig_size" (h0, w0) (default: the padded size, no resize). padded_size: (H, W),
        default 4 x (h4, w4).
        Returns per image dict(masks (k, h0, w0) uint8, labels (k,) int64 in 1..C, scores (k,)).
        """
        last = preds[-1] if isinstance(preds[-1], Tensor) else preds[-1][0]
        B = last.shape[0]
        h4, w4 = last.shape[-2:]
        padded_size = tuple(padded_size) if padded_size is not None else (4 * h4, 4 * w4)
        results = []
        for b in range(B):
            input_size, orig_size = image_sizes(metas[b] if metas else None, padded_size)
            results.append(
                self.PostProcessImg(one_image(preds, b), input_size, padded_size, orig_size)
            )
        return results

    @torch.no_grad()
    def PostProcessImg(
        self,
        preds: tuple,
        input_size: tuple[int, int],
        padded_size: tuple[int, int],
        orig_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        """One image (hand-out 6.10.2): candidates, their masks only, then `finish_candidates`.

        preds: the eval outputs of a batch of this one image (`one_image`).
        """
        cell_idx, labels, scores = self.candidates([c[0] for c in preds[0]])
        probs, logits = self.candidate_masks(preds, cell_idx)  # (n, h4, w4) each
        level_of, _ = cell_levels(cell_idx, self.num_grids)
        return self.finish_candidates(
            probs, labels, scores, level_of, input_size, padded_size, orig_size, logits
        )

    def candidates(self, lvl_cate_scores: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(cell_idx, labels, scores) of the (cell, class) entries above cate_thresh.

        lvl_cate_scores: per level (C, S, S) after point NMS. Cells are numbered over all
        levels: level by level, row-major in each (`cell_levels` splits the numbers).
        """
        C = lvl_cate_scores[0].shape[0]
        # per level (C, S, S) -> (S*S, C), then all levels: (sum S^2, C)
        cate_scores = torch.cat([c.permute(1, 2, 0).reshape(-1, C) for c in lvl_cate_scores])
        return postprocess.select_candidates(cate_scores, self.cate_thresh)

    def candidate_masks(
        self, preds: tuple, cell: Tensor, static: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(probabilities, logits) (n, h4, w4) of cells `cell` (n,) numbered over all levels,
        from the eval outputs of a batch of one image; the logits only where the head resizes
        them (`resize_logits`), else None.

        static=False (PyTorch): each level computes only its own cells. static=True (the ONNX
        graph, whose shapes may not depend on the data): every level computes every cell and
        each cell keeps its own level's, L times the work.
        """
        level_of, local = cell_levels(cell, self.num_grids)
        zeros = torch.zeros_like(cell)
        out = None
        for level, S in enumerate(self.num_grids):
            if static:
                values = self.cell_masks(preds, level, zeros, local.clamp(max=S * S - 1), True)
                on_level = (level_of == level)[:, None, None]
                out = values if out is None else torch.where(on_level, values, out)
                continue
            rows = (level_of == level).nonzero(as_tuple=True)[0]
            values = self.cell_masks(preds, level, zeros[rows], local[rows], True)
            if out is None:
                out = values.new_zeros((cell.numel(), *values.shape[-2:]))
            out[rows] = values
        return out, None

    def finish_candidates(
        self,
        mask_probs: Tensor,
        labels: Tensor,
        scores: Tensor,
        level_of: Tensor,
        input_size: tuple[int, int],
        padded_size: tuple[int, int],
        orig_size: tuple[int, int],
        mask_logits: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """`postprocess.finish_single` with this head's settings; mask_probs (n, h4, w4) of the
        candidates, level_of (n,) their levels (for the small-mask filter); mask_logits: their
        logits, to resize those instead of the probabilities (see `finish_single`)."""
        strides = None
        if self.filter_small_masks:
            strides = torch.tensor(self.strides, device=level_of.device)[level_of]
        return postprocess.finish_single(
            mask_probs,
            labels,
            scores,
            ins_thresh=self.ins_thresh,
            pre_nms_num=self.pre_nms_num,
            keep_instance=self.keep_instance,
            nms_kernel=self.nms_kernel,
            nms_sigma=self.nms_sigma,
            input_size=input_size,
            padded_size=padded_size,
            orig_size=orig_size,
            update_thresh=self.update_thresh,
            strides=strides,
            mask_logits=mask_logits,
        )

    # --- the hand-out's names (section 6): thin aliases, for students who look for them ---

    def NewFPN(self, fpn_feat_list: Sequence[Tensor]) -> list[Tensor]:
        """Strides [4, 8, 16, 32, 64] -> [8, 8, 16, 32, 32]; `new_fpn`."""
        return new_fpn(fpn_feat_list)

    @staticmethod
    def MultiApply(func: Callable, *args, **kwargs) -> tuple[list, ...]:
        """The hand-out's sequential map + transpose; `multi_apply`."""
        return multi_apply(func, *args, **kwargs)

    def DiceLoss(self, mask_pred: Tensor, mask_gt: Tensor) -> Tensor:
        """`dice_loss` of probabilities against binary targets, (K, h, w) or (h, w) -> (K,) / ()."""
        if mask_pred.dim() == 2:
            return dice_loss(mask_pred[None], mask_gt[None], self.dice_eps)[0]
        return dice_loss(mask_pred, mask_gt, self.dice_eps)

    def FocalLoss(self, cate_preds: Tensor, cate_gts: Tensor) -> Tensor:
        """`focal_loss` of logits (N, C) against labels (N,) in 0..C, this head's normaliser."""
        normalizer = focal_normalizer(cate_gts, self.cate_out_channels, self.focal_norm)
        return focal_loss(cate_preds, cate_gts, self.focal_alpha, self.focal_gamma, normalizer)

    def points_nms(self, heat: Tensor) -> Tensor:
        """2x2 point NMS per class channel, (B, C, S, S) -> (B, C, S, S); `postprocess`."""
        return postprocess.points_nms(heat)

    def MatrixNMS(self, sorted_ins: Tensor, sorted_labels: Tensor, sorted_scores: Tensor):
        """Class-aware Matrix NMS: masks (n, h, w), labels (n,), scores (n,) -> decayed (n,)."""
        return postprocess.matrix_nms(
            sorted_ins, sorted_labels, sorted_scores, self.nms_kernel, self.nms_sigma
        )

    def PlotGT(self, img, lvl_ins_label, lvl_ins_ind_label, lvl_cate_label, class_names):
        """Per-level ground-truth figure of one image; `plot_gt`."""
        return plot_gt(
            img, lvl_ins_label, lvl_ins_ind_label, lvl_cate_label, class_names, self.strides
        )

    def PlotInfer(self, img, result, class_names, title=None):
        """Predicted instances of one image (a `PostProcess` result) over it; a Figure."""
        return draw_instances(
            img,
            result["masks"],
            result["labels"],
            class_names,
            scores=result["scores"],
            title=title,
        )

    @property
    def pre_NMS_num(self) -> int:
        """The hand-out's spelling of `pre_nms_num`."""
        return self.pre_nms_num

    @pre_NMS_num.setter
    def pre_NMS_num(self, value: int) -> None:
        self.pre_nms_num = value


def one_image(preds: tuple, b: int) -> tuple:
    """Image b of a head's outputs (each a tensor or a per-level list of tensors, the batch
    first) as the outputs of a batch of that one image."""
    return tuple(
        p[b : b + 1] if isinstance(p, Tensor) else [t[b : b + 1] for t in p] for p in preds
    )


class SOLOHead(InstanceHead):
    """SOLO category and mask branches over the five pyramid levels (hand-out 6.1-6.11).

    `forward(fpn_feats, eval=False)` -> (lvl_cate_preds, lvl_mask_feats): per level (B, C, S, S)
    category logits and (B, D, 2Hf_l, 2Wf_l) mask-tower features (the 1x1 output conv
    `mask_out[l]` is applied later, only where needed, by `cell_masks`); eval=True: the
    category maps are probabilities after point NMS. At inference a candidate's mask is the
    sigmoid of its logits at its level's size, then resized to H/4 x W/4, in the authors' order
    (resizing the logits first, as this head once did, moved probabilities by up to 8e-3 on
    levels 2-4 and changed a third of the final masks of a released model).
    """

    model = "solo"

    def _init_layers(self) -> None:
        """Category tower (in -> D), mask tower (in + 2 -> D), output convs (hand-out 6.1.2)."""
        D = self.seg_feat_channels
        self.cate_convs = self._tower(self.in_channels)
        self.mask_convs = self._tower(self.in_channels + 2)
        self.cate_out = nn.Conv2d(D, self.cate_out_channels, 3, padding=1)
        # One 1x1 conv (no padding, hand-out update) per level: S^2 output channels each.
        self.mask_out = nn.ModuleList([nn.Conv2d(D, S * S, 1) for S in self.num_grids])

    def prior_convs(self) -> list[nn.Conv2d]:
        return [self.cate_out, *self.mask_out]

    # --- forward (hand-out 6.2-6.4) ---

    def forward_single_level(
        self, feat: Tensor, level: int, eval: bool = False, upsampled_size: Size | None = None
    ) -> tuple[Tensor, Tensor]:
        """One level: feat (B, in, Hf, Wf) -> (cate (B, C, S, S), mask feat (B, D, 2Hf, 2Wf)).

        eval=True: cate is sigmoid + point NMS. `upsampled_size` is not used: the masks are
        resized after their sigmoid, in `cell_masks`.
        """
        B, _, Hf, Wf = feat.shape
        S = self.num_grids[level]
        # Category branch: the grid is the feature map resized to S x S (paper sec. 3.2).
        cate_feat = F.interpolate(feat, size=(S, S), mode="bilinear", align_corners=False)
        cate_pred = self.cate_out(self.cate_convs(cate_feat))  # (B, C, S, S) logits
        # Mask branch: CoordConv input, tower, x2 upsample (stride 8 -> 4 on levels 0-1).
        coords = coord_channels(B, Hf, Wf, feat)  # (B, 2, Hf, Wf)
        mask_feat = self.mask_convs(torch.cat([feat, coords], dim=1))  # (B, D, Hf, Wf)
        mask_feat = F.interpolate(
            mask_feat, size=(2 * Hf, 2 * Wf), mode="bilinear", align_corners=False
        )  # (B, D, 2Hf, 2Wf)
        if eval:
            cate_pred = self.points_nms(torch.sigmoid(cate_pred))
        return cate_pred, mask_feat

    def cell_masks(
        self, preds: tuple, level: int, img_idx: Tensor, cell_idx: Tensor, eval: bool = False
    ) -> Tensor:
        """sigmoid of row cell_idx[k] of the level's 1x1 output conv on image img_idx[k]'s mask
        features (`mask_logits_for_cells`): (K, h_l, w_l); eval=True: then resized to the
        level-0 size H/4 x W/4, the authors' order (sigmoid first, then the bilinear resize)."""
        conv = self.mask_out[level]
        feat = preds[1][level]
        logits = mask_logits_for_cells(feat, img_idx, cell_idx, conv.weight, conv.bias)
        probs = torch.sigmoid(logits.float())  # (K, h_l, w_l)
        size = tuple(preds[1][0].shape[-2:])  # H/4 x W/4
        if eval and tuple(probs.shape[-2:]) != size:
            probs = F.interpolate(probs[:, None], size=size, mode="bilinear", align_corners=False)
            probs = probs[:, 0]  # (K, 1, h4, w4) -> (K, h4, w4)
        return probs

    def mask_logits(self, mask_feat: Tensor, level: int) -> Tensor:
        """All S^2 mask logits of a level (the hand-out's ins_pred): (B,D,h,w) -> (B,S^2,h,w).

        Memory-hungry at full resolution; for plots and tests. Training and inference use
        `cell_masks`.
        """
        conv = self.mask_out[level]
        return mask_logits_full(mask_feat, conv.weight, conv.bias)


# --------------------------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------------------------


def plot_gt(img, lvl_ins_label, lvl_ins_ind_label, lvl_cate_label, class_names, strides=STRIDES):
    """Figure of one image's targets, one panel per level (hand-out 6.6); via visualize.

    img (3, H, W) normalised; per level (P, 2Hf, 2Wf) / (S*S,) / (S, S) as `target_single_img`
    returns them; strides per level.
    """
    return plot_gt_levels(
        img, lvl_ins_label, lvl_ins_ind_label, lvl_cate_label, strides, class_names
    )


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[Path]:
    """Save the per-level ground-truth plots of a few images (hand-out Part A); returns the
    paths of the PNGs."""
    parser = argparse.ArgumentParser(description="Plot SOLO targets per pyramid level.")
    parser.add_argument("--out", default="outputs/gt_levels", help="folder for the PNGs")
    parser.add_argument("--num", type=int, default=5, help="images to plot")
    parser.add_argument(
        "--cis680",
        default="",
        metavar="PREFIX",
        help="CIS680 file prefix (default: the built-in data set)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="resize before padding to a multiple of 32 (default: the model's, 800 1066 for SOLO)",
    )
    parser.add_argument(
        "--model",
        default="solo",
        choices=MODELS,
        help="whose targets: SOLOv2's masks are at H/4 x W/4 on every level; the light models "
        "use their scale ranges and input size (config.model_config of the --preset)",
    )
    parser.add_argument(
        "--preset",
        default="cis680",
        choices=["auto", *PRESETS],
        help="whose grids, scale ranges and input size (default: the hand-out's, cis680)",
    )
    args = parser.parse_args(argv)
    base = preset(args.preset)
    model_cfg = model_config(base, args.model)
    size = tuple(args.size) if args.size else tuple(model_cfg.input_size)

    if args.cis680:
        prefix = args.cis680
    else:
        prefix = ensure_builtin_dataset()
    data = dataset.BuildDataset(prefix, size=size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Images with several objects first, so the plots show shared cells and several levels.
    counts = [(len(data.labels[data.indices[i]]), i) for i in range(min(len(data), 10 * args.num))]
    chosen = [i for _, i in sorted(counts, key=lambda t: -t[0])[: args.num]]
    saved = []
    for i in sorted(chosen):
        img, labels, masks, boxes, meta = data[i]
        padded_size = tuple(img.shape[-2:])
        sizes = featmap_sizes_for(padded_size, model_cfg.strides)
        if args.model.startswith("solov2"):  # SOLOv2: every level's masks at H/4 x W/4
            sizes = [(padded_size[0] // 4, padded_size[1] // 4)] * len(sizes)
        ins, cate, ind = target_single_img(
            boxes,
            labels,
            masks,
            sizes,
            padded_size,
            model_cfg.num_grids,
            model_cfg.scale_ranges,
            model_cfg.epsilon,
        )
        fig = plot_gt(img, ins, ind, cate, data.class_names, model_cfg.strides)
        path = out / f"gt_levels_{i:04d}.png"
        fig.savefig(path, dpi=80)
        saved.append(path)
        print(
            f"{path}: {len(labels)} objects, positive cells per level {[int(x.sum()) for x in ind]}"
        )
    print(f"saved {len(chosen)} ground-truth plots to {out}/")
    return saved


if __name__ == "__main__":
    main()
