"""Known-answer tests for postprocess.py (point NMS, Matrix NMS, candidates, finishing).

Run: /work/venv/bin/python -m pytest -q tests/test_postprocess.py
Shapes: n candidate masks, (h4, w4) mask size, (H, W) padded input, (h0, w0) original image.
"""

import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F

from postprocess import (
    finish_single,
    logit,
    mask_ious,
    matrix_nms,
    points_nms,
    reading,
    resize_masks,
    resize_matrix,
    select_candidates,
    support_boxes,
    tap_ranges,
)

# --- helpers -----------------------------------------------------------------------------


def errata_masks() -> torch.Tensor:
    """The errata's example: areas 5, 2, 4; masks 0 and 2 share 4 pixels (IoU 4/5). (3, 3, 3)"""
    m0 = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    m1 = [[0, 0, 1], [0, 0, 1], [0, 0, 0]]
    m2 = [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    return torch.tensor([m0, m1, m2], dtype=torch.uint8)


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """(h, w) uint8 mask with ones on rows y0:y1, columns x0:x1."""
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def reference_matrix_nms(masks, labels, scores, kernel, sigma=2.0):
    """Loop version of the errata's definition, on IoUs from pycocotools. Returns (n,) list."""
    n = len(scores)
    arr = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
    ious = mask_util.iou(mask_util.encode(arr), mask_util.encode(arr), [0] * n)
    order = sorted(range(n), key=lambda i: -float(scores[i]))  # Python's sort is stable

    def f(x):
        return math.exp(-sigma * x * x) if kernel == "gaussian" else 1 - x

    def higher(j):  # same-class masks ranked above j
        rank = order.index(j)
        return [i for i in order[:rank] if labels[i] == labels[j]]

    cmax = [max([ious[i, j] for i in higher(j)], default=0.0) for j in range(n)]
    out = []
    for j in range(n):
        decay = min([f(ious[i, j]) / f(cmax[i]) for i in higher(j)], default=1.0)
        out.append(float(scores[j]) * min(decay, 1.0))
    return out


# --- points_nms --------------------------------------------------------------------------


def test_points_nms_keeps_2x2_local_maxima():
    heat = torch.zeros(1, 2, 5, 5)
    # channel 0: a peak at (2, 2) with a lower ring around it
    heat[0, 0, 1:4, 1:4] = 0.3
    heat[0, 0, 2, 2] = 0.9
    # channel 1: a single cell in the top-left corner and a flat 2x2 block (a tie)
    heat[0, 1, 0, 0] = 0.5
    heat[0, 1, 3:5, 3:5] = 0.4
    out = points_nms(heat)
    assert out.shape == heat.shape

    expected = torch.zeros(1, 2, 5, 5)
    expected[0, 0, 2, 2] = 0.9  # the peak
    # the one-sided window: (1, 1), (1, 2), (1, 3), (2, 1), (3, 1) are only compared with
    # cells above / left of them (zeros or equal ring values), so they survive
    for y, x in [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]:
        expected[0, 0, y, x] = 0.3
    # (2, 3), (3, 2), (3, 3) see the peak in their window: zeroed
    expected[0, 1, 0, 0] = 0.5
    expected[0, 1, 3:5, 3:5] = 0.4  # ties keep every tied cell
    torch.testing.assert_close(out, expected)


def test_points_nms_matches_brute_force():
    torch.manual_seed(0)
    heat = torch.rand(2, 3, 7, 7)
    out = points_nms(heat)
    for b, c, y, x in np.ndindex(2, 3, 7, 7):
        window = heat[b, c, max(y - 1, 0) : y + 1, max(x - 1, 0) : x + 1]
        keep = bool(heat[b, c, y, x] >= window.max())
        assert float(out[b, c, y, x]) == (float(heat[b, c, y, x]) if keep else 0.0)


# --- Matrix NMS --------------------------------------------------------------------------


def test_matrix_nms_errata_example_linear():
    masks, labels = errata_masks(), torch.tensor([1, 1, 1])
    scores = torch.tensor([0.9, 0.8, 0.8])
    decayed = matrix_nms(masks, labels, scores, kernel="linear")
    torch.testing.assert_close(decayed / scores, torch.tensor([1.0, 1.0, 0.2]))


def test_matrix_nms_errata_example_gaussian():
    masks, labels = errata_masks(), torch.tensor([1, 1, 1])
    scores = torch.tensor([0.9, 0.8, 0.8])
    decayed = matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0)
    torch.testing.assert_close(decayed / scores, torch.tensor([1.0, 1.0, math.exp(-1.28)]))
    # the hand-out's form exp(-(iou**2 - cmax**2) / 0.5) is the same number
    assert math.isclose(math.exp(-(0.8**2) / 0.5), math.exp(-1.28))


