"""SOLO inference post-processing: point NMS, Matrix NMS and per-image finishing.

Hand-out section 6.10 (PostProcess, PostProcessImg, MatrixNMS, points_nms), with the errata
in shared/seeds/README.md applied: Matrix NMS is class-aware, its compensation term is each
suppressor's own largest IoU with a higher-scored mask of its class, and no decay factor is
above 1. The order of the steps in `finish_single` follows the authors' `get_seg_single`
(SOLO, Wang et al. 2020, section 3.3 / SOLOv2 section 4): threshold the category scores,
binarise the masks, weight the scores by maskness, keep the top few, Matrix NMS, keep the
top `keep_instance`, and only then resize the few survivors to the original image size.

Nothing here is runnable on its own; `solo_head.py` calls these functions and
`tests/test_postprocess.py` checks them on hand-built inputs with known answers.

Shape legend:
    B  batch             C  classes without background (labels are 1..C, 0 = background)
    S  grid size         K  grid cells of all levels together (sum of S*S)
    n  candidate masks   k  kept instances after NMS
    h4 x w4  mask-prediction size (H/4 x W/4 of the padded input)
    H x W    padded input size     h x w  input size before padding (padding bottom/right)
    h0 x w0  original image size
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# --- config ------------------------------------------------------------------------------

NMS_KERNELS = ("gaussian", "linear")  # Matrix NMS decay functions (SOLOv2 Eq. 4)


# --- point NMS ---------------------------------------------------------------------------


def points_nms(heat: Tensor) -> Tensor:
    """Suppress category scores that are not a 2x2 local maximum (hand-out 6.10.4).

    A 2x2 max-pool with stride 1 and padding 1 gives, at output index (i, j), the maximum of
    input cells (i-1..i, j-1..j); the top-left S x S block of it is compared with `heat`. So a
    cell survives when it is >= its upper, left and upper-left neighbours (each class channel on
    its own). Ties keep every tied cell: a flat 2x2 block survives whole. A peak's right, lower
    and lower-right neighbours are zeroed; its upper and left neighbours are only compared with
    their own upper/left neighbours (the authors' one-sided 2x2 window, kept as is).

    Args:
        heat: (B, C, S, S) category probabilities.
    Returns:
        (B, C, S, S) `heat` with the suppressed cells set to 0.
    """
    if heat.dim() != 4:
        raise ValueError(f"points_nms: heat must be (B, C, S, S), got shape {tuple(heat.shape)}.")
    pooled = F.max_pool2d(heat, kernel_size=2, stride=1, padding=1)  # (B, C, S+1, S+1)
    keep = pooled[..., :-1, :-1] == heat  # (B, C, S, S)
    return heat * keep


# --- Matrix NMS --------------------------------------------------------------------------


def mask_ious(masks: Tensor, mask_area: Tensor | None = None) -> Tensor:
    """IoU of every pair of binary masks, from one (n, h*w) float matmul.

    Args:
        masks: (n, h, w) binary masks (bool, uint8 or float 0/1).
        mask_area: optional (n,) pixel counts of `masks` (saves a sum when already known).
    Returns:
        (n, n) float IoU matrix; a pair of empty masks has IoU 0.
    """
    n = masks.shape[0]
    flat = masks.reshape(n, -1).float()  # (n, h, w) -> (n, h*w)
    area = flat.sum(dim=1) if mask_area is None else mask_area.to(flat)  # (n,)
    inter = flat @ flat.T  # (n, n) pixel counts, exact in float32 below 2**24 pixels
    union = area[:, None] + area[None, :] - inter  # (n, n)
    return inter / union.clamp(min=1e-6)


def check_kernel(kernel: str, who: str) -> None:
    """Raise a ValueError naming `who` unless `kernel` is a Matrix NMS decay function."""
    if kernel not in NMS_KERNELS:
        raise ValueError(f"{who}: the NMS kernel must be one of {NMS_KERNELS}, got {kernel!r}.")


def matrix_nms_decay_sorted(
    masks: Tensor,
    labels: Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    mask_area: Tensor | None = None,
) -> Tensor:
    """The decay factors of Matrix NMS for masks already sorted by decreasing score.

    The whole of `matrix_nms` but the sort, with static shapes and no data-dependent branch,
    so that `export.py` traces the same function into its ONNX graph. Masks after the last
    real one (padding, lowest scores) never lower the decay of an earlier mask: only
    higher-ranked masks decay a mask, and every other row of the decay matrix is >= 1.

    Args:
        masks: (n, h, w) binary masks, sorted by decreasing score (ties: input order).
        labels: (n,) class ids in the same order.
        kernel, sigma, mask_area: as `matrix_nms`.
    Returns:
        (n,) decay factors in [0, 1], aligned with the sorted input.
    """
    n = masks.shape[0]
    # ious[i, j]: IoU of a higher-scored mask i with a lower-scored mask j of the same class.
    ious = mask_ious(masks, mask_area).triu(diagonal=1)  # (n, n)
    same_class = labels[:, None] == labels[None, :]  # (n, n)
    ious = ious * same_class
    # cmax_i: how much mask i is itself suppressed; row i of the compensation holds cmax_i.
    cmax = ious.max(dim=0).values  # (n,)
    comp = cmax[:, None].expand(n, n)  # (n, n)
    if kernel == "gaussian":
        decay_matrix = torch.exp(-sigma * (ious**2 - comp**2))
    else:
        # An exact duplicate of a higher mask has cmax = 1; eps keeps 0/0 out of the min.
        decay_matrix = (1 - ious) / (1 - comp).clamp(min=1e-6)
    # Rows that are not a higher-scored same-class mask give >= 1, and row 0 (the top mask,
    # cmax 0) gives <= 1 in every column, so the column minimum is already <= 1; the clamp
    # only guards rounding.
    return decay_matrix.min(dim=0).values.clamp(max=1.0)  # (n,)


def matrix_nms(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    mask_area: Tensor | None = None,
) -> Tensor:
    """Class-aware Matrix NMS (SOLOv2 section 4, Eq. 4; errata items 1-3).

    For mask j, decay_j = min(1, min_i f(iou_ij) / f(cmax_i)) over the masks i of j's class that
    score higher than j, where cmax_i is mask i's own largest IoU with a higher-scored mask of
    its class. Kernels: gaussian f(x) = exp(-sigma * x**2) (sigma = 2 is the hand-out's
    exp(-(iou**2 - cmax**2) / 0.5)), linear f(x) = 1 - x. Everything is one (n, n) matrix, no
    loop over masks.

    Scores may come in any order: they are sorted internally (stable, descending, so among equal
    scores the earlier input counts as higher-scored) and the result is aligned with the input.

    Args:
        masks: (n, h, w) binary masks (bool, uint8 or float 0/1).
        labels: (n,) class ids; only masks with equal labels decay each other.
        scores: (n,) scores.
        kernel: "gaussian" or "linear".
        sigma: gaussian kernel width (the authors' 2.0).
        mask_area: optional (n,) pixel counts of `masks`.
    Returns:
        (n,) decayed scores, scores * decay with 0 <= decay <= 1, in the input order.
    """
    check_kernel(kernel, "matrix_nms")
    n = scores.shape[0]
    if masks.shape[0] != n or labels.shape[0] != n:
        raise ValueError(
            f"matrix_nms: masks {tuple(masks.shape)}, labels {tuple(labels.shape)} and scores "
            f"{tuple(scores.shape)} must have the same first size n."
        )
    if n == 0:
        return scores.new_zeros(0)

    order = torch.argsort(scores, descending=True, stable=True)  # (n,)
    sorted_scores = scores[order]
    area = None if mask_area is None else mask_area[order]
    decay = matrix_nms_decay_sorted(masks[order], labels[order], kernel, sigma, area)  # (n,)
    decayed = torch.empty_like(sorted_scores)
    decayed[order] = sorted_scores * decay
    return decayed


# --- candidates and per-image finishing --------------------------------------------------


def select_candidates(cate_scores: Tensor, cate_thresh: float) -> tuple[Tensor, Tensor, Tensor]:
    """Every (cell, class) entry above the threshold is a candidate instance.

    A cell can give several candidates (one per class above the threshold); they share the
    cell's mask. Candidates come in row-major (cell, class) order.

    Args:
        cate_scores: (K, C) category probabilities of all levels, flattened cell by cell.
        cate_thresh: keep entries strictly above this.
    Returns:
        cell_idx (n,) int64 row of `cate_scores` (mask channel), labels (n,) int64 in 1..C,
        scores (n,) the selected probabilities.
    """
    if cate_scores.dim() != 2:
        raise ValueError(
            f"select_candidates: cate_scores must be (K, C), got {tuple(cate_scores.shape)}."
        )
    hits = (cate_scores > cate_thresh).nonzero()  # (n, 2) rows (cell, class index 0..C-1)
    cell_idx, class_idx = hits[:, 0], hits[:, 1]
    return cell_idx, class_idx + 1, cate_scores[cell_idx, class_idx]


def logit(p: float) -> float:
    """log(p / (1 - p)): the logit threshold equivalent to probability threshold p."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"logit: p must lie strictly between 0 and 1, got {p!r}")
    return math.log(p / (1.0 - p))


def _empty_result(orig_size: tuple[int, int], device: torch.device) -> dict[str, Tensor]:
    """(0, h0, w0) uint8 masks, (0,) int64 labels, (0,) float32 scores."""
    h0, w0 = orig_size
    return {
        "masks": torch.zeros((0, h0, w0), dtype=torch.uint8, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
        "scores": torch.zeros(0, dtype=torch.float32, device=device),
    }


def resize_matrix(n_in: int, n_padded: int, n_crop: int, n_out: int) -> Tensor:
    """One axis of `resize_masks` as a matrix: (n_out, n_in), output = matrix @ input.

    The axis' three steps (linear upsampling n_in -> n_padded, keeping the first n_crop,
    linear resize to n_out; align_corners=False, as F.interpolate's bilinear does per axis)
    are one linear map; applying the steps to the identity gives its matrix.
    """
    eye = torch.eye(n_in).unsqueeze(1)  # (n_in, 1, n_in): signal i is the i-th unit vector
    up = F.interpolate(eye, size=n_padded, mode="linear", align_corners=False)[..., :n_crop]
    return F.interpolate(up, size=n_out, mode="linear", align_corners=False)[:, 0].T


def tap_ranges(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(first, last) (n_out,): the first and last input with a nonzero weight in each row of a
    resize matrix (n_out, n_in). Bilinear maps are banded and monotone: output o reads inputs
    first[o]..last[o] only, and both bounds grow with o (tests/test_postprocess.py checks it)."""
    nz = matrix != 0
    n_in = nz.shape[1]
    return nz.int().argmax(dim=1), n_in - 1 - nz.flip(1).int().argmax(dim=1)


@functools.lru_cache(maxsize=32)
def resize_axis(n_in: int, n_padded: int, n_crop: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """(`resize_matrix`, its `tap_ranges`) of one axis, on the CPU; cached, as every image of a
    data set of one size has the same (callers must not change them in place)."""
    matrix = resize_matrix(n_in, n_padded, n_crop, n_out)
    return (matrix, *tap_ranges(matrix))


def reading(first: Tensor, last: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """The outputs o0..o1 (each (k,)) that read some input in lo..hi (each (k,)), from a
    resize matrix's `tap_ranges`; o1 < o0 when none does."""
    o0 = torch.searchsorted(last.contiguous(), lo.contiguous())  # first o with last[o] >= lo
    o1 = torch.searchsorted(first.contiguous(), hi.contiguous(), right=True) - 1  # first <= hi
    return o0, o1


def support_boxes(above: Tensor) -> Tensor:
    """(k, h, w) bool -> (k, 4) int64 rows r0, r1 and columns c0, c1 (inclusive) of each mask's
    True pixels; (0, -1, 0, -1) for a mask without any."""
    k, h, w = above.shape
    rows, cols = above.any(dim=2), above.any(dim=1)  # (k, h), (k, w)
    r0 = rows.int().argmax(dim=1)
    r1 = h - 1 - rows.flip(1).int().argmax(dim=1)
    c0 = cols.int().argmax(dim=1)
    c1 = w - 1 - cols.flip(1).int().argmax(dim=1)
    box = torch.stack([r0, r1, c0, c1], dim=1)
    empty = ~rows.any(dim=1)
    box[empty] = torch.tensor([0, -1, 0, -1], device=box.device)
    return box


def resize_masks(
    mask_probs: Tensor,
    padded_size: tuple[int, int],
    input_size: tuple[int, int],
    orig_size: tuple[int, int],
    ins_thresh: float = 0.5,
) -> Tensor:
    """Soft masks at feature size -> binary masks at the original image size (authors' order).

    The authors' steps: bilinear upsampling to the padded input, crop of the bottom/right
    padding, bilinear resize to the original size, and only then the threshold. Bilinear
    resizing is separable, so the three steps are one linear map per axis (`resize_matrix`):
    masks = R_y @ probs @ R_x^T, the same values up to float rounding, as two matrix products
    instead of (k, H, W) masks at the padded input size.

    Each mask is computed only where it can be above the threshold, as Mask R-CNN pastes a
    mask into its box only. The weights of each output pixel are >= 0 and sum to 1, so a
    pixel whose inputs all lie at or below `ins_thresh` is itself at or below it: 0. So a
    mask's output rows and columns are those that read a row / column of its pixels above the
    threshold at feature size (`support_boxes`, `tap_ranges`), and the product runs over that
    block, with every input those outputs read; the rest of the mask is 0. For an object that
    covers a tenth of the image this is a tenth of the work; a mask above the threshold
    everywhere costs what the whole product costs. Of the two orders of the product (rows or
    columns first), the one with fewer multiply-adds is taken.

    Args:
        mask_probs: (k, h4, w4) soft masks in [0, 1], or their logits with `ins_thresh` a
            logit threshold (`finish_single`'s mask_logits).
        padded_size: (H, W); input_size: (h, w) <= (H, W); orig_size: (h0, w0).
    Returns:
        (k, h0, w0) uint8 masks in {0, 1}.
    """
    k, h4, w4 = mask_probs.shape
    device = mask_probs.device
    out = torch.zeros((k, *orig_size), dtype=torch.uint8, device=device)
    if k == 0:
        return out
    (H, W), (h, w), (h0, w0) = (
        tuple(int(v) for v in s) for s in (padded_size, input_size, orig_size)
    )
    rows, row_first, row_last = (t.to(device) for t in resize_axis(h4, H, h, h0))  # (h0, h4) ..
    cols, col_first, col_last = (t.to(device) for t in resize_axis(w4, W, w, w0))  # (w0, w4) ..
    box = support_boxes(mask_probs > ins_thresh)  # (k, 4) at feature size
    y0, y1 = reading(row_first, row_last, box[:, 0], box[:, 1])  # output rows to compute
    x0, x1 = reading(col_first, col_last, box[:, 2], box[:, 3])  # output columns
    live = (box[:, 1] >= 0) & (y1 >= y0) & (x1 >= x0)
    y0, y1, x0, x1 = y0[live], y1[live], x0[live], x1[live]
    # the inputs those outputs read: rows a..b, columns c..d
    a, b, c, d = row_first[y0], row_last[y1], col_first[x0], col_last[x1]
    spans = torch.stack([y0, y1, x0, x1, a, b, c, d], dim=1).tolist()
    probs, cols_t = mask_probs.float(), cols.T  # (k, h4, w4), (w4, w0)
    out_bool = out.view(torch.bool)  # the same bytes: the threshold writes without a cast
    for m, (y0, y1, x0, x1, a, b, c, d) in zip(live.nonzero()[:, 0].tolist(), spans, strict=True):
        block = probs[m, a : b + 1, c : d + 1]  # (hb, wb)
        r, q = rows[y0 : y1 + 1, a : b + 1], cols_t[c : d + 1, x0 : x1 + 1]  # (ho, hb), (wb, wo)
        ho, hb, wb, wo = y1 + 1 - y0, b + 1 - a, d + 1 - c, x1 + 1 - x0
        if ho * hb * wb + ho * wb * wo <= hb * wb * wo + ho * hb * wo:
            full = (r @ block) @ q  # rows first: (ho, wb) -> (ho, wo)
        else:
            full = r @ (block @ q)  # columns first: (hb, wo) -> (ho, wo)
        torch.gt(full, ins_thresh, out=out_bool[m, y0 : y1 + 1, x0 : x1 + 1])
    return out


def finish_single(
    mask_probs: Tensor,
    labels: Tensor,
    scores: Tensor,
    ins_thresh: float = 0.5,
    pre_nms_num: int = 50,
    keep_instance: int = 5,
    nms_kernel: str = "gaussian",
    nms_sigma: float = 2.0,
    input_size: tuple[int, int] | None = None,
    padded_size: tuple[int, int] | None = None,
    orig_size: tuple[int, int] | None = None,
    update_thresh: float = 0.0,
    strides: Tensor | None = None,
    mask_logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """Turn one image's candidates into final instances (hand-out 6.10.2, PostProcessImg).

    Steps: binarise at `ins_thresh`; drop empty masks (and, with `strides`, masks whose area is
    not larger than their level's stride, SOLOv2's filter); score = category score x maskness
    (mean soft value inside the binary mask); keep the `pre_nms_num` best; Matrix NMS; drop
    decayed scores below `update_thresh`; keep the `keep_instance` best; resize the soft masks
    (see `resize_masks`) and binarise. A detection whose mask is empty at the original size
    (it lay in the padding) is dropped, so fewer than `keep_instance` may come back.

    Args:
        mask_probs: (n, h4, w4) soft masks in [0, 1] of the candidates.
        labels: (n,) int64 class ids in 1..C.  scores: (n,) category probabilities.
        input_size: (h, w) before padding (default: padded_size).
        padded_size: (H, W) of the network input (default: 4 x (h4, w4)).
        orig_size: (h0, w0) of the source image (default: input_size).
        strides: optional (n,) stride (pixels) of each candidate's FPN level.
        mask_logits: optional (n, h4, w4) logits of the same masks (sigmoid = mask_probs). When
            given, the final resize interpolates them instead of the probabilities and
            thresholds at logit(ins_thresh): the masks of a model whose loss compared
            upsampled logits (SOLOv2's `mask_loss_stride` < 4) come out as it was trained.
    Returns:
        dict with "masks" (k, h0, w0) uint8, "labels" (k,) int64, "scores" (k,) float32, sorted
        by decreasing score, on `mask_probs.device`.
    """
    n, h4, w4 = mask_probs.shape
    if labels.shape != (n,) or scores.shape != (n,):
        raise ValueError(
            f"finish_single: labels {tuple(labels.shape)} and scores {tuple(scores.shape)} must "
            f"both be ({n},) to match mask_probs {tuple(mask_probs.shape)}."
        )
    if mask_logits is not None and mask_logits.shape != mask_probs.shape:
        raise ValueError(
            f"finish_single: mask_logits {tuple(mask_logits.shape)} must match mask_probs "
            f"{tuple(mask_probs.shape)}."
        )
    check_kernel(nms_kernel, "finish_single")
    padded_size = tuple(padded_size) if padded_size is not None else (4 * h4, 4 * w4)
    input_size = tuple(input_size) if input_size is not None else padded_size
    orig_size = tuple(orig_size) if orig_size is not None else input_size
    device = mask_probs.device
    if n == 0:
        return _empty_result(orig_size, device)

    # Every step below selects rows; they are composed as indices into the n candidates and
    # the (n, h4, w4) masks are gathered only where needed (Matrix NMS, the final resize).
    masks = mask_probs > ins_thresh  # (n, h4, w4) bool
    area = masks.sum(dim=(1, 2)).float()  # (n,)
    keep = area > 0
    if strides is not None:
        keep &= area > strides.to(area)
    idx = keep.nonzero()[:, 0]  # (n1,)
    if idx.numel() == 0:
        return _empty_result(orig_size, device)
    # maskness: the mean soft value inside the binary mask
    maskness = (mask_probs[idx] * masks[idx]).sum(dim=(1, 2)) / area[idx]  # (n1,)
    scores = scores[idx] * maskness
    top = torch.argsort(scores, descending=True, stable=True)[:pre_nms_num]
    idx, scores = idx[top], scores[top]  # sorted by decreasing score, as matrix_nms sorts
    labels = labels[idx]
    decay = matrix_nms_decay_sorted(masks[idx], labels, nms_kernel, nms_sigma, area[idx])
    scores = scores * decay
    keep = (scores >= update_thresh).nonzero()[:, 0]
    top = keep[torch.argsort(scores[keep], descending=True, stable=True)[:keep_instance]]
    idx, labels, scores = idx[top], labels[top], scores[top]
    soft = (mask_logits if mask_logits is not None else mask_probs)[idx]

    threshold = ins_thresh if mask_logits is None else logit(ins_thresh)
    final_masks = resize_masks(soft, padded_size, input_size, orig_size, threshold)
    return drop_empty(final_masks, labels, scores)


def drop_empty(masks: Tensor, labels: Tensor, scores: Tensor) -> dict[str, Tensor]:
    """The result dict (masks (k, h0, w0) uint8, labels int64, scores float32) without the
    detections whose mask is empty at the original size (it lay in the padding); the masks
    are not copied when none is (a copy of 30 masks of 300 x 400 took a fifth of the CPU
    preset's post-processing)."""
    nonempty = masks.flatten(1).amax(dim=1) > 0  # (k,) bool
    if not bool(nonempty.all()):
        masks, labels, scores = masks[nonempty], labels[nonempty], scores[nonempty]
    return {"masks": masks, "labels": labels.to(torch.int64), "scores": scores.to(torch.float32)}
