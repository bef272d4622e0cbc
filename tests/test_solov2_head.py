"""Tests of solov2_head.py (and of the model / config plumbing of every model type).

Known answers on small inputs: dynamic convolution against an explicit conv2d per cell, targets
of hand-placed boxes (padded 256 x 320, masks at 64 x 80 on every level), losses against the
full S^2 computation and torchvision's focal loss, post-processing filters on hand-built
predictions; one training step and one prediction per model type on a 64 x 96 input.
Run: python -m pytest -q tests/test_solov2_head.py
"""

import argparse
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import postprocess
import solo_head
from config import (
    CIS680,
    CPU,
    LIGHT_SCALE_RANGES,
    MODELS,
    add_config_args,
    config_from_args,
    config_from_dict,
    config_to_dict,
)
from model import build_model
from solo_head import cell_levels, dice_loss, featmap_sizes_for, target_single_img
from solov2_head import MaskFeatBranch, SOLOv2Head, dynamic_mask_logits, upsample_logits

H, W = 256, 320  # padded input of the target tests
GRIDS = (10, 8, 6, 4, 3)  # small heads
RANGES = ((1, 48), (24, 96), (48, 192), (96, 384), (192, 2048))


def small_head(**kwargs):
    torch.manual_seed(0)
    options = dict(
        in_channels=32,
        seg_feat_channels=32,
        stacked_convs=2,
        kernel_channels=16,
        mask_feat_channels=16,
        gn_groups=8,
        num_grids=GRIDS,
        scale_ranges=RANGES,
    )
    return SOLOv2Head(**{**options, **kwargs})