def test_matrix_nms_duplicate_decayed_disjoint_untouched():
    h, w = 16, 16
    a = box_mask(h, w, 2, 8, 2, 8)
    masks = torch.stack([a, a.clone(), box_mask(h, w, 10, 15, 10, 15)])
    scores = torch.tensor([0.9, 0.7, 0.6])
    for kernel in ("linear", "gaussian"):
        decayed = matrix_nms(masks, torch.tensor([2, 2, 2]), scores, kernel=kernel)
        assert decayed[0] == pytest.approx(0.9)
        assert decayed[2] == pytest.approx(0.6)  # disjoint: untouched
        expected_dup = 0.0 if kernel == "linear" else 0.7 * math.exp(-2.0)
        assert decayed[1] == pytest.approx(expected_dup, abs=1e-6)


def test_matrix_nms_other_class_overlap_untouched():
    a = box_mask(12, 12, 0, 6, 0, 6)
    masks = torch.stack([a, a.clone()])
    scores = torch.tensor([0.9, 0.8])
    decayed = matrix_nms(masks, torch.tensor([1, 3]), scores, kernel="linear")
    torch.testing.assert_close(decayed, scores)


def test_matrix_nms_input_order_independent():
    torch.manual_seed(1)
    masks = (torch.rand(12, 10, 10) > 0.4).to(torch.uint8)
    labels = torch.randint(1, 3, (12,))
    scores = torch.rand(12)
    decayed = matrix_nms(masks, labels, scores)
    perm = torch.randperm(12)
    decayed_perm = matrix_nms(masks[perm], labels[perm], scores[perm])
    torch.testing.assert_close(decayed_perm, decayed[perm])
    assert (decayed <= scores + 1e-7).all()
    assert decayed[scores.argmax()] == scores.max()  # the top mask keeps its score


def test_matrix_nms_triple_duplicate_is_finite():
    # the linear kernel divides by 1 - cmax, which is 0 for an exact duplicate
    a = box_mask(8, 8, 1, 5, 1, 5)
    decayed = matrix_nms(a.expand(3, 8, 8), torch.ones(3), torch.tensor([0.9, 0.8, 0.7]), "linear")
    torch.testing.assert_close(decayed, torch.tensor([0.9, 0.0, 0.0]))


def test_matrix_nms_empty_and_dtypes():
    out = matrix_nms(torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert out.shape == (0,)
    masks = errata_masks()
    scores = torch.tensor([0.9, 0.8, 0.8])
    labels = torch.ones(3, dtype=torch.int64)
    ref = matrix_nms(masks, labels, scores, "linear")
    torch.testing.assert_close(matrix_nms(masks.bool(), labels, scores, "linear"), ref)
    torch.testing.assert_close(matrix_nms(masks.float(), labels, scores, "linear"), ref)
    area = masks.flatten(1).sum(1)
    torch.testing.assert_close(matrix_nms(masks, labels, scores, "linear", mask_area=area), ref)
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(masks, labels, scores, kernel="box")


def test_mask_ious_match_pycocotools_and_reference_nms():
    torch.manual_seed(2)
    # random blobs: boxes of random size and place, so some overlap and some do not
    masks = torch.stack(
        [
            box_mask(20, 24, y, y + dy, x, x + dx)
            for y, x, dy, dx in torch.randint(0, 12, (10, 4)).tolist()
            if dy > 0 and dx > 0
        ]
        + [box_mask(20, 24, 3, 9, 4, 12)] * 2
    )
    n = masks.shape[0]
    arr = np.asfortranarray(masks.numpy().transpose(1, 2, 0))
    rles = mask_util.encode(arr)
    expected = mask_util.iou(rles, rles, [0] * n)
    np.testing.assert_allclose(mask_ious(masks).numpy(), expected, rtol=1e-6, atol=1e-6)

    labels = torch.randint(1, 3, (n,))
    scores = torch.rand(n)
    for kernel in ("linear", "gaussian"):
        ref = reference_matrix_nms(masks, labels.tolist(), scores, kernel)
        got = matrix_nms(masks, labels, scores, kernel=kernel)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


# --- select_candidates -------------------------------------------------------------------


def test_select_candidates():
    cate = torch.zeros(6, 3)  # K = 6 cells, C = 3 classes
    cate[1, 0] = 0.5
    cate[4, 1] = 0.7
    cate[4, 2] = 0.2  # same cell, second class
    cate[5, 2] = 0.1  # exactly at the threshold: not a candidate
    cell_idx, labels, scores = select_candidates(cate, 0.1)
    assert cell_idx.tolist() == [1, 4, 4]
    assert labels.tolist() == [1, 2, 3]
    assert cell_idx.dtype == labels.dtype == torch.int64
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.7, 0.2]))
    empty = select_candidates(torch.zeros(6, 3), 0.1)
    assert [t.shape for t in empty] == [(0,), (0,), (0,)]


