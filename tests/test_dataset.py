"""Tests of dataset.py: CIS680 files, COCO json, preprocessing, augmentation, loaders, errors.

Run: python -m pytest -q tests/test_dataset.py   (CPU, a few seconds; coco128 tests skip when
../shared/data/coco128 is absent). Shapes: N instances, H x W padded input, h x w resized.
"""

from __future__ import annotations

import collections
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import dataset as D

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"
COCO128_JSON = COCO128 / "annotations" / "instances_train2017.json"
COCO128_IMAGES = COCO128 / "train2017"
needs_coco128 = pytest.mark.skipif(
    not COCO128_JSON.is_file(), reason=f"coco128 not found at {COCO128} (real-data test)"
)
SMALL = (96, 128)  # test input size (h, w), already a multiple of 32


# --------------------------------------------------------------------------------------------
# Helpers: small hand-built data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def ds_single_thread():
    """One intra-op thread: these tensors are small, and on a shared 2-core machine several
    threads per op cost far more in contention than they gain (coco128 conversion 17 s vs 4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rect_masks(rects, h=300, w=400) -> np.ndarray:
    """uint8 (N, h, w) with mask k = 1 on rows y1..y2-1, cols x1..x2-1 of rects[k]."""
    masks = np.zeros((len(rects), h, w), dtype=np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(rects):
        masks[k, y1:y2, x1:x2] = 1
    return masks


def make_samples(counts, seed=0):
    """CIS680 samples: image i has counts[i] rectangle instances, all distinct."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, n in enumerate(counts):
        image = rng.integers(0, 256, (3, 300, 400), dtype=np.uint8)
        rects = [(20 + 60 * k + i, 10 + 40 * k, 70 + 60 * k + i, 60 + 40 * k + i) for k in range(n)]
        masks = rect_masks(rects)
        labels = np.array([(i + k) % 3 + 1 for k in range(n)], dtype=np.int64)
        boxes = np.array(rects, dtype=np.float32).reshape(-1, 4)
        samples.append((image, masks, labels, boxes))
    return samples


@pytest.fixture
def ds_cis680(tmp_path):
    """A CIS680 set of 4 images with 2, 0, 1, 3 instances; returns (prefix, samples)."""
    samples = make_samples([2, 0, 1, 3])
    prefix = tmp_path / "set" / "solo"
    D.write_cis680(prefix, iter(samples), num_images=len(samples))
    return prefix, samples


def write_h5(path, array, name="data"):
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=array)