def fpn_features(B=2, C=32, Hi=128, Wi=160, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, Hi // s, Wi // s, generator=generator) for s in (4, 8, 16, 32, 64)]


def box_instance(x1, y1, x2, y2, label=1, size=(H, W)):
    mask = torch.zeros(*size, dtype=torch.uint8)
    mask[y1:y2, x1:x2] = 1
    return torch.tensor([x1, y1, x2, y2], dtype=torch.float32), label, mask


def stack(instances, size=(H, W)):
    boxes = torch.stack([b for b, _, _ in instances]) if instances else torch.zeros(0, 4)
    labels = torch.tensor([lab for _, lab, _ in instances], dtype=torch.int64)
    masks = (
        torch.stack([m for _, _, m in instances])
        if instances
        else torch.zeros(0, *size, dtype=torch.uint8)
    )
    return boxes, labels, masks


def block_mean_downsample(mask, factor):
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    blocks = mask.float().reshape(h, factor, w, factor)  # (H, W) -> (h, f, w, f)
    return (blocks.mean(dim=(1, 3)) >= 0.5).to(torch.uint8)


def positive_cells(ins_ind, S):
    return {divmod(int(k), S) for k in ins_ind.nonzero().flatten()}


# --- dynamic convolution --------------------------------------------------------------------


def test_dynamic_conv_equals_an_explicit_conv2d_per_cell():
    torch.manual_seed(0)
    mask_feats = torch.randn(3, 8, 10, 12)
    kernels = torch.randn(7, 8)
    img_idx = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    ours = dynamic_mask_logits(mask_feats, kernels, img_idx)
    assert ours.shape == (7, 10, 12)
    for k in range(7):
        expected = F.conv2d(mask_feats[img_idx[k]][None], kernels[k].view(1, 8, 1, 1))[0, 0]
        assert torch.allclose(ours[k], expected, atol=1e-5)
    assert dynamic_mask_logits(mask_feats, kernels[:0], img_idx[:0]).shape == (0, 10, 12)
    with pytest.raises(ValueError, match="kernels"):
        dynamic_mask_logits(mask_feats, torch.randn(2, 5), img_idx[:2])


def test_dynamic_conv_gradients_equal_the_explicit_ones():
    torch.manual_seed(0)
    feats_a = torch.randn(2, 4, 5, 6, requires_grad=True)
    kernels_a = torch.randn(3, 4, requires_grad=True)
    img_idx = torch.tensor([1, 0, 1])
    dynamic_mask_logits(feats_a, kernels_a, img_idx).pow(2).sum().backward()
    feats_b, kernels_b = feats_a.detach().requires_grad_(), kernels_a.detach().requires_grad_()
    explicit = [
        F.conv2d(feats_b[img_idx[k]][None], kernels_b[k].view(1, 4, 1, 1)) for k in range(3)
    ]
    sum(e.pow(2).sum() for e in explicit).backward()
    assert torch.allclose(feats_a.grad, feats_b.grad, atol=1e-5)
    assert torch.allclose(kernels_a.grad, kernels_b.grad, atol=1e-5)


def test_cell_levels_split_global_indices():
    # grids 10, 8, 6, 4, 3: levels start at cells 0, 100, 164, 200, 216 (225 in all)
    cells = torch.tensor([0, 99, 100, 163, 164, 199, 200, 215, 216, 224])
    level, local = cell_levels(cells, GRIDS)
    assert level.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert local.tolist() == [0, 99, 0, 63, 0, 35, 0, 15, 0, 8]


# --- network --------------------------------------------------------------------------------


def test_mask_feature_branch_shapes_and_structure():
    branch = MaskFeatBranch(in_channels=32, feat_channels=16, out_channels=24, gn_groups=8)
    # P2: one conv; P3..P5: 1, 2, 3 blocks of conv + x2; coordinates only into P5's first conv
    assert [len(blocks) for blocks in branch.level_convs] == [1, 1, 2, 3]
    first_in = [blocks[0][0].in_channels for blocks in branch.level_convs]
    assert first_in == [32, 32, 32, 34]
    assert branch.out[0].kernel_size == (1, 1) and isinstance(branch.out[1], torch.nn.GroupNorm)
    feats = fpn_features(B=2, Hi=64, Wi=96)[:4]
    out = branch(feats)
    assert out.shape == (2, 24, 16, 24)  # (B, E, H/4, W/4)
    assert (out >= 0).all()  # GN + ReLU at the end, as the authors
    with pytest.raises(ValueError, match="P2..P5"):
        branch(feats[:3])


def test_forward_shapes_of_every_branch():
    head = small_head()
    feats = fpn_features()
    cate, kernels, mask_feats = head(feats)
    assert [tuple(c.shape) for c in cate] == [(2, 3, S, S) for S in GRIDS]
    assert [tuple(k.shape) for k in kernels] == [(2, 16, S, S) for S in GRIDS]
    assert tuple(mask_feats.shape) == (2, 16, 32, 40)  # (B, E, H/4, W/4)
    full = head.mask_logits(mask_feats, kernels[1])
    assert tuple(full.shape) == (2, 64, 32, 40)  # all S^2 masks of a level
    with torch.no_grad():
        cate_eval, kernels_eval, mask_eval = head(feats, eval=True)
    assert torch.equal(cate_eval[0], postprocess.points_nms(torch.sigmoid(cate[0])).detach())
    assert all(((c >= 0) & (c <= 1)).all() for c in cate_eval)
    assert torch.allclose(kernels_eval[2], kernels[2]) and torch.allclose(mask_eval, mask_feats)


def test_default_head_is_the_authors():
    head = SOLOv2Head()  # 4 convs of 512, E = 256, mask branch 128, prior bias
    assert len(head.kernel_convs) == len(head.cate_convs) == 4
    assert head.kernel_convs[0][0].in_channels == 258  # with the coordinate channels
    assert head.cate_convs[0][0].in_channels == 256  # without them
    assert head.kernel_convs[1][0].in_channels == 512
    assert head.kernel_out.out_channels == 256 and head.kernel_out.kernel_size == (3, 3)
    assert head.cate_out.out_channels == 3
    assert head.mask_feat_branch.level_convs[0][0][0].out_channels == 128
    assert head.mask_feat_branch.out[0].out_channels == 256
    assert torch.allclose(head.cate_out.bias, torch.full((3,), -math.log(99.0)))
    assert torch.count_nonzero(head.kernel_out.bias) == 0
    assert (head.cate_thresh, head.pre_NMS_num, head.keep_instance) == (0.1, 500, 100)
    assert head.update_thresh == 0.05 and head.filter_small_masks
    with torch.no_grad():
        cate, kernels, mask_feats = head(fpn_features(B=1, C=256, Hi=64, Wi=64))
    assert [c.shape[-1] for c in cate] == [40, 36, 24, 16, 12]
    assert [k.shape[1] for k in kernels] == [256] * 5 and mask_feats.shape == (1, 256, 16, 16)
    assert torch.count_nonzero(small_head(init="xavier").cate_out.bias) == 0


# --- targets --------------------------------------------------------------------------------


def test_targets_on_hand_placed_boxes_are_at_the_mask_feature_size():
    head = SOLOv2Head(num_classes=4)  # the hand-out's grids and scale ranges
    small = box_instance(100, 60, 140, 100, label=2)  # scale 40: level 0 only
    large = box_instance(60, 28, 260, 228, label=3)  # scale 200: levels 2 and 3
    boxes, labels, masks = stack([small, large])
    sizes = [(H // 4, W // 4)] * 5  # every level at the mask-feature size 64 x 80
    img_ins, img_cate, img_ind = head.target(sizes, [boxes], [labels], [masks], (H, W))
    ins, cate, ind = img_ins[0], img_cate[0], img_ind[0]
    # level 0, S = 40: rows 11..13 around centre row 12, columns 14..15 (see test_solo_head)
    assert positive_cells(ind[0], 40) == {(i, j) for i in (11, 12, 13) for j in (14, 15)}
    assert set(cate[0].unique().tolist()) == {0, 2}
    # level 2, S = 24: the 3 x 3 cells around (12, 12)
    assert positive_cells(ind[2], 24) == {
        (12 + di, 12 + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)
    }
    assert set(cate[2].unique().tolist()) == {0, 3}
    # level 3, S = 16: centre cell (8, 8), half-size 20 px = 1.25 cells -> 3 x 3 cells
    assert positive_cells(ind[3], 16) == {
        (8 + di, 8 + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)
    }
    assert not ind[1].any() and not ind[4].any()
    # masks at stride 4 on every level (SOLO would use 32 x 40 on level 2, 16 x 20 on level 3)
    assert [tuple(i.shape) for i in ins] == [
        (6, 64, 80),
        (0, 64, 80),
        (9, 64, 80),
        (9, 64, 80),
        (0, 64, 80),
    ]
    assert all(torch.equal(m, block_mean_downsample(small[2], 4)) for m in ins[0])
    assert all(torch.equal(m, block_mean_downsample(large[2], 4)) for m in (*ins[2], *ins[3]))
    # the same cells and categories as SOLO's targets
    _, solo_cate, solo_ind = target_single_img(boxes, labels, masks, featmap_sizes_for((H, W)))
    for level in range(5):
        assert torch.equal(cate[level], solo_cate[level])
        assert torch.equal(ind[level], solo_ind[level])


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


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_loss_equals_the_full_computation(stride):
    head = small_head(mask_loss_stride=stride)
    cate, kernels, mask_feats = head(fpn_features(seed=1))
    data = batch_of_three()
    losses = head.loss((cate, kernels, mask_feats), **data)
    assert losses["num_pos"] > 0

    # All S^2 dynamic masks per level, upsampled 4 / stride times (bilinear, logits), then the
    # positives picked with ins_ind_label; targets at 128 / stride x 160 / stride.
    sizes = [(128 // stride, 160 // stride)] * 5
    img_ins, img_cate, img_ind = head.target(sizes, *data.values(), (128, 160))
    assert img_ins[0][0].shape[-2:] == (128 // stride, 160 // stride)
    dices = []
    for level, kernel_pred in enumerate(kernels):
        full = head.mask_logits(mask_feats, kernel_pred)  # (B, S^2, 32, 40)
        full = F.interpolate(full, scale_factor=4 // stride, mode="bilinear")
        full = torch.sigmoid(full)  # (B, S^2, 128 / stride, 160 / stride)
        for b in range(2):
            dices.append(dice_loss(full[b][img_ind[b][level]], img_ins[b][level]))
    assert torch.allclose(losses["mask"], torch.cat(dices).mean(), atol=1e-5)
    assert losses["num_pos"] == sum(int(i.sum()) for lvl in img_ind for i in lvl)
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, 3) for c in cate])
    targets = torch.cat([torch.stack(lvl).flatten() for lvl in zip(*img_cate, strict=True)])
    one_hot = F.one_hot(targets, 4)[:, 1:].float()
    focal = sigmoid_focal_loss(logits, one_hot, reduction="sum") / (losses["num_pos"] + 1)
    assert torch.allclose(losses["cate"], focal, rtol=1e-5)
    assert torch.allclose(losses["total"], losses["cate"] + 3 * losses["mask"])


def test_upsampled_logits_keep_a_straight_edge_between_coarse_pixels():
    # logits -6.5, -1.5, 3.5, 8.5: a linear ramp with its zero at column 1.3. Bilinear x4
    # (align_corners=False) reproduces the ramp at output columns j with source column
    # (j + 0.5) / 4 - 0.5 inside [0, 3], so it turns positive from j = 7 on; outside, the edge
    # columns repeat (-6.5 and 8.5).
    logits = (5 * (torch.arange(4.0) - 1.3)).expand(3, 4).repeat(2, 1, 1)  # (2, 3, 4)
    up = upsample_logits(logits, 4)  # (2, 12, 16)
    assert up.shape == (2, 12, 16)
    source = (torch.arange(16.0) + 0.5) / 4 - 0.5
    ramp = 5 * (source.clamp(0, 3) - 1.3)
    torch.testing.assert_close(up[1, 6], ramp)
    assert (up[0, 6] > 0).tolist() == [False] * 7 + [True] * 9
    assert upsample_logits(logits, 1) is logits


def test_mask_loss_stride_must_be_1_2_or_4():
    with pytest.raises(ValueError, match="mask_loss_stride"):
        small_head(mask_loss_stride=3)
    assert small_head(mask_loss_stride=1).mask_upsample == 4


def test_no_objects_gives_positive_category_loss_and_zero_mask_loss():
    head = small_head()
    preds = head(fpn_features())
    losses = head.loss(
        preds,
        [torch.zeros(0, 4)] * 2,
        [torch.zeros(0, dtype=torch.int64)] * 2,
        [torch.zeros(0, 128, 160, dtype=torch.uint8)] * 2,
    )
    assert losses["num_pos"] == 0 and losses["mask"].item() == 0.0
    assert torch.isfinite(losses["cate"]) and losses["cate"].item() > 0
    losses["total"].backward()
    assert head.kernel_out.weight.grad is not None
    assert torch.count_nonzero(head.kernel_out.weight.grad) == 0
    assert torch.count_nonzero(head.cate_out.weight.grad) > 0


def test_labels_outside_the_classes_are_refused():
    head = small_head()
    masks = torch.ones(1, 128, 160, dtype=torch.uint8)
    with pytest.raises(ValueError, match="labels must be class ids in 1..3"):
        head.loss(
            head(fpn_features(B=1)),
            [torch.tensor([[0.0, 0, 160, 128]])],
            [torch.tensor([4])],
            [masks],
        )


# --- inference ------------------------------------------------------------------------------


def eval_predictions(head, seed=0):
    """Eval-mode predictions with category scores spread over [0, 1] and varied masks."""
    with torch.no_grad():
        torch.nn.init.normal_(head.cate_out.weight, std=0.5)
        torch.nn.init.zeros_(head.cate_out.bias)
        torch.nn.init.normal_(head.kernel_out.weight, std=0.5)
        return head(fpn_features(B=2, seed=seed), eval=True)


def test_post_process_equals_the_full_computation():
    head = small_head(cate_thresh=0.5, keep_instance=8, pre_NMS_num=30)
    cate, kernels, mask_feats = eval_predictions(head)
    metas = [
        {"input_size": (120, 150), "orig_size": (60, 75)},
        {"input_size": (128, 160), "orig_size": (256, 320)},
    ]
    results = head.PostProcess((cate, kernels, mask_feats), metas)
    for b, (result, meta) in enumerate(zip(results, metas, strict=True)):
        scores = torch.cat([c[b].permute(1, 2, 0).reshape(-1, 3) for c in cate])
        probs = torch.cat(
            [
                torch.sigmoid(head.mask_logits(mask_feats[b : b + 1], k[b : b + 1]))[0]
                for k in kernels
            ]
        )  # every cell's mask, (sum S^2, 32, 40)
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
        assert (
            result["masks"].shape[1:] == meta["orig_size"] and result["masks"].dtype == torch.uint8
        )
        assert result["labels"].dtype == torch.int64 and result["scores"].dtype == torch.float32
        assert torch.equal(result["labels"], expected["labels"])
        assert torch.equal(result["masks"], expected["masks"])
        assert torch.allclose(result["scores"], expected["scores"], atol=1e-6)


def constructed_predictions():
    """Hand-built eval predictions on a 64 x 96 input (mask features 16 x 24, E = 3).

    Feature channel e is +20 inside a rectangle and -20 outside, so the kernel one-hot on e
    gives that rectangle as its mask (sigmoid(20) ~ 1): e=0: 3 x 4 = 12 pixels, e=1: 2 x 4 = 8
    pixels, e=2: 6 x 8 = 48 pixels, apart from the others.
    Candidates (one class each, point NMS not involved):
      a: level 0 (stride 8), class 1, 0.9, rectangle 0 (12 px > 8: kept)
      b: level 0 (stride 8), class 2, 0.7, rectangle 1 (8 px, not > 8: dropped by the stride filter)
      c: level 2 (stride 16), class 2, 0.8, rectangle 0 (12 px <= 16: dropped by the stride filter)
      d: level 3 (stride 32), class 3, 0.6, rectangle 2 (48 px > 32: kept)
      e: level 1 (stride 8), class 1, 0.3, rectangle 0 again: a duplicate of a, Matrix NMS
         decays it to 0.3 exp(-2) = 0.041 < 0.05 (dropped by the update threshold).
    """
    E, h4, w4 = 3, 16, 24
    mask_feats = torch.full((1, E, h4, w4), -20.0)
    mask_feats[0, 0, 2:5, 2:6] = 20.0
    mask_feats[0, 1, 10:12, 2:6] = 20.0
    mask_feats[0, 2, 8:14, 12:20] = 20.0
    cate = [torch.zeros(1, 3, S, S) for S in GRIDS]
    kernels = [torch.zeros(1, E, S, S) for S in GRIDS]

    def put(level, cell, cls, score, channel):
        cate[level][0, cls - 1, cell[0], cell[1]] = score
        kernels[level][0, channel, cell[0], cell[1]] = 1.0

    put(0, (1, 1), 1, 0.9, 0)  # a
    put(0, (6, 2), 2, 0.7, 1)  # b
    put(2, (1, 1), 2, 0.8, 0)  # c
    put(3, (2, 2), 3, 0.6, 2)  # d
    put(1, (1, 1), 1, 0.3, 0)  # e
    return cate, kernels, mask_feats


def test_post_process_filters_on_constructed_inputs():
    head = small_head(kernel_channels=3, keep_instance=10)
    preds = constructed_predictions()
    meta = [{"input_size": (64, 96), "orig_size": (64, 96)}]
    (result,) = head.PostProcess(preds, meta, padded_size=(64, 96))
    assert result["labels"].tolist() == [1, 3]  # a and d
    assert torch.allclose(result["scores"], torch.tensor([0.9, 0.6]), atol=1e-4)
    assert result["masks"].shape == (2, 64, 96)
    # x4 bilinear upsampling, then > 0.5: the rectangle x 4, less its 4 corner pixels (0.39)
    assert result["masks"][0].sum() == 12 * 16 - 4 and result["masks"][1].sum() == 48 * 16 - 4
    # without the stride filter b and c come back; without the update threshold e does
    (no_filter,) = small_head(
        kernel_channels=3, keep_instance=10, filter_small_masks=False
    ).PostProcess(preds, meta, padded_size=(64, 96))
    assert sorted(no_filter["labels"].tolist()) == [1, 2, 2, 3]
    (no_update,) = small_head(kernel_channels=3, keep_instance=10, update_thresh=0.0).PostProcess(
        preds, meta, padded_size=(64, 96)
    )
    assert no_update["labels"].tolist() == [1, 3, 1]
    assert no_update["scores"][2].item() == pytest.approx(0.3 * math.exp(-2.0), rel=1e-3)


def test_post_process_with_nothing_above_threshold_is_empty():
    head = small_head(cate_thresh=1.0)
    results = head.PostProcess(eval_predictions(head), [{"orig_size": (50, 60)}] * 2)
    for result in results:
        assert result["masks"].shape == (0, 50, 60) and result["masks"].dtype == torch.uint8
        assert result["labels"].shape == (0,) and result["scores"].shape == (0,)


# --- every model type through model.py ------------------------------------------------------

TINY = replace(
    CPU,
    depth=18,
    fpn_channels=16,
    seg_feat_channels=16,
    stacked_convs=1,
    kernel_channels=8,
    mask_feat_channels=8,
    num_grids=(8, 6, 4, 3, 2),
    scale_ranges=((1, 24), (12, 48), (24, 96), (48, 192), (96, 2048)),
    cate_thresh=0.0,
    keep_instance=5,
)


def tiny_batch():
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    _, _, big = box_instance(20, 10, 60, 40, size=(64, 96))
    _, _, small = box_instance(60, 40, 76, 52, size=(64, 96))
    masks = [torch.stack([big, small]), torch.zeros(0, 64, 96, dtype=torch.uint8)]
    boxes = [torch.tensor([[20.0, 10, 60, 40], [60, 40, 76, 52]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.int64)]
    return images, labels, masks, boxes


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_one_step_and_predicts(name):
    torch.manual_seed(0)
    model = build_model(replace(TINY, model=name), num_classes=3)
    images, labels, masks, boxes = tiny_batch()
    losses = model(images, labels, masks, boxes)
    assert set(losses) == {"total", "cate", "mask"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["mask"].item() > 0
    losses["total"].backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {param_name}"
    # every branch of the head learns something from this batch
    branches = {
        "solo": ("cate_convs", "mask_convs", "cate_out", "mask_out.0"),
        "decoupled_solo": (
            "cate_convs",
            "mask_convs_x",
            "mask_convs_y",
            "mask_out_x.0",
            "mask_out_y.0",
        ),
        "decoupled_solo_light": ("cate_convs", "mask_convs", "mask_out_x.0", "mask_out_y.0"),
        "solov2": ("cate_convs", "kernel_convs", "kernel_out", "cate_out", "mask_feat_branch"),
    }[name.replace("solov2_light", "solov2")]
    grads = dict(model.head.named_parameters())
    for branch in branches:
        moved = [bool(p.grad.abs().sum() > 0) for n, p in grads.items() if n.startswith(branch)]
        assert moved and any(moved), f"{name}: no gradient reaches {branch}"
    if name.startswith("solov2"):  # all four levels of the mask-feature branch are summed
        for level_convs in model.head.mask_feat_branch.level_convs:
            assert torch.count_nonzero(level_convs[0][0].weight.grad) > 0

    model.eval()
    metas = [
        {"input_size": (60, 90), "orig_size": (30, 45)},
        {"input_size": (64, 96), "orig_size": (64, 96)},
    ]
    results = model.predict(images, metas)
    for result, meta in zip(results, metas, strict=True):
        k = result["masks"].shape[0]
        assert (
            result["masks"].shape == (k, *meta["orig_size"])
            and result["masks"].dtype == torch.uint8
        )
        assert result["labels"].shape == (k,) and result["scores"].shape == (k,)
        assert ((result["labels"] >= 1) & (result["labels"] <= 3)).all()
    empty = build_model(replace(TINY, model=name, cate_thresh=1.0), num_classes=3).eval()
    for result, meta in zip(empty.predict(images, metas), metas, strict=True):
        assert result["masks"].shape == (0, *meta["orig_size"]) and result["labels"].shape == (0,)


def test_build_model_refuses_an_unknown_model():
    with pytest.raises(ValueError, match="model"):
        build_model(replace(TINY, model="solov3"), num_classes=3)


# --- config: model defaults -----------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def test_light_models_bring_their_defaults_unless_set():
    cfg = parse(["--preset", "cis680", "--model", "solov2_light"])
    assert (cfg.seg_feat_channels, cfg.stacked_convs, cfg.kernel_channels) == (256, 2, 128)
    assert cfg.scale_ranges == LIGHT_SCALE_RANGES and cfg.input_size == (448, 597)
    assert (cfg.cate_thresh, cfg.pre_nms_num, cfg.keep_instance) == (0.1, 500, 100)
    cfg = parse(["--preset", "cis680", "--model", "solov2_light", "--stacked-convs", "3"])
    assert cfg.stacked_convs == 3 and cfg.seg_feat_channels == 256  # the user's flag wins
    cfg = parse(["--preset", "cis680", "--model", "solov2"])
    assert (cfg.seg_feat_channels, cfg.stacked_convs, cfg.kernel_channels) == (512, 4, 256)
    cfg = parse(["--preset", "cis680", "--model", "decoupled_solo_light"])
    assert (cfg.seg_feat_channels, cfg.stacked_convs) == (256, 2)
    assert parse(["--preset", "cis680"]) == CIS680  # SOLO: the hand-out's values untouched


def test_cpu_preset_keeps_its_small_model_for_every_model():
    assert parse(["--preset", "cpu", "--model", "solov2"]) == replace(CPU, model="solov2")
    assert parse(["--preset", "cpu", "--model", "solov2_light"]) == replace(
        CPU, model="solov2_light", kernel_channels=64
    )


def test_model_config_round_trips_through_the_checkpoint_dict():
    cfg = parse(["--preset", "cis680", "--model", "solov2_light"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="model must be one of"):
        parse(["--preset", "cpu", "--model", "maskrcnn"])


def test_gt_plots_of_the_solov2_targets(tmp_path):
    import synthetic

    prefix = synthetic.main(["--num", "2", "--seed", "1", "--root", str(tmp_path / "data")])
    out = tmp_path / "plots"
    solo_head.main(
        [
            "--model",
            "solov2",
            "--cis680",
            str(prefix),
            "--size",
            "64",
            "96",
            "--num",
            "1",
            "--out",
            str(out),
        ]
    )
    assert len(list(out.glob("gt_levels_*.png"))) == 1