# --- finish_single -----------------------------------------------------------------------


def test_finish_single_shapes_and_maskness():
    h4, w4 = 8, 12
    probs = torch.zeros(2, h4, w4)
    probs[0, 1:5, 1:5] = 0.8  # 16 pixels at 0.8
    probs[0, 1:3, 1:5] = 1.0  # 8 of them at 1.0 -> maskness 0.9
    probs[1, 5:8, 7:11] = 0.6  # maskness 0.6
    probs[1, 0, 0] = 0.4  # below ins_thresh: outside the mask, not counted
    out = finish_single(
        probs,
        torch.tensor([1, 2]),
        torch.tensor([0.5, 0.9]),
        input_size=(32, 48),
        padded_size=(32, 48),
        orig_size=(64, 96),
    )
    assert out["masks"].shape == (2, 64, 96) and out["masks"].dtype == torch.uint8
    assert out["labels"].dtype == torch.int64 and out["scores"].dtype == torch.float32
    # scores: 0.9 * 0.6 = 0.54 beats 0.5 * 0.9 = 0.45; disjoint, so no decay
    torch.testing.assert_close(out["scores"], torch.tensor([0.54, 0.45]))
    assert out["labels"].tolist() == [2, 1]
    assert set(out["masks"].unique().tolist()) <= {0, 1}
    # the second mask covers feature rows 1..4, columns 1..4 -> roughly 8x scaled at 64x96
    ys, xs = out["masks"][1].nonzero(as_tuple=True)
    assert 6 <= ys.min() <= 10 and 38 <= ys.max() <= 42
    assert 6 <= xs.min() <= 10 and 38 <= xs.max() <= 42


def test_finish_single_resizes_logits_when_given():
    # One mask, a steep linear ramp of logits across 4 columns: -6.5, -1.5, 3.5, 8.5 (zero at
    # column 1.3). Resized 4x as logits, the ramp stays linear and crosses 0 at source column
    # 1.3, i.e. output columns j with (j + 0.5) / 4 - 0.5 > 1.3: j >= 7. Resized as
    # probabilities, 0.182 -> 0.971 between columns 1 and 2 crosses 0.5 at 1.403: j >= 8.
    logits = (5 * (torch.arange(4.0) - 1.3)).expand(4, 4)[None]  # (1, 4, 4)
    args = dict(input_size=(16, 16), padded_size=(16, 16), orig_size=(16, 16))
    label, score = torch.tensor([1]), torch.tensor([0.9])
    from_logits = finish_single(torch.sigmoid(logits), label, score, mask_logits=logits, **args)
    from_probs = finish_single(torch.sigmoid(logits), label, score, **args)
    assert from_logits["masks"][0, 5].tolist() == [0] * 7 + [1] * 9
    assert from_probs["masks"][0, 5].tolist() == [0] * 8 + [1] * 8
    # maskness and scores come from the probabilities either way
    torch.testing.assert_close(from_logits["scores"], from_probs["scores"])
    # the threshold is the logit of ins_thresh: 0.7 -> 0.847, crossing at column 1.47: j >= 8
    high = finish_single(
        torch.sigmoid(logits), label, score, ins_thresh=0.7, mask_logits=logits, **args
    )
    assert high["masks"][0, 5].tolist() == [0] * 8 + [1] * 8
    assert logit(0.5) == 0.0 and math.isclose(logit(0.7), math.log(0.7 / 0.3))
    with pytest.raises(ValueError, match="mask_logits"):
        finish_single(torch.sigmoid(logits), label, score, mask_logits=logits[:, :3], **args)
    with pytest.raises(ValueError, match="between 0 and 1"):
        logit(1.0)


