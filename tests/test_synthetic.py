"""Tests of synthetic.py, the built-in data set generator.

Run: python -m pytest -q tests/test_synthetic.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes as tv_masks_to_boxes

import synthetic

NUM_STATS_IMAGES = 200  # images behind the statistics tests


@pytest.fixture(scope="module")
def samples():
    return [synthetic.generate_sample(0, i) for i in range(NUM_STATS_IMAGES)]


def _same(a, b) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays():
    assert _same(synthetic.generate_sample(0, 3), synthetic.generate_sample(0, 3))


def test_other_seed_or_index_differs():
    image = synthetic.generate_sample(0, 3)[0]
    assert not np.array_equal(image, synthetic.generate_sample(1, 3)[0])
    assert not np.array_equal(image, synthetic.generate_sample(0, 4)[0])


def test_image_i_does_not_depend_on_set_size():
    small = list(synthetic.iter_samples(10, seed=5))
    large = list(synthetic.iter_samples(20, seed=5))
    assert len(small) == 10 and len(large) == 20
    for a, b in zip(small, large[:10], strict=True):
        assert _same(a, b)


def test_worker_processes_give_the_same_samples_in_order():
    n = synthetic.PARALLEL_BLOCK + 5  # more than one block, so the workers are used
    serial = list(synthetic.iter_samples(n, seed=2, workers=1))
    parallel = list(synthetic.iter_samples(n, seed=2, workers=2))
    assert len(parallel) == n
    for a, b in zip(serial, parallel, strict=True):
        assert _same(a, b)


# --------------------------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------------------------


def test_shapes_and_dtypes(samples):
    H, W = synthetic.IMAGE_SIZE
    for image, masks, labels, boxes in samples:
        n = len(labels)
        assert image.shape == (3, H, W) and image.dtype == np.uint8
        assert masks.shape == (n, H, W) and masks.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert boxes.shape == (n, 4) and boxes.dtype == np.float32


def test_other_image_size():
    image, masks, labels, boxes = synthetic.generate_sample(0, 1, height=64, width=96)
    assert image.shape == (3, 64, 96) and masks.shape == (len(labels), 64, 96)


def test_masks_binary_non_empty_and_disjoint(samples):
    for _, masks, _, _ in samples:
        assert set(np.unique(masks)) <= {0, 1}
        assert (masks.sum(axis=(1, 2)) >= synthetic.MIN_VISIBLE_PIXELS).all()
        assert masks.sum(axis=0).max(initial=0) <= 1  # visible parts never overlap


def test_boxes_are_the_boxes_of_the_masks(samples):
    for _, masks, _, boxes in samples:
        if len(masks) == 0:
            continue
        # torchvision's boxes hold the last row / column; ours end one past it
        expected = tv_masks_to_boxes(torch.from_numpy(masks).bool()) + torch.tensor([0, 0, 1, 1])
        np.testing.assert_array_equal(boxes, expected.numpy())


def test_masks_to_boxes_known_answer():
    masks = np.zeros((1, 10, 12), dtype=np.uint8)
    masks[0, 2:5, 3:9] = 1
    np.testing.assert_array_equal(synthetic.masks_to_boxes(masks), [[3, 2, 9, 5]])
    assert synthetic.masks_to_boxes(np.zeros((0, 10, 12), np.uint8)).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# statistics over a few hundred images
# --------------------------------------------------------------------------------------------


def test_instance_counts_and_classes(samples):
    counts = np.array([len(labels) for _, _, labels, _ in samples])
    assert counts.min() == 0 and counts.max() <= synthetic.MAX_INSTANCES
    assert (counts == 0).sum() >= 5  # images without objects occur
    assert (counts >= 4).sum() >= 20  # and crowded ones
    labels = np.concatenate([labels for _, _, labels, _ in samples])
    per_class = np.bincount(labels, minlength=4)
    assert per_class[0] == 0 and labels.max() == 3
    assert (per_class[1:] >= 0.2 * len(labels)).all()  # all three classes, roughly balanced


def test_scales_spread_over_all_five_ranges(samples):
    img_boxes = [boxes for _, _, _, boxes in samples]
    total = sum(len(b) for b in img_boxes)
    counts = synthetic.scale_range_counts(img_boxes)
    assert len(counts) == 5
    for (lo, hi), count in zip(synthetic.HANDOUT_SCALE_RANGES, counts, strict=True):
        assert count >= 0.08 * total, f"range ({lo}, {hi}): {count} of {total} instances"


def test_scale_range_counts_known_answer():
    # a 30x40 box in 300x400 pixels is 80x106.6 after the resize: sqrt = 92.3, ranges 1 and 2
    boxes = [np.array([[0, 0, 40, 30]], np.float32), np.zeros((0, 4), np.float32)]
    assert synthetic.scale_range_counts(boxes) == [1, 1, 0, 0, 0]


# --------------------------------------------------------------------------------------------
# the cached data set (needs dataset.write_cis680)
# --------------------------------------------------------------------------------------------


def _dataset_module():
    if importlib.util.find_spec("dataset") is None:
        pytest.skip("dataset.py is not there yet")
    import dataset

    if not hasattr(dataset, "write_cis680"):
        pytest.skip("dataset.py has no write_cis680 yet")
    return dataset


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SOLO_DATA_DIR", str(tmp_path))
    assert synthetic.default_data_root() == tmp_path
    monkeypatch.delenv("SOLO_DATA_DIR")
    assert synthetic.default_data_root().parts[-2:] == ("data", "builtin")


def test_ensure_builtin_dataset_writes_then_reuses(tmp_path, monkeypatch, capsys):
    dataset = _dataset_module()
    calls = []
    write = synthetic.write_cis680  # cis680_files.write_cis680, as synthetic calls it

    def spy(*args, **kwargs):
        calls.append(args[0])
        return write(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_cis680", spy)
    prefix = synthetic.ensure_builtin_dataset(tmp_path, num_images=6, seed=3)
    assert prefix == tmp_path / "builtin_v2_n6_s3" and len(calls) == 1
    paths = dataset.cis680_paths(prefix)
    assert all(p.is_file() for p in paths.values())
    assert "generated" in capsys.readouterr().out
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    assert synthetic.ensure_builtin_dataset(tmp_path, num_images=6, seed=3) == prefix
    assert len(calls) == 1  # reused, not generated again
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mtimes
    assert capsys.readouterr().out == ""

    paths["bboxes"].unlink()  # a half set is never reused
    synthetic.ensure_builtin_dataset(tmp_path, num_images=6, seed=3)
    assert len(calls) == 2 and paths["bboxes"].is_file()


def test_files_hold_the_generated_samples(tmp_path):
    h5py = pytest.importorskip("h5py")
    dataset = _dataset_module()
    prefix = synthetic.ensure_builtin_dataset(tmp_path, num_images=5, seed=1)
    paths = dataset.cis680_paths(prefix)
    expected = list(synthetic.iter_samples(5, seed=1))
    with h5py.File(paths["img"], "r") as f:
        np.testing.assert_array_equal(f["data"][:], np.stack([s[0] for s in expected]))
    with h5py.File(paths["mask"], "r") as f:
        np.testing.assert_array_equal(f["data"][:], np.concatenate([s[1] for s in expected]))
    img_labels = np.load(paths["labels"], allow_pickle=True)
    img_boxes = np.load(paths["bboxes"], allow_pickle=True)
    assert len(img_labels) == len(img_boxes) == 5
    for (_, _, labels, boxes), got_labels, got_boxes in zip(
        expected, img_labels, img_boxes, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got_labels).reshape(-1), labels)
        np.testing.assert_array_equal(np.asarray(got_boxes).reshape(-1, 4), boxes)


def test_round_trip_through_build_dataset(tmp_path):
    dataset = _dataset_module()
    if not hasattr(dataset, "BuildDataset"):
        pytest.skip("dataset.py has no BuildDataset yet")
    prefix = synthetic.ensure_builtin_dataset(tmp_path, num_images=4, seed=2)
    data = dataset.BuildDataset(prefix, size=(150, 200), pad_to=32)
    assert len(data) == 4
    assert tuple(data.class_names) == synthetic.CLASS_NAMES
    for index in range(4):
        expected = synthetic.generate_sample(2, index)
        assert _same(data.raw(index), expected)
        img, labels, masks, boxes, meta = data[index]
        n = len(expected[2])
        assert img.shape == (3, 160, 224) and img.dtype == torch.float32  # 150x200 padded
        np.testing.assert_array_equal(labels.numpy(), expected[2])
        assert masks.shape == (n, 160, 224) and boxes.shape == (n, 4)
        assert tuple(meta["orig_size"]) == synthetic.IMAGE_SIZE
        # boxes scale with the image (exactly here: the factor is 1/2)
        np.testing.assert_allclose(boxes.numpy(), expected[3] / 2, atol=1.0)


def test_main_prints_counts(tmp_path, capsys):
    _dataset_module()
    prefix = synthetic.main(["--num", "5", "--seed", "4", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert str(prefix) in out and "vehicle" in out and "scale range (384, 2048)" in out


def test_two_processes_at_once_generate_once(tmp_path):
    _dataset_module()
    code = (
        "import sys, synthetic; "
        "print(synthetic.ensure_builtin_dataset(sys.argv[1], num_images=30, seed=0))"
    )
    repo = Path(synthetic.__file__).resolve().parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("generated") == 1  # the second process waited and reused the set
    prefix = str(synthetic.builtin_prefix(tmp_path, 30, 0))
    assert stdout.count(prefix) == 3  # 1 generation line + 2 returns
