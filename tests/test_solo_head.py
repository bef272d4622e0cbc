"""Tests of solo_head.py with known answers: targets, losses, shapes, positive-only masks.

Small inputs throughout (padded 256 x 320 for targets, 128 x 160 for the network).
Run: python -m pytest -q tests/test_solo_head.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import postprocess
from backbone import build_backbone
from solo_head import (
    NUM_GRIDS,
    SOLOHead,
    centre_cells,
    dice_loss,
    featmap_sizes_for,
    focal_loss,
    focal_normalizer,
    mask_centres,
    mask_logits_for_cells,
    mask_logits_full,
    multi_apply,
    new_fpn,
    target_single_img,
    total_loss,
)

H, W = 256, 320  # padded input of the target tests (multiples of 32)
SIZES = featmap_sizes_for((H, W))  # [(64, 80), (64, 80), (32, 40), (16, 20), (16, 20)]


def box_instance(x1, y1, x2, y2, label=1):
    """A filled box: box (4,), label, mask (H, W) uint8."""
    mask = torch.zeros(H, W, dtype=torch.uint8)
    mask[y1:y2, x1:x2] = 1
    return torch.tensor([x1, y1, x2, y2], dtype=torch.float32), label, mask


def targets_of(instances, **kwargs):
    boxes = torch.stack([b for b, _, _ in instances]) if instances else torch.zeros(0, 4)
    labels = torch.tensor([lab for _, lab, _ in instances], dtype=torch.int64)
    masks = torch.stack([m for _, _, m in instances]) if instances else torch.zeros(0, H, W)
    return target_single_img(boxes, labels, masks.to(torch.uint8), SIZES, (H, W), **kwargs)


def positive_cells(ins_ind, S):
    return {divmod(int(k), S) for k in ins_ind.nonzero().flatten()}


def block_mean_downsample(mask, factor):
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    blocks = mask.float().reshape(h, factor, w, factor)  # (H, W) -> (h, f, w, f)
    return (blocks.mean(dim=(1, 3)) >= 0.5).to(torch.uint8)


def small_head(**kwargs):
    torch.manual_seed(0)
    options = dict(
        in_channels=32,
        seg_feat_channels=32,
        stacked_convs=2,
        num_grids=(10, 8, 6, 4, 3),
        scale_ranges=((1, 48), (24, 96), (48, 192), (96, 384), (192, 2048)),
    )
    return SOLOHead(**{**options, **kwargs})


def fpn_features(B=2, C=32, Hi=128, Wi=160, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, Hi // s, Wi // s, generator=generator) for s in (4, 8, 16, 32, 64)]


# --- targets --------------------------------------------------------------------------------


def test_known_box_lands_on_expected_level_and_cells():
    # 40 x 40 box: scale 40 -> level 0 only (1..96; level 1 starts at 48).
    # Centre (cy, cx) = (80, 120); half-sizes 0.5 * 0.2 * 40 = 4.
    # S = 40: rows floor(76 * 40/256) = 11 .. floor(84 * 40/256) = 13, centre row 12;
    # columns floor(116 * 40/320) = 14 .. floor(124 * 40/320) = 15, centre column 15.
    ins, cate, ind = targets_of([box_instance(100, 60, 140, 100, label=2)])
    expected = {(i, j) for i in (11, 12, 13) for j in (14, 15)}
    assert positive_cells(ind[0], 40) == expected
    assert {tuple(ij) for ij in (cate[0] > 0).nonzero().tolist()} == expected
    assert set(cate[0].unique().tolist()) == {0, 2}
    assert ins[0].shape == (6, 64, 80) and ins[0].dtype == torch.uint8
    for level in range(1, 5):
        assert not ind[level].any() and not cate[level].any() and ins[level].shape[0] == 0
    assert [c.shape for c in cate] == [(S, S) for S in NUM_GRIDS]
    assert [i.shape for i in ind] == [(S * S,) for S in NUM_GRIDS]


def test_instance_in_overlapping_ranges_sits_on_both_levels():
    # scale 64 is in (1, 96) and (48, 192) but not (96, 384)
    ins, cate, ind = targets_of([box_instance(40, 40, 104, 104, label=3)])
    assert [bool(i.any()) for i in ind] == [True, True, False, False, False]
    assert (cate[0] == 3).sum() > 0 and (cate[1] == 3).sum() > 0
    # the ranges' ends are inclusive: scale 96 is on levels 0, 1 and 2
    _, _, ind = targets_of([box_instance(40, 40, 136, 136)])
    assert [bool(i.any()) for i in ind] == [True, True, True, False, False]


def test_region_is_clipped_to_3x3_around_the_centre_cell():
    # 200 x 200 box on level 2 (S = 24): half-size 20 px is about 2 cells each way.
    _, cate, ind = targets_of([box_instance(60, 28, 260, 228)])
    S = 24
    cy, cx = 128.0, 160.0
    row, col = math.floor(cy * S / H), math.floor(cx * S / W)  # 12, 12
    expected = {(row + di, col + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)}
    assert positive_cells(ind[2], S) == expected
    assert int((cate[2] > 0).sum()) == 9


def test_region_is_clipped_to_the_grid():
    # centre cell (0, 9); rows floor(-29/25.6) -> 0 .. floor(31/25.6) = 1;
    # columns floor(278/32) = 8 .. floor(358/32) = 11 -> 9
    assert centre_cells((1.0, 318.0), (30.0, 40.0), (H, W), 10) == (0, 1, 8, 9)


def test_mask_target_is_the_exact_downsample():
    torch.manual_seed(0)
    # an irregular blob (a disc with a ragged edge) whose box gives scale 64 (levels 0, 1)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    radius = 32 + 3 * torch.rand(H, W)
    mask = (((yy - 100.0) ** 2 + (xx - 150.0) ** 2).sqrt() < radius).to(torch.uint8)
    mask[100, 118:122] = 1  # a sliver exactly 2 of 4 pixels wide in some blocks
    ys, xs = mask.nonzero(as_tuple=True)
    box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    ins, _, ind = target_single_img(box[None], torch.tensor([1]), mask[None], SIZES, (H, W))
    for level, factor in ((0, 4), (1, 4)):
        expected = block_mean_downsample(mask, factor)
        assert ins[level].shape[0] == int(ind[level].sum()) > 0
        for channel in ins[level]:
            assert torch.equal(channel, expected)


def test_centre_of_mass_of_a_filled_box_is_its_centre():
    _, _, mask = box_instance(10, 20, 50, 40)
    assert mask_centres(mask[None]).tolist() == [[30.0, 30.0]]


def test_two_instances_on_one_cell_smaller_mask_wins():
    # Both on level 0 with centre cells (12, 15) and (12, 16) side by side, so the regions
    # overlap on row 12 / columns 15..16. The smaller instance (label 2) must own all its
    # cells, the larger (label 1) keeps only the rest, whatever the input order.
    big = box_instance(80, 50, 160, 110, label=1)  # 80 x 60, centre (80, 120)
    small = box_instance(110, 68, 150, 92, label=2)  # 40 x 24, centre (80, 130)
    alone_small = targets_of([small])
    alone_big = targets_of([big])
    small_cells = positive_cells(alone_small[2][0], 40)
    big_cells = positive_cells(alone_big[2][0], 40)
    assert small_cells & big_cells  # they do conflict
    for order in ([big, small], [small, big]):
        ins, cate, ind = targets_of(order)
        assert positive_cells(ind[0], 40) == small_cells | big_cells
        channels = ind[0].nonzero().flatten().tolist()  # increasing k
        for row, k in enumerate(channels):
            cell = divmod(k, 40)
            winner = small if cell in small_cells else big
            assert int(cate[0][cell]) == winner[1]
            assert torch.equal(ins[0][row], block_mean_downsample(winner[2], 4))


def test_empty_masks_and_images_give_no_positives():
    box, label, mask = box_instance(100, 60, 140, 100)
    ins, cate, ind = target_single_img(
        box[None], torch.tensor([label]), torch.zeros_like(mask)[None], SIZES, (H, W)
    )
    assert not any(i.any() for i in ind) and all(i.shape[0] == 0 for i in ins)
    ins, cate, ind = targets_of([])
    assert not any(c.any() for c in cate)
    assert [i.shape for i in ins] == [(0, h, w) for h, w in SIZES]


def test_target_over_a_batch_via_multi_apply():
    head = SOLOHead()
    images = [[box_instance(100, 60, 140, 100)], []]
    boxes = [torch.stack([b for b, _, _ in im]) if im else torch.zeros(0, 4) for im in images]
    labels = [torch.tensor([lab for _, lab, _ in im], dtype=torch.int64) for im in images]
    masks = [
        torch.stack([m for _, _, m in im]) if im else torch.zeros(0, H, W, dtype=torch.uint8)
        for im in images
    ]
    img_ins, img_cate, img_ind = head.target(SIZES, boxes, labels, masks, (H, W))
    assert len(img_ins) == len(img_cate) == len(img_ind) == 2
    assert all(len(levels) == 5 for levels in img_ind)
    assert int(img_ind[0][0].sum()) == 6 and not any(i.any() for i in img_ind[1])
    assert multi_apply(divmod, [7, 9], [2, 4]) == ([3, 2], [1, 1])


# --- losses ---------------------------------------------------------------------------------


def test_focal_loss_equals_torchvision():
    torch.manual_seed(0)
    logits = torch.randn(60, 3) * 4
    logits[0] = torch.tensor([60.0, -60.0, 0.0])  # saturated entries stay finite
    targets = torch.randint(0, 4, (60,))
    one_hot = F.one_hot(targets, 4)[:, 1:].float()
    reference = sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0, reduction="sum")
    ours = focal_loss(logits, targets, alpha=0.25, gamma=2.0, normalizer=7.0)
    assert torch.isfinite(ours)
    assert torch.allclose(ours, reference / 7.0, rtol=1e-5)


def test_focal_normalizers():
    targets = torch.tensor([0, 0, 2, 0, 1, 0])
    assert focal_normalizer(targets, 3, "positives") == 3.0  # 2 positive cells + 1
    assert focal_normalizer(targets, 3, "entries") == 18.0  # 6 cells x 3 classes
    with pytest.raises(ValueError):
        focal_normalizer(targets, 3, "images")


def test_dice_known_values():
    q = torch.zeros(1, 8, 8)
    q[0, 2:6, 2:6] = 1
    assert dice_loss(q, q, eps=0.0).item() == 0.0  # perfect prediction
    assert dice_loss(q, q).item() == pytest.approx(0.0, abs=1e-4)  # eps / (16 + eps)
    half = torch.zeros(1, 8, 8)
    half[0, 2:6, 2:4] = 1
    half[0, 2:6, 6:8] = 1  # area 16, overlap 8 -> 1 - 2 * 8 / 32
    assert dice_loss(half, q, eps=0.0).item() == pytest.approx(0.5)
    empty = torch.zeros(1, 8, 8)
    assert dice_loss(empty, empty).item() == pytest.approx(1.0)  # finite thanks to eps


def test_no_objects_gives_positive_category_loss_and_zero_mask_loss():
    head = small_head()
    feats = [f.requires_grad_() for f in fpn_features()]
    preds = head(feats)
    empty = dict(
        boxes_list=[torch.zeros(0, 4)] * 2,
        labels_list=[torch.zeros(0, dtype=torch.int64)] * 2,
        masks_list=[torch.zeros(0, 128, 160, dtype=torch.uint8)] * 2,
    )
    losses = head.loss(preds, **empty)
    assert losses["num_pos"] == 0
    assert losses["mask"].item() == 0.0
    assert torch.isfinite(losses["cate"]) and losses["cate"].item() > 0
    losses["total"].backward()
    assert head.mask_out[0].weight.grad is not None
    assert torch.count_nonzero(head.mask_out[0].weight.grad) == 0
    assert torch.count_nonzero(head.cate_out.weight.grad) > 0


# --- network --------------------------------------------------------------------------------


def test_forward_shapes_on_every_level():
    head = small_head()
    feats = fpn_features()
    cate, mask = head(feats)
    grids = (10, 8, 6, 4, 3)
    # NewFPN strides 8, 8, 16, 32, 32 on 128 x 160; masks at twice the feature size
    mask_sizes = [(32, 40), (32, 40), (16, 20), (8, 10), (8, 10)]
    assert [tuple(c.shape) for c in cate] == [(2, 3, S, S) for S in grids]
    assert [tuple(m.shape) for m in mask] == [(2, 32, h, w) for h, w in mask_sizes]
    full = [head.mask_logits(m, lvl) for lvl, m in enumerate(mask)]
    assert [tuple(f.shape) for f in full] == [
        (2, S * S, h, w) for S, (h, w) in zip(grids, mask_sizes, strict=True)
    ]
    with torch.no_grad():
        cate_eval, mask_eval = head(feats, eval=True)
    assert [tuple(c.shape) for c in cate_eval] == [(2, 3, S, S) for S in grids]
    # the features stay at their level's size: the masks are resized after their sigmoid
    assert [tuple(m.shape) for m in mask_eval] == [(2, 32, h, w) for h, w in mask_sizes]
    assert all(((c >= 0) & (c <= 1)).all() for c in cate_eval)
    assert torch.equal(cate_eval[0], postprocess.points_nms(torch.sigmoid(cate[0])).detach())


def test_default_head_shapes_on_a_small_input():
    head = SOLOHead()  # hand-out defaults: 256 channels, 7 convs, grids 40..12
    assert head.cate_out.out_channels == 3 and head.mask_out[0].out_channels == 1600
    assert len(head.cate_convs) == 7 and head.mask_convs[0][0].in_channels == 258
    with torch.no_grad():
        cate, mask = head(fpn_features(B=1, C=256, Hi=64, Wi=64))
    assert [c.shape[-1] for c in cate] == [40, 36, 24, 16, 12]
    assert [tuple(m.shape[-2:]) for m in mask] == [(16, 16), (16, 16), (8, 8), (4, 4), (4, 4)]


def test_initialisations():
    authors = small_head()
    prior = -math.log(99.0)
    assert torch.allclose(authors.cate_out.bias, torch.full((3,), prior))
    assert authors.cate_convs[0][0].weight.std().item() == pytest.approx(0.01, rel=0.1)
    xavier = small_head(init="xavier")
    assert torch.count_nonzero(xavier.cate_out.bias) == 0
    with pytest.raises(ValueError, match="init"):
        small_head(init="kaiming")


def test_positive_only_mask_logits_equal_the_full_ones():
    torch.manual_seed(0)
    mask_feat = torch.randn(4, 16, 12, 14, requires_grad=True)  # image 3 has no request
    conv = torch.nn.Conv2d(16, 25, 1)
    img_idx = torch.tensor([2, 0, 2, 1, 0, 2])
    cell_idx = torch.tensor([24, 3, 0, 7, 3, 11])
    full = mask_logits_full(mask_feat, conv.weight, conv.bias)  # (4, 25, 12, 14)
    part = mask_logits_for_cells(mask_feat, img_idx, cell_idx, conv.weight, conv.bias)
    assert part.shape == (6, 12, 14)
    assert torch.allclose(part, full[img_idx, cell_idx], atol=1e-5)
    weights = torch.randn_like(part)
    grads = torch.autograd.grad((part * weights).sum(), [mask_feat, conv.weight])
    grads_full = torch.autograd.grad(
        (full[img_idx, cell_idx] * weights).sum(), [mask_feat, conv.weight]
    )
    for grad, grad_full in zip(grads, grads_full, strict=True):
        torch.testing.assert_close(grad, grad_full)
    assert not grads[0][3].any()
    empty = mask_logits_for_cells(mask_feat, cell_idx[:0], cell_idx[:0], conv.weight, conv.bias)
    assert empty.shape == (0, 12, 14)


def test_positive_only_loss_equals_the_full_computation():
    head = small_head()
    feats = fpn_features(seed=1)
    cate, mask = head(feats)
    masks = torch.zeros(3, 128, 160, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    masks[1, 70:110, 10:40] = 1
    masks[2, 10:120, 60:150] = 1
    boxes = torch.tensor([[30, 20, 90, 60], [10, 70, 40, 110], [60, 10, 150, 120]]).float()
    labels = torch.tensor([1, 2, 3])
    data = dict(
        boxes_list=[boxes, boxes[:1]],
        labels_list=[labels, labels[:1]],
        masks_list=[masks, masks[:1]],
    )
    losses = head.loss((cate, mask), **data)
    assert losses["num_pos"] > 0

    # The hand-out's way: all S^2 channels, then pick the positives with ins_ind_label.
    sizes = [tuple(m.shape[-2:]) for m in mask]
    img_ins, _, img_ind = head.target(sizes, *data.values(), (128, 160))
    dices = []
    for level, feat in enumerate(mask):
        full = torch.sigmoid(head.mask_logits(feat, level))  # (B, S^2, h, w)
        for b in range(2):
            picked = full[b][img_ind[b][level]]  # (P, h, w)
            dices.append(dice_loss(picked, img_ins[b][level]))
    expected = torch.cat(dices).mean()
    assert torch.allclose(losses["mask"], expected, atol=1e-6)
    assert losses["num_pos"] == sum(int(i.sum()) for lvl in img_ind for i in lvl)
    # the focal part against torchvision, authors' normalisation (positives + 1)
    _, img_cate, _ = head.target(sizes, *data.values(), (128, 160))
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, 3) for c in cate])
    targets = torch.cat([torch.stack(lvl).flatten() for lvl in zip(*img_cate, strict=True)])
    one_hot = F.one_hot(targets, 4)[:, 1:].float()
    focal = sigmoid_focal_loss(logits, one_hot, reduction="sum") / (losses["num_pos"] + 1)
    assert torch.allclose(losses["cate"], focal, rtol=1e-5)
    assert torch.allclose(losses["total"], losses["cate"] + 3 * losses["mask"])


def test_labels_outside_the_classes_are_refused():
    head = small_head()
    preds = head(fpn_features(B=1))
    masks = torch.ones(1, 128, 160, dtype=torch.uint8)
    with pytest.raises(ValueError, match="labels must be class ids in 1..3"):
        head.loss(preds, [torch.tensor([[0.0, 0, 160, 128]])], [torch.tensor([4])], [masks])


def test_hand_out_focal_normalisation_is_the_mean_over_entries():
    head = small_head(focal_norm="entries")
    cate, mask = head(fpn_features())
    zero = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.int64)] * 2
    masks = [torch.zeros(0, 128, 160, dtype=torch.uint8)] * 2
    losses = head.loss((cate, mask), *zero, masks)
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, 3) for c in cate])
    expected = sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="mean")
    assert torch.allclose(losses["cate"], expected, rtol=1e-5)


def test_gradients_reach_the_backbone():
    torch.manual_seed(0)
    model = build_backbone(depth=18, out_channels=32)
    head = small_head()
    images = torch.randn(2, 3, 128, 160)
    masks = torch.zeros(1, 128, 160, dtype=torch.uint8)
    masks[0, 30:70, 40:100] = 1
    losses = head.loss(
        head(model(images)),
        [torch.tensor([[40.0, 30.0, 100.0, 70.0]]), torch.zeros(0, 4)],
        [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)],
        [masks, torch.zeros(0, 128, 160, dtype=torch.uint8)],
    )
    assert losses["num_pos"] > 0 and losses["mask"].item() > 0
    losses["total"].backward()
    for param in (model.net.body.conv1.weight, model.net.fpn.layer_blocks[0][0].weight):
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0
    for param in (head.mask_convs[0][0].weight, head.cate_convs[0][0].weight):
        assert torch.count_nonzero(param.grad) > 0


def test_total_loss_is_a_free_function_of_the_terms():
    cate = torch.tensor(0.5)
    anchor = torch.zeros(())
    empty = total_loss(cate, [], anchor)
    assert empty["num_pos"] == 0 and empty["mask"].item() == 0.0
    assert empty["total"].item() == 0.5
    dice = [torch.tensor([0.2, 0.4]), torch.tensor([0.6])]
    losses = total_loss(cate, dice, anchor, mask_loss_weight=3.0, cate_loss_weight=2.0)
    assert losses["num_pos"] == 3
    assert losses["mask"].item() == pytest.approx(0.4)  # the mean over all positive cells
    assert losses["total"].item() == pytest.approx(2.0 * 0.5 + 3.0 * 0.4)


# --- inference ------------------------------------------------------------------------------


def eval_predictions(head, seed=0):
    """Eval-mode predictions with scores spread over [0, 1] and masks around 0.5."""
    with torch.no_grad():
        torch.nn.init.normal_(head.cate_out.weight, std=0.5)
        torch.nn.init.zeros_(head.cate_out.bias)
        for conv in head.mask_out:
            torch.nn.init.normal_(conv.weight, std=1.0)
            torch.nn.init.zeros_(conv.bias)
        return head(fpn_features(B=2, seed=seed), eval=True)


def test_post_process_selected_cells_equal_the_full_computation():
    head = small_head(cate_thresh=0.5, keep_instance=8, pre_NMS_num=30, update_thresh=0.0)
    cate, mask = eval_predictions(head)
    metas = [
        {"input_size": (120, 150), "orig_size": (60, 75)},
        {"input_size": (128, 160), "orig_size": (256, 320)},
    ]
    results = head.PostProcess((cate, mask), metas)
    for b, (result, meta) in enumerate(zip(results, metas, strict=True)):
        # Reference: every cell's mask (the hand-out's ins_pred), its sigmoid, then resized to
        # H/4 x W/4 (the authors' order), then the same finishing.
        scores = torch.cat([c[b].permute(1, 2, 0).reshape(-1, 3) for c in cate])
        probs = torch.cat(
            [
                F.interpolate(
                    torch.sigmoid(head.mask_logits(m[b : b + 1], lvl)),
                    size=(32, 40),
                    mode="bilinear",
                )[0]
                for lvl, m in enumerate(mask)
            ]
        )  # (sum S^2, 32, 40)
        cell_idx, labels, cand_scores = postprocess.select_candidates(scores, 0.5)
        strides = torch.tensor([8, 8, 16, 32, 32]).repeat_interleave(
            torch.tensor([100, 64, 36, 16, 9])
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
            0.0,
            strides,
        )
        assert len(cell_idx) > 0 and len(result["scores"]) > 0
        assert result["masks"].shape[1:] == meta["orig_size"]
        assert torch.equal(result["labels"], expected["labels"])
        assert torch.equal(result["masks"], expected["masks"])
        assert torch.allclose(result["scores"], expected["scores"], atol=1e-6)


def test_post_process_with_nothing_above_threshold_is_empty():
    head = small_head(cate_thresh=1.0)
    results = head.PostProcess(eval_predictions(head), [{"orig_size": (50, 60)}] * 2)
    for result in results:
        assert result["masks"].shape == (0, 50, 60) and result["labels"].shape == (0,)


def test_plots_return_figures():
    from matplotlib.figure import Figure

    head = small_head()
    img = torch.randn(3, H, W)
    ins, cate, ind = targets_of([box_instance(100, 60, 140, 100, label=2)])
    fig = SOLOHead().PlotGT(img, ins, ind, cate, ("vehicle", "person", "animal"))
    assert isinstance(fig, Figure)
    result = {
        "masks": torch.stack([box_instance(10, 10, 50, 50)[2]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.9]),
    }
    assert isinstance(head.PlotInfer(img, result, ("a", "b", "c")), Figure)


# --- the hand-out's names -------------------------------------------------------------------


def test_hand_out_aliases_are_the_functions_they_name():
    head = small_head()
    feats = fpn_features()
    assert all(torch.equal(a, b) for a, b in zip(head.NewFPN(feats), new_fpn(feats), strict=True))
    assert head.MultiApply(divmod, [7, 9], [2, 4]) == ([3, 2], [1, 1])
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 8, 8, generator=generator)
    gts = (torch.rand(3, 8, 8, generator=generator) > 0.5).to(torch.uint8)
    assert torch.equal(head.DiceLoss(probs, gts), dice_loss(probs, gts, head.dice_eps))
    assert torch.equal(head.DiceLoss(probs[0], gts[0]), dice_loss(probs, gts)[0])
    logits = torch.randn(20, 3, generator=generator)
    labels = torch.tensor([0] * 17 + [1, 2, 3])
    assert head.FocalLoss(logits, labels).item() == pytest.approx(
        focal_loss(logits, labels, 0.25, 2.0, 4.0).item()  # "positives": 3 positives + 1
    )
    heat = torch.rand(1, 3, 6, 6, generator=generator)
    assert torch.equal(head.points_nms(heat), postprocess.points_nms(heat))
    masks = (torch.rand(4, 8, 8, generator=generator) > 0.4).to(torch.uint8)
    scores, nms_labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 1, 2, 1])
    assert torch.equal(
        head.MatrixNMS(masks, nms_labels, scores),
        postprocess.matrix_nms(masks, nms_labels, scores, "gaussian", 2.0),
    )
    head.pre_NMS_num = 7  # the hand-out's spelling of pre_nms_num, both ways
    assert head.pre_nms_num == 7 and small_head(pre_NMS_num=9).pre_NMS_num == 9


def test_inference_masks_are_resized_after_their_sigmoid():
    # The authors' order (WXinlong/SOLO, mmdetection): sigmoid at the level's size, then the
    # bilinear resize to H/4 x W/4. Resizing the logits first gives other probabilities.
    head = small_head()
    _, mask = eval_predictions(head)
    level, cells = 2, torch.tensor([0, 7, 20, 35])  # level 2: masks at 16 x 20, H/4 = 32 x 40
    zeros = torch.zeros_like(cells)
    got = head.cell_masks((None, mask), level, zeros, cells, eval=True)
    logits = head.mask_logits(mask[level][:1], level)[0, cells]  # (4, 16, 20)
    authors = F.interpolate(torch.sigmoid(logits)[:, None], size=(32, 40), mode="bilinear")[:, 0]
    logits_first = torch.sigmoid(F.interpolate(logits[:, None], size=(32, 40), mode="bilinear"))
    assert got.shape == (4, 32, 40)
    torch.testing.assert_close(got, authors, atol=1e-6, rtol=0)
    assert (got - logits_first[:, 0]).abs().max() > 1e-3  # the order matters
