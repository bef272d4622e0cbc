"""Tests of samples.py: the sample contract's base classes on a hand-built reader.

Run: python -m pytest -q tests/test_samples.py   (CPU, about a second). Shapes: N instances,
H x W padded input, h x w resized, h0 x w0 source.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import evaluation
import samples
from errors import DataError

H0, W0 = 8, 12  # source size of every image of `Squares`


class Squares(samples.PhotoDataset):
    """n images of H0 x W0; image k holds k squares of 2 x 2 (class 1) at rows 2..3 and
    columns 3j..3j+1, j = 0..k-1, and no ignore region. Only what a reader must define."""

    class_names = ("square",)

    def __init__(self, n: int, short_side: int = 16, max_side: int = 32, indices=None):
        self.short_side, self.max_side, self.pad_to = short_side, max_side, 32
        self._set_indices(indices, n, "squares")
        self._warned: set = set()

    def raw(self, i: int):
        k = self.indices[i]
        image = np.full((3, H0, W0), 10 * k, dtype=np.uint8)
        masks = np.zeros((k, H0, W0), dtype=np.uint8)
        for j in range(k):
            masks[j, 2:4, 3 * j : 3 * j + 2] = 1
        boxes = np.array([[3 * j, 2, 3 * j + 2, 4] for j in range(k)], np.float32).reshape(-1, 4)
        return image, masks, np.ones(k, np.int64), boxes

    def num_instances(self, i: int) -> int:
        return self.indices[i]

    def file_name(self, i: int) -> str:
        return f"square_{self.indices[i]}.png"


def test_an_item_is_the_contracts_five_tuple_with_known_sizes_and_boxes():
    img, labels, masks, boxes, meta = Squares(3)[2]
    # 8 x 12 -> short side 16 (scale 2, long side 24 <= 32) -> padded to 32 x 32
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert labels.tolist() == [1, 1] and labels.dtype == torch.int64
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.uint8
    assert boxes.tolist() == [[0, 4, 4, 8], [6, 4, 10, 8]]  # source boxes x 2
    assert masks[1].sum() == 16 and masks[1, 4:8, 6:10].all()
    assert meta == {
        "image_id": 2,
        "orig_size": (8, 12),
        "input_size": (16, 24),
        "scale": (2.0, 2.0),
        "file_name": "square_2.png",
    }
    assert (img[:, 16:, :] == 0).all() and (img[:, :, 24:] == 0).all()  # zero padding


def test_an_image_without_instances_gives_empty_correctly_shaped_parts():
    _, labels, masks, boxes, meta = Squares(3)[0]
    assert labels.shape == (0,) and masks.shape == (0, 32, 32) and boxes.shape == (0, 4)
    assert meta["image_id"] == 0


def test_the_max_side_caps_the_resize():
    _, _, _, _, meta = Squares(2, short_side=16, max_side=18)[1]
    assert meta["input_size"] == (12, 18)  # scale min(16 / 8, 18 / 12) = 1.5


def test_subset_takes_positions_and_its_own_augment_and_leaves_the_original_alone():
    calls = []

    def augment(sample):
        calls.append(sample[4]["image_id"])
        return sample

    full = Squares(4)
    sub = full.subset([3, 1], augment=augment)
    assert len(sub) == 2 and sub.indices == [3, 1] and sub.image_ids == [3, 1]
    assert [sub.num_instances(i) for i in range(2)] == [3, 1]
    assert full.indices == [0, 1, 2, 3] and full.augment is None and len(full) == 4
    sub[0], full[0]
    assert calls == [3]  # only the subset augments
    assert sub.subset([1]).indices == [1]  # positions in the subset, not in the source


def test_the_contracts_defaults():
    ds = Squares(2)
    assert ds.ignore_mask(1) is None
    assert ds.json_ground_truth() is None
    assert ds.image_ids == [0, 1]
    assert not evaluation.uses_coco_json(ds)


def test_indices_outside_the_source_are_a_data_error_naming_it():
    with pytest.raises(DataError, match=r"^squares: indices include \[5\]; expected 0\.\.2\.$"):
        Squares(3, indices=[0, 5])


def test_without_augment_is_a_copy_that_reads_plain_samples():
    augmented = Squares(2).subset([0, 1], augment=lambda sample: None)
    plain = samples.without_augment(augmented)
    assert plain[1] is not None and augmented[1] is None
    assert plain.indices == augmented.indices


def test_warn_once_warns_once_per_key_and_a_subset_anew():
    ds = Squares(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key in ("a", "a", "b"):
            ds._warn_once(key, f"empty {key}")
        ds.subset([0])._warn_once("a", "empty a")
        ds._warn_once("a", "empty a")
    assert [str(w.message) for w in caught] == ["empty a", "empty b", "empty a"]


def test_a_reader_that_lacks_a_part_of_the_contract_says_which():
    class NoRaw(samples.SampleDataset):
        indices = [0]

    with pytest.raises(NotImplementedError, match="NoRaw does not define raw"):
        NoRaw()[0]


def test_evaluation_scores_a_reader_through_the_contract_alone():
    # The true masks as detections, at the original size: AP 1 against the truth built from
    # the masks (image ids from `image_ids`, no ignore regions, no json of its own).
    ds = Squares(3).subset([1, 2])
    predictions = []
    for i in range(len(ds)):
        image, masks, labels, _ = ds.raw(i)
        result = {
            "masks": torch.from_numpy(masks),
            "labels": torch.from_numpy(labels),
            "scores": torch.ones(len(labels)),
        }
        predictions.append(({"image_id": ds.image_id(i)}, result))
    detections = evaluation.detections_of(predictions, ds)
    assert sorted({d["image_id"] for d in detections}) == [1, 2]
    assert evaluation.score(ds, detections)["AP"] == pytest.approx(1.0)
