"""Tests of conventions.py: the box of a mask and the ImageNet statistics, in one place.

Run: python -m pytest -q tests/test_conventions.py   (CPU, a few seconds: one subprocess).
Shapes: N masks of H x W.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes as tv_masks_to_boxes

import conventions
import dataset
import synthetic
import visualize
from conventions import masks_to_boxes

REPO = Path(__file__).resolve().parents[1]


def test_known_boxes_along_pixel_edges():
    masks = np.zeros((3, 10, 12), dtype=np.uint8)
    masks[0, 5, 7] = 1  # one pixel at (row 5, col 7) -> (7, 5, 8, 6)
    masks[1, 2:4, 3:9] = 1
    masks[1, 9, 11] = 1  # a stray pixel in the far corner widens the box to the edge
    boxes = masks_to_boxes(masks)
    assert isinstance(boxes, np.ndarray) and boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[7, 5, 8, 6], [3, 2, 12, 10], [0, 0, 0, 0]])


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float32])
def test_numpy_and_torch_give_torchvisions_boxes_plus_one_at_the_far_edges(dtype):
    rng = np.random.default_rng(3)
    masks = rng.random((30, 9, 13)) < rng.random((30, 1, 1)) * 0.3  # (30, 9, 13)
    masks[:, 0, 0] |= rng.random(30) < 0.5  # some reach the first row and column
    masks[0] = False  # an empty mask: (0, 0, 0, 0)
    nonempty = masks.reshape(30, -1).any(axis=1)
    expected = np.zeros((30, 4), np.float32)
    # torchvision's boxes hold the last row / column; ours end one past it
    tv = tv_masks_to_boxes(torch.from_numpy(masks[nonempty])) + torch.tensor([0, 0, 1, 1])
    expected[nonempty] = tv.numpy()
    from_numpy = masks_to_boxes(masks.astype(dtype))
    from_torch = masks_to_boxes(torch.from_numpy(masks.astype(dtype)))
    np.testing.assert_array_equal(from_numpy, expected)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
    np.testing.assert_array_equal(from_torch.numpy(), expected)


def test_no_masks_give_no_boxes():
    assert masks_to_boxes(np.zeros((0, 4, 5), np.uint8)).shape == (0, 4)
    empty = masks_to_boxes(torch.zeros((0, 4, 5)))
    assert isinstance(empty, torch.Tensor) and empty.shape == (0, 4)


def test_one_function_and_one_set_of_statistics_serve_every_module():
    assert dataset.masks_to_boxes is synthetic.masks_to_boxes is conventions.masks_to_boxes
    for module in (dataset, visualize):
        assert module.IMAGENET_MEAN is conventions.IMAGENET_MEAN
        assert module.IMAGENET_STD is conventions.IMAGENET_STD
    assert conventions.IMAGENET_MEAN == (0.485, 0.456, 0.406)  # hand-out section 4.3


def test_the_generator_boxes_masks_without_loading_torch():
    code = "import sys, synthetic; sys.exit(int('torch' in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120)
    assert done.returncode == 0, "importing synthetic.py loaded torch"