def test_finish_single_padding_crop():
    # padded 32x48, image 32x32 (bottom/right padding of 16 columns); mask 1 lies in the padding
    probs = torch.zeros(2, 8, 12)
    probs[0, 2:6, 1:5] = 0.9
    probs[1, 2:6, 9:12] = 0.9
    out = finish_single(
        probs,
        torch.tensor([1, 1]),
        torch.tensor([0.8, 0.9]),
        input_size=(32, 32),
        padded_size=(32, 48),
        orig_size=(16, 16),
    )
    assert out["masks"].shape == (1, 16, 16)
    torch.testing.assert_close(out["scores"], torch.tensor([0.72]))
    resized = resize_masks(probs, (32, 48), (32, 32), (16, 16))
    assert resized[1].sum() == 0 and resized[0].sum() > 0


def test_finish_single_keep_instance_and_nms():
    probs = torch.zeros(7, 8, 8)
    for i in range(6):  # six disjoint-ish small masks on a diagonal of 1x8 rows
        probs[i, i, :] = 1.0
    probs[6, 0, :] = 1.0  # a duplicate of mask 0, same class, lower score
    labels = torch.ones(7, dtype=torch.int64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.85])
    out = finish_single(probs, labels, scores, keep_instance=3, nms_kernel="linear")
    assert out["masks"].shape == (3, 32, 32)  # default sizes: 4x the mask size
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8, 0.7]))
    out = finish_single(probs, labels, scores, keep_instance=10, pre_nms_num=2)
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.85 * math.exp(-2.0)]))


def test_finish_single_strides_filter_and_update_thresh():
    probs = torch.zeros(3, 8, 8)
    probs[0, 0:2, 0:4] = 0.9  # area 8
    probs[1, 4:8, 4:8] = 0.9  # area 16
    probs[2, 0:1, 6:8] = 0.9  # area 2
    labels = torch.tensor([1, 2, 3])
    scores = torch.tensor([0.9, 0.8, 0.3])
    out = finish_single(probs, labels, scores, keep_instance=5, strides=torch.tensor([8, 8, 1]))
    assert out["labels"].tolist() == [2, 3]  # area 8 is not larger than stride 8
    out = finish_single(probs, labels, scores, keep_instance=5, update_thresh=0.5)
    assert out["labels"].tolist() == [1, 2]  # 0.3 * 0.9 = 0.27 < 0.5


def test_finish_single_empty():
    out = finish_single(
        torch.zeros(0, 8, 12),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0),
        input_size=(30, 40),
        padded_size=(32, 48),
        orig_size=(60, 80),
    )
    assert out["masks"].shape == (0, 60, 80) and out["masks"].dtype == torch.uint8
    assert out["labels"].shape == (0,) and out["labels"].dtype == torch.int64
    assert out["scores"].shape == (0,) and out["scores"].dtype == torch.float32
    # every candidate below ins_thresh: the same empty result
    out = finish_single(torch.full((2, 8, 12), 0.3), torch.tensor([1, 2]), torch.ones(2))
    assert out["masks"].shape == (0, 32, 48)


