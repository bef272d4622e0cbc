"""Tests of visualize.py: drawing helpers that return matplotlib Figures, headless.

Run: python -m pytest -q tests/test_visualize.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import visualize

CLASS_NAMES = ("vehicle", "person", "animal")
H, W = 64, 96


def _normalised_image(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) image in [0, 1] and its ImageNet normalisation."""
    raw = torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed))
    return raw, TF.normalize(raw, visualize.IMAGENET_MEAN, visualize.IMAGENET_STD)


def _rectangles(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_denormalize_inverts_imagenet_normalisation():
    raw, img = _normalised_image()
    out = visualize.denormalize(img)
    assert out.shape == (H, W, 3)
    np.testing.assert_allclose(out, raw.permute(1, 2, 0).numpy(), atol=1e-5)


def test_denormalize_clips_and_rejects_bad_shapes():
    out = visualize.denormalize(torch.full((3, 4, 5), 10.0))
    assert out.max() == 1.0
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        visualize.denormalize(torch.zeros(4, 4, 3))


def test_class_colors_are_fixed_and_distinct():
    colors = [visualize.class_color(c) for c in (1, 2, 3)]
    assert len(set(colors)) == 3
    assert all(len(c) == 3 and all(0.0 <= v <= 1.0 for v in c) for c in colors)
    assert visualize.class_color(torch.tensor(2)) == colors[1]


def test_draw_instances_without_instances(tmp_path):
    _, img = _normalised_image()
    fig = visualize.draw_instances(
        img, torch.zeros(0, H, W), torch.zeros(0, dtype=torch.int64), CLASS_NAMES
    )
    assert isinstance(fig, Figure)
    path = tmp_path / "empty.png"
    fig.savefig(path)
    assert path.stat().st_size > 0


def test_draw_instances_with_boxes_and_scores(tmp_path):
    _, img = _normalised_image()
    masks = torch.zeros(3, H, W, dtype=torch.uint8)
    masks[0, 5:20, 5:30] = 1
    masks[1, 30:60, 40:50] = 1
    masks[2, 10:40, 60:90] = 1
    labels = torch.tensor([1, 2, 3])
    boxes = torch.tensor([[5, 5, 30, 20], [40, 30, 50, 60], [60, 10, 90, 40]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.75, 0.5])
    fig = visualize.draw_instances(
        img, masks, labels, CLASS_NAMES, boxes=boxes, scores=scores, title="three"
    )
    (ax,) = fig.axes
    assert len(_rectangles(ax)) == 3
    texts = {t.get_text() for t in ax.texts}
    assert texts == {"vehicle 0.90", "person 0.75", "animal 0.50"}
    assert ax.get_title() == "three"
    path = tmp_path / "three.png"
    fig.savefig(path)
    assert path.stat().st_size > 0


def test_draw_instances_numpy_image_names_without_boxes():
    rgb = np.full((H, W, 3), 0.5, dtype=np.float32)
    masks = np.zeros((1, H, W), dtype=np.uint8)
    masks[0, 10:20, 30:40] = 1
    fig = visualize.draw_instances(rgb, masks, np.array([2]), CLASS_NAMES)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["person"]
    assert ax.texts[0].get_position() == (30, 10)
    # the mask is tinted in the class colour, the rest of the image is untouched
    drawn = ax.images[0].get_array()
    expected = 0.5 * 0.5 + 0.5 * np.asarray(visualize.class_color(2), dtype=np.float32)
    np.testing.assert_allclose(drawn[15, 35], expected, atol=1e-6)
    np.testing.assert_allclose(drawn[0, 0], [0.5, 0.5, 0.5])


def test_draw_instances_on_given_axes():
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    out = visualize.draw_instances(np.zeros((H, W, 3)), np.zeros((0, H, W)), [], CLASS_NAMES, ax=ax)
    assert out is fig and len(ax.images) == 1


def test_draw_instances_rejects_masks_in_another_frame():
    with pytest.raises(ValueError, match="masks"):
        visualize.draw_instances(
            np.zeros((H, W, 3)), np.ones((1, H // 2, W // 2)), [1], CLASS_NAMES
        )


def _two_level_targets():
    """Level 0: S=4, one object on cells (1,1) and (1,2), class 2; level 1: S=2, empty."""
    S0, S1 = 4, 2
    cate0 = torch.zeros(S0, S0, dtype=torch.int64)
    cate0[1, 1] = cate0[1, 2] = 2
    ind0 = cate0.flatten() > 0  # channels 5 and 6
    mask0 = torch.zeros(H // 4, W // 4, dtype=torch.uint8)  # 2Hf x 2Wf for stride 8
    mask0[4:10, 8:16] = 1
    ins0 = torch.stack([mask0, mask0])  # (P=2, 16, 24)
    cate1 = torch.zeros(S1, S1, dtype=torch.int64)
    ins1 = torch.zeros(0, H // 8, W // 8, dtype=torch.uint8)
    return [ins0, ins1], [ind0, cate1.flatten() > 0], [cate0, cate1]


def test_plot_gt_levels_one_panel_per_level(tmp_path):
    _, img = _normalised_image()
    ins, ind, cate = _two_level_targets()
    fig = visualize.plot_gt_levels(img, ins, ind, cate, (8, 16), CLASS_NAMES)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ax0, ax1 = fig.axes
    assert ax0.get_title().startswith("level 0, stride 8, S=4")
    assert ax1.get_title().startswith("level 1, stride 16, S=2")
    cells = _rectangles(ax0)
    assert len(cells) == 2 and len(_rectangles(ax1)) == 0
    # cell (1, 1) of a 4x4 grid over 64x96 covers rows 16..32, columns 24..48
    assert cells[0].get_xy() == (24.0, 16.0)
    assert (cells[0].get_width(), cells[0].get_height()) == (24.0, 16.0)
    # the level's mask, upsampled x4, is tinted; elsewhere the image is unchanged
    drawn = ax0.images[0].get_array()
    raw = visualize.denormalize(img)
    assert not np.allclose(drawn[20, 40], raw[20, 40])  # mask rows 16..40, cols 32..64
    np.testing.assert_allclose(drawn[50, 10], raw[50, 10])
    np.testing.assert_allclose(ax1.images[0].get_array(), raw)
    path = tmp_path / "gt.png"
    fig.savefig(path)
    assert path.stat().st_size > 0


def test_plot_gt_levels_rejects_channel_mismatch():
    _, img = _normalised_image()
    ins, ind, cate = _two_level_targets()
    ins[0] = ins[0][:1]  # one channel for two positive cells
    with pytest.raises(ValueError, match="level 0"):
        visualize.plot_gt_levels(img, ins, ind, cate, (8, 16), CLASS_NAMES)


def test_main_writes_pngs(tmp_path):
    paths = visualize.main(["--num", "2", "--out", str(tmp_path)])
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)