def save_object_npy(path, items):
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    np.save(path, arr, allow_pickle=True)


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a binary mask (column-major runs starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, prev, run = [], 0, 0
    for value in flat:
        if value != prev:
            counts.append(run)
            prev, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture
def ds_coco(tmp_path):
    """A COCO json with a polygon, a compressed RLE, an uncompressed RLE, a crowd region, an
    annotation of a category outside CIS680 and an image without annotations."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image_dir / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8), mode="L").save(
        image_dir / "b.png"
    )
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(image_dir / "c.png")
    dog = rect_masks([(40, 30, 50, 35)], 40, 60)[0]  # rows 30..34, cols 40..49
    crowd = rect_masks([(0, 0, 5, 5)], 40, 60)[0]
    person = rect_masks([(3, 2, 13, 10)], 30, 50)[0]  # rows 2..9, cols 3..12
    dog_rle = mask_utils.encode(np.asfortranarray(dog))
    dog_rle["counts"] = dog_rle["counts"].decode("ascii")
    data = {
        "images": [
            {"id": 11, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 12, "file_name": "b.png", "height": 30, "width": 50},
            {"id": 13, "file_name": "c.png", "height": 20, "width": 20},
        ],
        "categories": [
            {"id": 3, "name": "cat"},
            {"id": 7, "name": "dog"},
            {"id": 18, "name": "person"},
            {"id": 40, "name": "kite"},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 3, "iscrowd": 0, "bbox": [10, 5, 20, 20],
             "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]},
            {"id": 2, "image_id": 11, "category_id": 7, "iscrowd": 0, "bbox": [40, 30, 10, 5],
             "segmentation": dog_rle},
            {"id": 3, "image_id": 11, "category_id": 18, "iscrowd": 1, "bbox": [0, 0, 5, 5],
             "segmentation": rle_uncompressed(crowd)},
            {"id": 4, "image_id": 12, "category_id": 18, "iscrowd": 0, "bbox": [3, 2, 10, 8],
             "segmentation": rle_uncompressed(person)},
            {"id": 5, "image_id": 12, "category_id": 40, "iscrowd": 0, "bbox": [20, 10, 10, 10],
             "segmentation": [[20, 10, 30, 10, 30, 20, 20, 20]]},
        ],
    }  # fmt: skip
    json_path = tmp_path / "ann.json"
    json_path.write_text(json.dumps(data))
    return json_path, image_dir, {"dog": dog, "person": person}


def assert_names(excinfo, path):
    assert str(path) in str(excinfo.value), str(excinfo.value)


# --------------------------------------------------------------------------------------------
# CIS680 files: writing and reading back
# --------------------------------------------------------------------------------------------


def test_write_read_round_trip_groups_masks_per_image(ds_cis680):
    prefix, samples = ds_cis680
    paths = D.cis680_paths(prefix)
    assert all(p.is_file() for p in paths.values())
    assert not list(paths["img"].parent.glob("*.partial"))
    with h5py.File(paths["img"]) as f:
        assert f["data"].shape == (4, 3, 300, 400) and f["data"].dtype == np.uint8
    with h5py.File(paths["mask"]) as f:
        assert f["data"].shape == (6, 300, 400)  # 2 + 0 + 1 + 3 masks, image order
    labels = np.load(paths["labels"], allow_pickle=True)
    assert labels.dtype == object and labels.shape == (4,)

    ds = D.BuildDataset(prefix, size=SMALL)
    assert len(ds) == 4 and ds.class_names == ("vehicle", "person", "animal")
    assert ds.offsets.tolist() == [0, 2, 2, 3, 6]
    for i, (image, masks, labels, boxes) in enumerate(samples):
        r_image, r_masks, r_labels, r_boxes = ds.raw(i)
        np.testing.assert_array_equal(r_image, image)
        np.testing.assert_array_equal(r_masks, masks)  # the right masks went to image i
        np.testing.assert_array_equal(r_labels, labels)
        np.testing.assert_allclose(r_boxes, boxes)
        assert ds.num_instances(i) == len(labels)

    img, labels, masks, boxes, meta = ds[1]  # the image without objects
    assert img.shape == (3, 96, 128) and img.dtype == torch.float32
    assert labels.shape == (0,) and labels.dtype == torch.int64
    assert masks.shape == (0, 96, 128) and masks.dtype == torch.uint8
    assert boxes.shape == (0, 4) and boxes.dtype == torch.float32
    assert meta["image_id"] == 1 and meta["orig_size"] == (300, 400)
    assert meta["file_name"].endswith("_img_comp_zlib.h5#1")

    img, labels, masks, boxes, meta = ds[3]
    assert labels.tolist() == samples[3][2].tolist()
    assert masks.shape == (3, 96, 128)
    assert set(masks.unique().tolist()) <= {0, 1}


def test_indices_select_images_and_reader_accepts_any_dataset_name(ds_cis680):
    prefix, samples = ds_cis680
    paths = D.cis680_paths(prefix)
    with h5py.File(paths["img"]) as f:
        images = f["data"][:]
    write_h5(paths["img"], images, name="images")  # another writer's name for the data set
    ds = D.BuildDataset(prefix, size=SMALL, indices=[3, 0])
    assert len(ds) == 2
    np.testing.assert_array_equal(ds.raw(0)[0], samples[3][0])
    assert ds[1][4]["image_id"] == 0


def test_interrupted_write_leaves_no_files(tmp_path):
    def broken():
        yield make_samples([1])[0]
        raise RuntimeError("interrupted")

    prefix = tmp_path / "broken"
    with pytest.raises(RuntimeError):
        D.write_cis680(prefix, broken())
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_sample(tmp_path):
    image, masks, labels, boxes = make_samples([2])[0]
    with pytest.raises(D.DataError, match="write_cis680 sample 0"):
        D.write_cis680(tmp_path / "x", [(image, masks[:1], labels, boxes)])
    with pytest.raises(D.DataError, match="image"):
        D.write_cis680(tmp_path / "x", [(image.astype(np.float32), masks, labels, boxes)])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Preprocessing and the box-from-mask convention
# --------------------------------------------------------------------------------------------


def test_preprocess_handout_sizes_and_box_scaling():
    image = torch.full((3, 300, 400), 255, dtype=torch.uint8)
    masks = torch.from_numpy(rect_masks([(40, 30, 140, 90)]))
    boxes = torch.tensor([[40.0, 30.0, 140.0, 90.0]])
    img, out_masks, out_boxes, meta = D.preprocess(image, masks, boxes, (800, 1066), pad_to=32)
    assert img.shape == (3, 800, 1088) and out_masks.shape == (1, 800, 1088)
    assert meta == {
        "orig_size": (300, 400),
        "input_size": (800, 1066),
        "scale": (800 / 300, 1066 / 400),
    }
    # x scales by 1066 / 400 = 2.665, y by 800 / 300 = 8 / 3
    torch.testing.assert_close(out_boxes, torch.tensor([[106.6, 80.0, 373.1, 240.0]]))
    white = (1.0 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
    torch.testing.assert_close(img[:, 400, 500], white)  # [0,1] scaling then ImageNet norm
    assert img[:, :, 1066:].abs().max() == 0 and out_masks[:, :, 1066:].max() == 0  # zero pad
    assert set(out_masks.unique().tolist()) == {0, 1}
    assert D.padded_size((800, 1066), 32) == (800, 1088)
    assert D.padded_size((320, 427), 32) == (320, 448)


def test_preprocess_integer_scale_keeps_masks_and_boxes_exact():
    image = torch.zeros((3, 48, 64), dtype=torch.uint8)
    masks = torch.from_numpy(rect_masks([(20, 10, 40, 20)], 48, 64))
    boxes = D.masks_to_boxes(masks)
    img, out_masks, out_boxes, meta = D.preprocess(image, masks, boxes, (96, 128), pad_to=32)
    assert img.shape == (3, 96, 128) and meta["scale"] == (2.0, 2.0)
    torch.testing.assert_close(out_boxes, torch.tensor([[40.0, 20.0, 80.0, 40.0]]))
    torch.testing.assert_close(D.masks_to_boxes(out_masks), out_boxes)
    assert out_masks.sum() == 4 * masks.sum()


def test_resize_masks_never_erases_a_thin_instance():
    masks = torch.zeros((2, 64, 64), dtype=torch.uint8)
    masks[0, :, 31] = 1  # one pixel wide: bilinear / 4 leaves values below 0.5
    masks[1, 8:48, 8:48] = 1  # aligned with the / 4 grid: 10 x 10 after
    small = D.resize_masks(masks, (16, 16))
    assert small.dtype == torch.uint8 and set(small.unique().tolist()) <= {0, 1}
    assert small[0].sum() > 0 and small[1].sum() == 100


def test_masks_to_boxes_convention():
    masks = np.zeros((3, 10, 12), dtype=np.uint8)
    masks[0, 5, 7] = 1  # one pixel -> (7, 5, 8, 6)
    masks[1, 2:4, 3:9] = 1
    boxes = D.masks_to_boxes(masks)
    assert isinstance(boxes, np.ndarray) and boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[7, 5, 8, 6], [3, 2, 9, 4], [0, 0, 0, 0]])
    assert D.masks_to_boxes(torch.zeros((0, 4, 4))).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# COCO json
# --------------------------------------------------------------------------------------------


def test_coco_reader_decodes_polygon_rle_and_skips_crowd(ds_coco):
    json_path, image_dir, truth = ds_coco
    ds = D.CocoDataset(json_path, image_dir, short_side=64, max_side=96)
    assert ds.class_names == ("cat", "dog", "person", "kite")  # ids 3, 7, 18, 40 -> 1..4
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 18, 4: 40}
    assert len(ds) == 3 and ds.image_ids == [11, 12, 13]
    assert sorted(ds.coco.getImgIds()) == [11, 12, 13]

    image, masks, labels, boxes = ds.raw(0)
    assert image.shape == (3, 40, 60) and labels.tolist() == [1, 2]  # crowd person left out
    assert masks[0].sum() == 400 and D.masks_to_boxes(masks[:1]).tolist() == [[10, 5, 30, 25]]
    np.testing.assert_array_equal(masks[1], truth["dog"])  # compressed RLE
    np.testing.assert_allclose(boxes, [[10, 5, 30, 25], [40, 30, 50, 35]])

    image, masks, labels, boxes = ds.raw(1)  # grayscale PNG
    assert image.shape == (3, 30, 50)
    np.testing.assert_array_equal(image[0], image[2])
    assert labels.tolist() == [3, 4]
    np.testing.assert_array_equal(masks[0], truth["person"])  # uncompressed RLE

    img, labels, masks, boxes, meta = ds[0]  # 40 x 60 -> 64 x 96 (x1.6), already padded
    assert img.shape == (3, 64, 96) and masks.shape == (2, 64, 96)
    assert meta["image_id"] == 11 and meta["input_size"] == (64, 96)
    torch.testing.assert_close(boxes[1], torch.tensor([64.0, 48.0, 80.0, 56.0]))
    img, labels, masks, boxes, meta = ds[1]  # 30 x 50 -> 58 x 96 (x1.92) padded to 64 x 96
    assert meta["input_size"] == (58, 96) and img.shape == (3, 64, 96)
    assert img[:, 58:].abs().max() == 0
    img, labels, masks, boxes, meta = ds[2]  # negative image kept: 20 x 20 -> 64 x 64
    assert img.shape == (3, 64, 64) and labels.shape == (0,) and masks.shape == (0, 64, 64)


def test_coco_reader_cis680_classes_and_drop_empty(ds_coco):
    json_path, image_dir, _ = ds_coco
    ds = D.CocoDataset(json_path, image_dir, short_side=64, max_side=96, cis680_classes=True)
    assert ds.class_names == D.CIS680_CLASSES
    assert ds.raw(0)[2].tolist() == [3, 3]  # cat, dog -> animal
    assert ds.raw(1)[2].tolist() == [2]  # person; the kite is dropped
    assert [ds.num_instances(i) for i in range(3)] == [2, 1, 0]
    dropped = D.CocoDataset(json_path, image_dir, cis680_classes=True, drop_empty=True)
    assert dropped.image_ids == [11, 12]


def test_coco_to_cis680_on_small_json(ds_coco, tmp_path):
    json_path, image_dir, truth = ds_coco
    D.coco_to_cis680(json_path, image_dir, tmp_path / "out" / "mine")
    ds = D.BuildDataset(tmp_path / "out" / "mine", size=SMALL)
    assert len(ds) == 3 and [ds.num_instances(i) for i in range(3)] == [2, 1, 0]
    image, masks, labels, boxes = ds.raw(0)  # 40 x 60 -> 267 x 400 at the top, zero below
    assert image.shape == (3, 300, 400) and image[:, 267:].max() == 0
    assert labels.tolist() == [3, 3] and masks.shape == (2, 300, 400)
    sx, sy = 400 / 60, 267 / 40  # width to 400, height round(40 * 400 / 60) = 267
    np.testing.assert_allclose(boxes[1], [40 * sx, 30 * sy, 50 * sx, 35 * sy], rtol=1e-5)
    np.testing.assert_allclose(D.masks_to_boxes(masks[1:]), boxes[1:], atol=1.0)
    D.coco_to_cis680(json_path, image_dir, tmp_path / "out" / "pos", drop_empty=True)
    assert len(D.BuildDataset(tmp_path / "out" / "pos")) == 2


def test_coco_degenerate_annotation_is_dropped_with_a_warning(ds_coco):
    json_path, image_dir, _ = ds_coco
    data = json.loads(json_path.read_text())
    data["annotations"].append(
        {"id": 9, "image_id": 13, "category_id": 3, "iscrowd": 0, "segmentation": [[1, 1, 2, 2]]}
    )  # two points: no area
    json_path.write_text(json.dumps(data))
    ds = D.CocoDataset(json_path, image_dir, short_side=64, max_side=96)
    assert ds.num_instances(2) == 1
    with pytest.warns(UserWarning, match="annotation 9 of image 13 has an empty mask"):
        _, labels, masks, boxes, _ = ds[2]
    assert labels.shape == (0,) and masks.shape == (0, 64, 64)


def test_pick_samples_prefers_images_with_several_objects(ds_cis680):
    prefix, _ = ds_cis680  # 2, 0, 1, 3 instances
    ds = D.BuildDataset(prefix, size=SMALL)
    assert D.pick_samples(ds, 5) == [0, 3, 1, 2]
    assert D.pick_samples(ds, 2) == [0, 3]


@pytest.fixture(scope="module")
def ds_coco128_cis680(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("coco128") / "coco128"
    D.coco_to_cis680(COCO128_JSON, COCO128_IMAGES, prefix, drop_empty=True)
    return prefix


@needs_coco128
def test_coco128_converted_to_cis680_has_known_counts(ds_coco128_cis680):
    ds = D.BuildDataset(ds_coco128_cis680, size=SMALL)
    assert len(ds) == 93
    assert sum(len(lab) for lab in ds.labels) == 407
    per_class = collections.Counter(int(x) for lab in ds.labels for x in lab)
    assert per_class == {2: 254, 1: 91, 3: 62}  # person, vehicles, animals
    # grouping: each image holds the masks of its own annotations, in order
    coco = D.CocoDataset(COCO128_JSON, COCO128_IMAGES, cis680_classes=True, drop_empty=True)
    assert [ds.num_instances(i) for i in range(93)] == [coco.num_instances(i) for i in range(93)]
    for i in (0, 1, 50):
        image, masks, labels, boxes = coco.raw(i)
        expected = D.letterbox(image, masks, boxes)
        got = ds.raw(i)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[2], labels)
        np.testing.assert_allclose(got[3], expected[2], atol=1e-4)


@needs_coco128
def test_coco128_reader_all_categories():
    ds = D.CocoDataset(COCO128_JSON, COCO128_IMAGES, short_side=96, max_side=128)
    assert len(ds) == 128 and len(ds.class_names) == 80 and ds.class_names[0] == "person"
    assert sum(ds.num_instances(i) for i in range(len(ds))) == 939 - 10  # crowd left out
    cis = D.CocoDataset(COCO128_JSON, COCO128_IMAGES, cis680_classes=True)
    assert len(cis) == 128  # images without mapped instances stay as negatives
    assert sum(cis.num_instances(i) > 0 for i in range(128)) == 93
    gray = next(i for i, k in enumerate(ds.image_ids) if Image.open(
        COCO128_IMAGES / ds.coco.imgs[k]["file_name"]).mode == "L")  # fmt: skip
    img, labels, masks, boxes, meta = ds[gray]
    h, w = meta["input_size"]
    assert max(h, w) <= 128 and img.shape[-2] % 32 == 0 and img.shape[-1] % 32 == 0
    assert masks.shape[0] == labels.shape[0] == ds.num_instances(gray)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def padded_sample(rects, h=48, w=60, labels=None):
    """A preprocessed sample of an h x w image (identity resize) padded to multiples of 32."""
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, h, w), dtype=np.uint8))
    masks = torch.from_numpy(rect_masks(rects, h, w))
    img, masks, boxes, parts = D.preprocess(image, masks, D.masks_to_boxes(masks), (h, w), 32)
    labels = torch.arange(1, len(rects) + 1) if labels is None else torch.tensor(labels)
    return img, labels, masks, boxes, {"image_id": 0, **parts, "file_name": "x"}


def test_flip_of_known_mask_gives_known_box():
    sample = padded_sample([(10, 10, 20, 20)])  # image 48 x 60 padded to 64 x 64
    flip = D.TrainAugment(flip_prob=1.0, brightness=0.0, contrast=0.0, scale_range=(1.0, 1.0))
    img, labels, masks, boxes, meta = flip(sample)
    assert img.shape == (3, 64, 64) and masks.shape == (1, 64, 64)
    torch.testing.assert_close(boxes, torch.tensor([[40.0, 10.0, 50.0, 20.0]]))  # 60 - 20, 60 - 10
    torch.testing.assert_close(img[:, :48, :60], sample[0][:, :48, :60].flip(-1), atol=1e-5, rtol=0)
    assert img[:, 48:].abs().max() == 0 and img[:, :, 60:].abs().max() == 0
    assert meta["augment"]["hflip"] is True and meta["input_size"] == (48, 60)
    keep = D.TrainAugment(flip_prob=0.0, brightness=0.0, contrast=0.0, scale_range=(1.0, 1.0))
    torch.testing.assert_close(keep(sample)[2], sample[2])


def test_augment_keeps_masks_boxes_consistent_and_is_reproducible():
    rects = [(0, 0, 8, 8), (20, 5, 45, 30), (50, 38, 60, 48), (30, 40, 31, 41)]
    sample = padded_sample(rects)  # the last instance is one pixel: dropped unless zoomed in
    augment = D.TrainAugment()
    for seed in range(12):
        torch.manual_seed(seed)
        img, labels, masks, boxes, meta = augment(sample)
        assert img.shape == (3, 64, 64) and masks.shape[1:] == (64, 64)
        assert img.dtype == torch.float32 and masks.dtype == torch.uint8
        assert len(labels) == len(masks) == len(boxes)
        assert set(masks.unique().tolist()) <= {0, 1}
        assert (masks.flatten(1).sum(1) >= 4).all()
        torch.testing.assert_close(boxes, D.masks_to_boxes(masks))
        assert masks[:, 48:].sum() == 0 and masks[:, :, 60:].sum() == 0  # inside input_size
        assert img[:, 48:].abs().max() == 0
    torch.manual_seed(5)
    first = augment(sample)
    torch.manual_seed(5)
    second = augment(sample)
    torch.testing.assert_close(first[0], second[0])
    torch.testing.assert_close(first[2], second[2])
    assert first[4]["augment"] == second[4]["augment"]


def test_augment_drops_instances_cropped_away():
    sample = padded_sample([(0, 0, 4, 4), (20, 10, 40, 30)])  # 4 x 4 instance at the corner
    zoom = D.TrainAugment(brightness=0.0, contrast=0.0, scale_range=(1.2, 1.2), flip_prob=0.0)
    outcomes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        _, labels, masks, boxes, meta = zoom(sample)
        top, left = meta["augment"]["crop"]
        remaining = max(0, 5 - top) * max(0, 5 - left)  # the corner grows to 5 x 5 pixels
        assert (1 in labels.tolist()) == (remaining >= 4)
        assert 2 in labels.tolist()
        outcomes.add(remaining >= 4)
    assert outcomes == {True, False}


def test_augment_handles_image_without_objects():
    img, labels, masks, boxes, meta = D.TrainAugment()(padded_sample([]))
    assert img.shape == (3, 64, 64) and masks.shape == (0, 64, 64) and boxes.shape == (0, 4)


# --------------------------------------------------------------------------------------------
# Collate, split, loaders
# --------------------------------------------------------------------------------------------


def test_collate_pads_to_largest_size():
    a = padded_sample([(0, 0, 8, 8), (10, 10, 20, 20)], h=64, w=96)
    b = padded_sample([], h=96, w=64)
    imgs, label_list, mask_list, box_list, meta_list = D.collate_fn([a, b])
    assert imgs.shape == (2, 3, 96, 96)
    assert mask_list[0].shape == (2, 96, 96) and mask_list[1].shape == (0, 96, 96)
    assert imgs[0, :, 64:].abs().max() == 0 and mask_list[0][:, 64:].sum() == 0
    torch.testing.assert_close(imgs[0, :, :64, :96], a[0])
    torch.testing.assert_close(box_list[0], a[3])
    assert [len(x) for x in label_list] == [2, 0] and meta_list[1] is b[4]
    assert D.BuildDataLoader.collect_fn is D.collate_fn


def test_split_is_seeded_80_20_disjoint_and_covering():
    train, val = D.split_indices(100, 0.2, seed=0)
    assert len(train) == 80 and len(val) == 20
    assert not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert D.split_indices(100, 0.2, seed=0) == (train, val)
    assert D.split_indices(100, 0.2, seed=1) != (train, val)
    assert [len(x) for x in D.split_indices(3265)] == [2612, 653]  # the hand-out's data set


def test_explicit_split_files(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"train": [0, 1, 2], "val": [4]}))
    assert D.load_split(tmp_path / "s.json") == ([0, 1, 2], [4])
    (tmp_path / "v.txt").write_text("# validation images\n1, 3\n5\n")
    assert D.load_split(tmp_path / "v.txt") == (None, [1, 3, 5])
    assert D.resolve_split(tmp_path / "v.txt", 6) == ([0, 2, 4], [1, 3, 5])
    assert D.resolve_split([0], 3) == ([1, 2], [0])
    (tmp_path / "bad.json").write_text(json.dumps([0, 9]))
    with pytest.raises(D.DataError) as excinfo:
        D.resolve_split(tmp_path / "bad.json", 6)
    assert_names(excinfo, tmp_path / "bad.json")


def test_build_datasets_splits_and_augments_train_only(ds_cis680, ds_coco):
    prefix, _ = ds_cis680
    train, val = D.build_datasets(prefix, size=SMALL, split=[2])
    assert train.indices == [0, 1, 3] and val.indices == [2]
    assert isinstance(train.augment, D.TrainAugment) and val.augment is None
    assert "augment" in train[0][4] and "augment" not in val[0][4]
    json_path, image_dir, _ = ds_coco
    train, val = D.build_datasets(json_path, image_dir, size=(64, 96), augment=False, seed=0)
    assert len(train) == 2 and len(val) == 1 and train.augment is None
    assert sorted(train.image_ids + val.image_ids) == [11, 12, 13]
    assert val[0][0].shape[-2:] == (64, 96) or val[0][0].shape[-2:] == (64, 64)


def test_dataloader_with_two_workers_is_reproducible(tmp_path):
    prefix = tmp_path / "w"
    D.write_cis680(prefix, make_samples([1, 2, 0, 3, 1, 2]))
    ds = D.BuildDataset(prefix, size=(64, 96), augment=D.TrainAugment())
    ds[0]  # opens the HDF5 files in this process; the data set must still pickle
    assert pickle.loads(pickle.dumps(ds))._files is None

    def epoch(seed):
        loader = D.BuildDataLoader(ds, batch_size=2, shuffle=True, num_workers=2, seed=seed)
        return list(loader.loader())

    batches = epoch(seed=0)
    assert len(batches) == 3
    for imgs, labels, masks, _, metas in batches:
        assert imgs.shape == (2, 3, 64, 96) and len(labels) == len(masks) == len(metas) == 2
        assert all(m.shape[1:] == (64, 96) for m in masks)
    again = epoch(seed=0)
    assert [m["image_id"] for b in batches for m in b[4]] == [
        m["image_id"] for b in again for m in b[4]
    ]
    torch.testing.assert_close(batches[0][0], again[0][0])  # same augmentation too
    assert sorted(m["image_id"] for b in batches for m in b[4]) == list(range(6))


# --------------------------------------------------------------------------------------------
# Bad input: one clear DataError naming the file
# --------------------------------------------------------------------------------------------


def test_error_missing_file(ds_cis680):
    prefix, _ = ds_cis680
    path = D.cis680_paths(prefix)["mask"]
    path.unlink()
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "not found" in str(excinfo.value)


def test_error_labels_do_not_cover_all_images(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["labels"]
    save_object_npy(path, [s[2] for s in samples[:3]])
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "cover 3 images" in str(excinfo.value)


def test_error_boxes_do_not_match_labels(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["bboxes"]
    boxes = [s[3] for s in samples]
    boxes[3] = boxes[3][:2]
    save_object_npy(path, boxes)
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "image 3" in str(excinfo.value)


def test_error_mask_count_does_not_match_labels(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["mask"]
    write_h5(path, np.concatenate([s[1] for s in samples])[:5])
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)


def test_error_box_outside_image(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["bboxes"]
    boxes = [s[3].copy() for s in samples]
    boxes[2][0] = [100, 50, 500, 80]  # x2 beyond the 400 pixel width
    save_object_npy(path, boxes)
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "inside the image" in str(excinfo.value)


def test_error_label_out_of_range(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["labels"]
    labels = [s[2] for s in samples]
    labels[0] = np.array([1, 4])
    save_object_npy(path, labels)
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "1..3" in str(excinfo.value)


def test_error_empty_mask_at_construction_and_lazily(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["mask"]
    masks = np.concatenate([s[1] for s in samples])
    masks[4] = 0  # second instance of image 3
    write_h5(path, masks)
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "instance 1 of image 3" in str(excinfo.value)
    ds = D.BuildDataset(prefix, size=SMALL, check_masks=False)
    ds[0]
    with pytest.raises(D.DataError) as excinfo:
        ds[3]
    assert_names(excinfo, path)


def test_error_wrong_image_shape_and_dtype(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["img"]
    images = np.stack([s[0] for s in samples])
    write_h5(path, images[:, :2])
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "shape" in str(excinfo.value)
    write_h5(path, images.astype(np.float32))
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)
    assert "uint8" in str(excinfo.value)


def test_error_mask_frame_differs_from_images(ds_cis680):
    prefix, samples = ds_cis680
    path = D.cis680_paths(prefix)["mask"]
    write_h5(path, np.concatenate([s[1] for s in samples])[:, :, :399])
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, path)


def test_error_unreadable_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(D.DataError) as excinfo:
        D.CocoDataset(path, tmp_path)
    assert_names(excinfo, path)
    assert "json" in str(excinfo.value)


def test_error_image_file_missing(ds_coco):
    json_path, image_dir, _ = ds_coco
    (image_dir / "b.png").unlink()
    with pytest.raises(D.DataError) as excinfo:
        D.CocoDataset(json_path, image_dir)
    assert_names(excinfo, image_dir / "b.png")
    assert_names(excinfo, json_path)


def test_error_image_size_differs_from_json(ds_coco):
    json_path, image_dir, _ = ds_coco
    Image.new("RGB", (21, 20)).save(image_dir / "c.png")  # json says 20 x 20
    ds = D.CocoDataset(json_path, image_dir)
    with pytest.raises(D.DataError) as excinfo:
        ds[2]
    assert_names(excinfo, image_dir / "c.png")


def test_error_annotation_of_unknown_image(ds_coco):
    json_path, image_dir, _ = ds_coco
    data = json.loads(json_path.read_text())
    data["annotations"][0]["image_id"] = 99
    json_path.write_text(json.dumps(data))
    with pytest.raises(D.DataError) as excinfo:
        D.CocoDataset(json_path, image_dir)
    assert_names(excinfo, json_path)
    assert "image_id" in str(excinfo.value)


def test_error_coco_box_outside_image(ds_coco):
    json_path, image_dir, _ = ds_coco
    data = json.loads(json_path.read_text())
    data["annotations"][1]["bbox"] = [40, 30, 40, 5]  # reaches x = 80 in a 60 wide image
    json_path.write_text(json.dumps(data))
    with pytest.raises(D.DataError) as excinfo:
        D.CocoDataset(json_path, image_dir)
    assert_names(excinfo, json_path)


# --------------------------------------------------------------------------------------------
# main (needs visualize.py, written by another helper)
# --------------------------------------------------------------------------------------------


def test_main_saves_pictures(ds_cis680, tmp_path):
    pytest.importorskip("visualize")
    prefix, _ = ds_cis680
    out = tmp_path / "pictures"
    saved = D.main(
        ["--cis680", str(prefix), "--out", str(out), "--num", "3", "--size", "96", "128"]
    )
    assert len(saved) == 3 and all(p.is_file() for p in saved)