def reference_resize(probs, padded_size, input_size, orig_size):
    """The authors' three steps at full size, F.interpolate as in their code."""
    up = F.interpolate(probs[:, None], size=padded_size, mode="bilinear", align_corners=False)
    up = up[:, :, : input_size[0], : input_size[1]]
    return F.interpolate(up, size=orig_size, mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize(
    "h4, w4, padded, inp, orig",
    [
        (8, 12, (32, 48), (32, 42), (30, 40)),  # shrink, padding on the right
        (200, 272, (800, 1088), (800, 1066), (300, 400)),  # the hand-out's sizes
        (12, 16, (48, 64), (45, 64), (90, 128)),  # enlarge, padding at the bottom
        (5, 7, (20, 28), (20, 28), (20, 28)),  # plain x4 upsampling
    ],
)
def test_separable_resize_equals_the_three_interpolations(h4, w4, padded, inp, orig):
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(3, h4, w4, generator=gen)
    probs[1] = (probs[1] > 0.7).float()  # hard edges too
    ref = reference_resize(probs, padded, inp, orig)
    got = resize_masks(probs, padded, inp, orig)
    assert got.shape == (3, *orig) and got.dtype == torch.uint8
    clear = (ref - 0.5).abs() > 1e-5  # float rounding may flip only values at the threshold
    assert torch.equal(got.bool()[clear], (ref > 0.5)[clear])
    matrix = resize_matrix(w4, padded[1], inp[1], orig[1])  # (w0, w4)
    cols = F.interpolate(
        F.interpolate(probs[0][:, None], size=padded[1], mode="linear")[..., : inp[1]],
        size=orig[1],
        mode="linear",
    )[:, 0]  # (h4, w0): each row of mask 0 resized alone along its width
    torch.testing.assert_close(probs[0] @ matrix.T, cols, atol=1e-6, rtol=1e-5)


SIZES = [
    (8, 12, (32, 48), (32, 42), (30, 40)),
    (48, 64, (192, 256), (192, 256), (300, 400)),  # the CPU preset on a built-in image
    (12, 16, (48, 64), (45, 64), (90, 128)),
    (50, 84, (200, 336), (200, 333), (61, 97)),  # shrunk more than 2x: inputs left unread
    (5, 7, (20, 28), (20, 28), (20, 28)),
]


AXES = [(h4, p[0], i[0], o[0]) for h4, _, p, i, o in SIZES] + [
    (w4, p[1], i[1], o[1]) for _, w4, p, i, o in SIZES
]


@pytest.mark.parametrize("n_in, n_pad, n_crop, n_out", AXES)
def test_tap_ranges_are_monotone_and_hold_every_weight(n_in, n_pad, n_crop, n_out):
    matrix = resize_matrix(n_in, n_pad, n_crop, n_out)
    first, last = tap_ranges(matrix)
    assert (first.diff() >= 0).all() and (last.diff() >= 0).all() and (first <= last).all()
    inside = torch.arange(n_in)[None, :]
    band = (inside >= first[:, None]) & (inside <= last[:, None])
    assert (matrix[~band] == 0).all() and (matrix[band] != 0).any()
    assert (matrix >= 0).all()  # convex weights: the crop in resize_masks rests on this
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(n_out))


@pytest.mark.parametrize("h4, w4, padded, inp, orig", SIZES)
def test_resize_masks_computes_only_the_support_and_equals_the_whole_product(
    h4, w4, padded, inp, orig
):
    gen = torch.Generator().manual_seed(3)
    k = 12
    logits = torch.randn(k, h4, w4, generator=gen) * 4 - 6  # mostly below 0
    for m in range(k):  # a blob of each size at a random place, some at the border
        r = int(torch.randint(0, h4, (1,), generator=gen))
        c = int(torch.randint(0, w4, (1,), generator=gen))
        logits[m, max(r - m, 0) : r + m // 2 + 1, max(c - m, 0) : c + m + 1] += 9
    logits[0] = -5.0  # nothing above the threshold: an empty mask
    logits[1, -1, -1] = 5.0  # one pixel in the bottom-right corner (the padding, if any)
    logits[2] = 3.0  # everything above: the whole product
    got = resize_masks(logits, padded, inp, orig, 0.0)
    assert got.shape == (k, *orig) and got.dtype == torch.uint8
    rows, cols = (
        resize_matrix(h4, padded[0], inp[0], orig[0]),
        resize_matrix(w4, padded[1], inp[1], orig[1]),
    )
    full = rows @ logits @ cols.T  # (k, h0, w0): the whole product, before the threshold
    expected = (full > 0).to(torch.uint8)
    clear = full.abs() > 1e-5  # float rounding may flip only values at the threshold
    assert torch.equal(got[clear], expected[clear])
    assert got[0].sum() == 0 and got[2].all()


def test_reading_and_support_boxes_by_hand():
    # x2 bilinear upsampling of 4 inputs (no padding, no resize): output o samples input
    # (o + 0.5) / 2 - 0.5, clamped, so it reads inputs 0 | 0,1 | 0,1 | 1,2 | 1,2 | 2,3 | 2,3 | 3
    first, last = tap_ranges(resize_matrix(4, 8, 8, 8))
    assert first.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    assert last.tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    o0, o1 = reading(first, last, torch.tensor([2, 0, 3]), torch.tensor([2, 0, 3]))
    assert o0.tolist() == [3, 0, 5] and o1.tolist() == [6, 2, 7]  # input 2 is read by 3..6
    above = torch.zeros(2, 4, 5, dtype=torch.bool)
    above[0, 1:3, 2] = True
    assert support_boxes(above).tolist() == [[1, 2, 2, 2], [0, -1, 0, -1]]
