"""Tests of decoupled_head.py with known answers on small inputs.

Shapes of every branch (separate and shared X/Y towers), the decoupled mask of cell (i, j)
against an explicit outer product, the positive-only loss against the full S^2 computation and
torchvision's focal loss, post-processing against the full computation and its filters on
hand-built X/Y maps. (Training steps through model.py: tests/test_solov2_head.py.)
Run: python -m pytest -q tests/test_decoupled_head.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import postprocess
from decoupled_head import DecoupledSOLOHead, decoupled_masks
from solo_head import dice_loss

GRIDS = (10, 8, 6, 4, 3)
RANGES = ((1, 48), (24, 96), (48, 192), (96, 384), (192, 2048))


def small_head(**kwargs):
    torch.manual_seed(0)
    options = dict(
        in_channels=32,
        seg_feat_channels=32,
        stacked_convs=2,
        gn_groups=8,
        num_grids=GRIDS,
        scale_ranges=RANGES,
    )
    return DecoupledSOLOHead(**{**options, **kwargs})


def fpn_features(B=2, C=32, Hi=128, Wi=160, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, Hi // s, Wi // s, generator=generator) for s in (4, 8, 16, 32, 64)]


# --- the decoupled mask ---------------------------------------------------------------------


def test_cell_mask_is_the_product_of_column_x_and_row_y():
    torch.manual_seed(0)
    x_probs, y_probs = torch.rand(2, 5, 6, 7), torch.rand(2, 5, 6, 7)
    img_idx = torch.tensor([0, 1, 1, 0])
    cell_idx = torch.tensor([0, 7, 24, 13])  # (i, j) = (0, 0), (1, 2), (4, 4), (2, 3)
    ours = decoupled_masks(x_probs, y_probs, img_idx, cell_idx)
    for k, (i, j) in enumerate([(0, 0), (1, 2), (4, 4), (2, 3)]):
        b = int(img_idx[k])
        assert torch.equal(ours[k], x_probs[b, j] * y_probs[b, i])
    assert decoupled_masks(x_probs, y_probs, img_idx[:0], cell_idx[:0]).shape == (0, 6, 7)


# --- network --------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_forward_shapes_of_every_branch(shared):
    head = small_head(shared_xy_tower=shared)
    feats = fpn_features()
    cate, xs, ys = head(feats)
    mask_sizes = [(32, 40), (32, 40), (16, 20), (8, 10), (8, 10)]  # 2 x the NewFPN sizes
    assert [tuple(c.shape) for c in cate] == [(2, 3, S, S) for S in GRIDS]
    expected = [(2, S, h, w) for S, (h, w) in zip(GRIDS, mask_sizes, strict=True)]
    assert [tuple(x.shape) for x in xs] == expected and [tuple(y.shape) for y in ys] == expected
    assert tuple(head.mask_probs(xs[1], ys[1]).shape) == (2, 64, 32, 40)  # all S^2 masks
    with torch.no_grad():
        cate_eval, xs_eval, ys_eval = head(feats, eval=True)
    assert torch.equal(cate_eval[0], postprocess.points_nms(torch.sigmoid(cate[0])).detach())
    # sigmoid, then every level at H/4 x W/4 (the authors' order)
    assert all(tuple(x.shape) == (2, S, 32, 40) for x, S in zip(xs_eval, GRIDS, strict=True))
    assert torch.allclose(xs_eval[0], torch.sigmoid(xs[0]))
    resized = F.interpolate(torch.sigmoid(ys[3]), size=(32, 40), mode="bilinear")
    assert torch.allclose(ys_eval[3], resized)


def test_towers_follow_the_authors():
    head = DecoupledSOLOHead()  # 7 x 256, separate X and Y towers, one coordinate each
    assert head.mask_convs_x[0][0].in_channels == head.mask_convs_y[0][0].in_channels == 257
    assert len(head.mask_convs_x) == len(head.cate_convs) == 7
    assert [c.out_channels for c in head.mask_out_x] == [40, 36, 24, 16, 12]
    assert head.mask_out_y[0].kernel_size == (3, 3)
    prior = torch.full((40,), -math.log(99.0))
    assert torch.allclose(head.mask_out_x[0].bias, prior)
    assert (head.cate_thresh, head.pre_NMS_num, head.keep_instance) == (0.1, 500, 100)
    light = DecoupledSOLOHead(shared_xy_tower=True)  # the light head: one tower, both coords
    assert light.mask_convs[0][0].in_channels == 258 and not hasattr(light, "mask_convs_x")
    assert sum(p.numel() for p in light.parameters()) < sum(p.numel() for p in head.parameters())
    assert not hasattr(head, "mask_logits")  # its masks are products of probabilities


def test_x_tower_sees_only_x_and_y_tower_only_y():
    # Zero features: the X tower's input varies along x only, so X is constant down columns.
    head = small_head(init="xavier")
    zeros = [torch.zeros_like(f) for f in fpn_features(B=1)]
    _, xs, ys = head(zeros)
    x, y = xs[0][0], ys[0][0]  # (S, 32, 40)
    interior_x, interior_y = x[:, 6:-6, 6:-6], y[:, 6:-6, 6:-6]  # away from the zero padding
    assert torch.allclose(interior_x, interior_x[:, :1, :].expand_as(interior_x), atol=1e-5)
    assert torch.allclose(interior_y, interior_y[:, :, :1].expand_as(interior_y), atol=1e-5)


# --- losses ---------------------------------------------------------------------------------


def batch_of_three(Hi=128, Wi=160):
    masks = torch.zeros(3, Hi, Wi, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    masks[1, 70:110, 10:40] = 1
    masks[2, 10:120, 60:150] = 1
    boxes = torch.tensor([[30, 20, 90, 60], [10, 70, 40, 110], [60, 10, 150, 120]]).float()
    labels = torch.tensor([1, 2, 3])
    return dict(
        boxes_list=[boxes, boxes[:1]],
        labels_list=[labels, labels[:1]],
        masks_list=[masks, masks[:1]],
    )


@pytest.mark.parametrize("shared", [False, True])
def test_loss_equals_the_full_computation(shared):
    head = small_head(shared_xy_tower=shared)
    cate, xs, ys = head(fpn_features(seed=1))
    data = batch_of_three()
    losses = head.loss((cate, xs, ys), **data)
    assert losses["num_pos"] > 0

    sizes = [tuple(x.shape[-2:]) for x in xs]
    img_ins, img_cate, img_ind = head.target(sizes, *data.values(), (128, 160))
    dices = []
    for level, (x, y) in enumerate(zip(xs, ys, strict=True)):
        full = head.mask_probs(x, y)  # (B, S^2, h, w): every cell's sigmoid(x_j) sigmoid(y_i)
        for b in range(2):
            dices.append(dice_loss(full[b][img_ind[b][level]], img_ins[b][level]))
    assert torch.allclose(losses["mask"], torch.cat(dices).mean(), atol=1e-6)
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, 3) for c in cate])
    targets = torch.cat([torch.stack(lvl).flatten() for lvl in zip(*img_cate, strict=True)])
    one_hot = F.one_hot(targets, 4)[:, 1:].float()
    focal = sigmoid_focal_loss(logits, one_hot, reduction="sum") / (losses["num_pos"] + 1)
    assert torch.allclose(losses["cate"], focal, rtol=1e-5)
    assert torch.allclose(losses["total"], losses["cate"] + 3 * losses["mask"])
    losses["total"].backward()
    towers = ("mask_convs",) if shared else ("mask_convs_x", "mask_convs_y")
    for name, param in head.named_parameters():
        if name.startswith((*towers, "cate_convs")):
            assert param.grad is not None and torch.isfinite(param.grad).all()
    assert torch.count_nonzero(head.mask_out_x[0].weight.grad) > 0
    assert torch.count_nonzero(head.mask_out_y[0].weight.grad) > 0


def test_no_objects_gives_positive_category_loss_and_zero_mask_loss():
    head = small_head()
    losses = head.loss(
        head(fpn_features()),
        [torch.zeros(0, 4)] * 2,
        [torch.zeros(0, dtype=torch.int64)] * 2,
        [torch.zeros(0, 128, 160, dtype=torch.uint8)] * 2,
    )
    assert losses["num_pos"] == 0 and losses["mask"].item() == 0.0
    assert torch.isfinite(losses["cate"]) and losses["cate"].item() > 0
    losses["total"].backward()
    assert head.mask_out_x[0].weight.grad is not None
    assert torch.count_nonzero(head.mask_out_y[4].weight.grad) == 0


def test_labels_outside_the_classes_are_refused():
    head = small_head()
    masks = torch.ones(1, 128, 160, dtype=torch.uint8)
    with pytest.raises(ValueError, match="labels must be class ids in 1..3"):
        head.loss(
            head(fpn_features(B=1)),
            [torch.tensor([[0.0, 0, 160, 128]])],
            [torch.tensor([0])],
            [masks],
        )


# --- inference ------------------------------------------------------------------------------


def eval_predictions(head, seed=0):
    """Eval-mode predictions with scores spread over [0, 1] and X / Y maps around 0.5."""
    with torch.no_grad():
        torch.nn.init.normal_(head.cate_out.weight, std=0.5)
        torch.nn.init.zeros_(head.cate_out.bias)
        for conv in (*head.mask_out_x, *head.mask_out_y):
            torch.nn.init.normal_(conv.weight, std=1.0)
            torch.nn.init.constant_(conv.bias, 2.0)
        return head(fpn_features(B=2, seed=seed), eval=True)


def test_post_process_equals_the_full_computation():
    head = small_head(cate_thresh=0.5, keep_instance=8, pre_NMS_num=30)
    cate, xs, ys = eval_predictions(head)
    metas = [
        {"input_size": (120, 150), "orig_size": (60, 75)},
        {"input_size": (128, 160), "orig_size": (256, 320)},
    ]
    results = head.PostProcess((cate, xs, ys), metas)
    for b, (result, meta) in enumerate(zip(results, metas, strict=True)):
        scores = torch.cat([c[b].permute(1, 2, 0).reshape(-1, 3) for c in cate])
        # every cell's mask from the eval maps: (i, j) -> x_j * y_i, level by level
        probs = torch.cat(
            [
                torch.stack([y[b][i] * x[b][j] for i in range(S) for j in range(S)])
                for x, y, S in zip(xs, ys, GRIDS, strict=True)
            ]
        )  # (sum S^2, 32, 40)
        cell_idx, labels, cand_scores = postprocess.select_candidates(scores, 0.5)
        strides = torch.tensor([8, 8, 16, 32, 32]).repeat_interleave(
            torch.tensor([S * S for S in GRIDS])
        )[cell_idx]
        expected = postprocess.finish_single(
            probs[cell_idx],
            labels,
            cand_scores,
            0.5,
            30,
            8,
            "gaussian",
            2.0,
            meta["input_size"],
            (128, 160),
            meta["orig_size"],
            0.05,
            strides,
        )
        assert len(cell_idx) > 0 and len(result["scores"]) > 0
        assert result["masks"].shape[1:] == meta["orig_size"]
        assert torch.equal(result["labels"], expected["labels"])
        assert torch.equal(result["masks"], expected["masks"])
        assert torch.allclose(result["scores"], expected["scores"], atol=1e-6)


def constructed_predictions():
    """Hand-built eval predictions on a 64 x 96 input (maps at 16 x 24 on every level).

    On each level, X channel j is 1 on feature columns [2j, 2j + 2) (capped at the edge) and Y
    channel i is 1 on rows [2i, 2i + 2), 0 elsewhere, so cell (i, j)'s mask is the 2 x 2 block
    at (2i, 2j), 4 pixels; level 4 (S = 3) makes X_0 and Y_0 wider, 6 x 6 = 36 pixels.
    Cell (0, 0) of levels 4 and 2 is widened to the 6 x 6 block at the origin (36 pixels).
    Candidates (point NMS not involved; maskness 1):
      a: level 4 (stride 32), cell (0, 0), class 1, 0.9: 36 px > 32, kept;
      b: level 0 (stride 8), cell (3, 3), class 2, 0.8: 4 px <= 8, dropped by the stride filter;
      c: level 3 (stride 32), cell (0, 0), class 1, 0.3: 4 px inside a, <= 32, dropped by it too;
      d: level 2 (stride 16), cell (0, 0), class 1, 0.35: a duplicate of a (36 px > 16), which
         Matrix NMS decays to 0.35 exp(-2) = 0.047 < 0.05: dropped by the update threshold.
    """
    h4, w4 = 16, 24
    cate = [torch.zeros(1, 3, S, S) for S in GRIDS]
    xs = [torch.zeros(1, S, h4, w4) for S in GRIDS]
    ys = [torch.zeros(1, S, h4, w4) for S in GRIDS]
    for level, S in enumerate(GRIDS):
        for k in range(S):
            xs[level][0, k, :, 2 * k : 2 * k + 2] = 1.0
            ys[level][0, k, 2 * k : 2 * k + 2, :] = 1.0
    for level in (4, 2):  # cell (0, 0) of these levels: the 6 x 6 block at the origin
        xs[level][0, 0, :, :6] = 1.0
        ys[level][0, 0, :6, :] = 1.0
    cate[4][0, 0, 0, 0] = 0.9  # a
    cate[0][0, 1, 3, 3] = 0.8  # b
    cate[3][0, 0, 0, 0] = 0.3  # c
    cate[2][0, 0, 0, 0] = 0.35  # d
    return cate, xs, ys


def test_post_process_filters_on_constructed_inputs():
    meta = [{"input_size": (64, 96), "orig_size": (64, 96)}]
    preds = constructed_predictions()
    (result,) = small_head().PostProcess(preds, meta, padded_size=(64, 96))
    assert result["labels"].tolist() == [1]
    assert result["scores"].tolist() == pytest.approx([0.9])
    # x4 bilinear upsampling of the 6 x 6 block, then > 0.5: 24 x 24 less nothing at the
    # image corner (the block touches the border), less one pixel at the inner corner
    assert result["masks"].shape == (1, 64, 96) and result["masks"].sum() == 24 * 24 - 1
    (no_filter,) = small_head(filter_small_masks=False).PostProcess(
        preds, meta, padded_size=(64, 96)
    )
    assert sorted(no_filter["labels"].tolist()) == [1, 1, 2]  # b and c back, d still decayed
    (no_update,) = small_head(update_thresh=0.0).PostProcess(preds, meta, padded_size=(64, 96))
    assert no_update["labels"].tolist() == [1, 1]
    assert no_update["scores"][1].item() == pytest.approx(0.35 * math.exp(-2.0), rel=1e-4)


def test_post_process_with_nothing_above_threshold_is_empty():
    head = small_head(cate_thresh=1.0)
    results = head.PostProcess(eval_predictions(head), [{"orig_size": (50, 60)}] * 2)
    for result in results:
        assert result["masks"].shape == (0, 50, 60) and result["masks"].dtype == torch.uint8
        assert result["labels"].shape == (0,) and result["scores"].shape == (0,)
