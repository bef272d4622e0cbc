"""Tests of the LabelMe folder reader in dataset.py, and of `--data FOLDER` in the scripts.

Every LabelMe file here is written by the tests (small PNG / JPEG images with PIL), with shapes
whose areas and boxes are known. Run: python -m pytest -q tests/test_labelme.py (CPU, seconds).
Shapes: N instances, H x W padded input, h0 x w0 source image.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as D
import training

SMALL = (64, 96)  # (short side, long-side cap) of the test input


# One intra-op thread for every test here (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------
# Helpers: LabelMe files as LabelMe 5 writes them
# --------------------------------------------------------------------------------------------


def shape(label, points, shape_type="polygon", group_id=None) -> dict:
    return {
        "label": label,
        "points": [[float(x), float(y)] for x, y in points],
        "group_id": group_id,
        "description": "",
        "shape_type": shape_type,
        "flags": {},
        "mask": None,
    }


def noise(h, w, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(image: np.ndarray, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **save_args)
    return buf.getvalue()


def write_labelme(
    folder: Path,
    stem: str,
    shapes: list,
    image: np.ndarray,
    suffix: str = ".png",
    embed: bool = False,
    image_file: bool = True,
    **fields,
) -> Path:
    """Write folder/stem.json and, unless image_file is False, the image folder/stem+suffix;
    embed puts the image bytes into imageData. fields override the json's other fields."""
    data = encode(image, "PNG" if suffix == ".png" else "JPEG", quality=95)
    if image_file:
        (folder / f"{stem}{suffix}").write_bytes(data)
    h, w = image.shape[:2]
    content = {
        "version": "5.5.0",
        "flags": {},
        "shapes": shapes,
        "imagePath": f"{stem}{suffix}",
        "imageData": base64.b64encode(data).decode("ascii") if embed else None,
        "imageHeight": h,
        "imageWidth": w,
        **fields,
    }
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(content, indent=2))
    return path


L_SHAPE = [(40, 5), (70, 5), (70, 15), (50, 15), (50, 35), (40, 35)]  # area 30*10 + 10*20 = 500


@pytest.fixture
def labelme_folder(tmp_path):
    """Four images (json order a, b, c, d):
    a.png 60 x 80: a cat rectangle (10, 20)-(30, 40) and an L-shaped dog polygon;
    b.jpg 64 x 64: a cat circle (centre (32, 30), radius 12); two person shapes with group_id 1
      (rectangles x 2..12 and 8..20, rows 2..10: union 18 x 8 = 144); a cat with group_id 1
      (another label: its own instance, 10 x 10); a person without group_id (20 x 10);
    c.png 30 x 40: no shapes (a negative);
    d 32 x 48: only as imageData (no image file), a dog rectangle (4, 4)-(20, 12).
    Returns (folder, {stem: image (h0, w0, 3)})."""
    folder = tmp_path / "labelme"
    folder.mkdir()
    images = {"a": noise(60, 80, 0), "b": noise(64, 64, 1), "c": noise(30, 40, 2)}
    images["d"] = noise(32, 48, 3)
    write_labelme(
        folder,
        "a",
        [shape("cat", [(10, 20), (30, 40)], "rectangle"), shape("dog", L_SHAPE)],
        images["a"],
    )
    b_shapes = [
        shape("cat", [(32, 30), (44, 30)], "circle"),
        shape("person", [(2, 2), (12, 10)], "rectangle", group_id=1),
        shape("cat", [(2, 50), (12, 60)], "rectangle", group_id=1),
        shape("person", [(8, 2), (20, 2), (20, 10), (8, 10)], group_id=1),
        shape("person", [(40, 50), (60, 60)], "rectangle"),
    ]
    write_labelme(folder, "b", b_shapes, images["b"], suffix=".jpg")
    write_labelme(folder, "c", [], images["c"])
    d_shapes = [shape("dog", [(20, 12), (4, 4)], "rectangle")]  # corners in either order
    write_labelme(folder, "d", d_shapes, images["d"], embed=True, image_file=False)
    return folder, images


# --------------------------------------------------------------------------------------------
# Reading shapes: known areas, boxes, labels
# --------------------------------------------------------------------------------------------


def test_rectangle_polygon_and_circle_give_known_areas_boxes_and_labels(labelme_folder):
    folder, images = labelme_folder
    ds = D.LabelMeDataset(folder, short_side=SMALL[0], max_side=SMALL[1])
    assert ds.class_names == ("cat", "dog", "person")  # sorted label names -> ids 1, 2, 3
    assert len(ds) == 4 and [ds.num_instances(i) for i in range(4)] == [2, 4, 0, 1]

    image, masks, labels, boxes = ds.raw(0)
    np.testing.assert_array_equal(image, images["a"].transpose(2, 0, 1))  # PNG: exact
    assert masks.dtype == np.uint8 and masks.shape == (2, 60, 80)
    assert labels.tolist() == [1, 2]
    assert masks.reshape(2, -1).sum(1).tolist() == [20 * 20, 500]
    assert masks[0, 20:40, 10:30].all()  # rows 20..39, columns 10..29
    np.testing.assert_array_equal(boxes, [[10, 20, 30, 40], [40, 5, 70, 35]])

    image, masks, labels, boxes = ds.raw(1)
    assert image.shape == (3, 64, 64) and labels.tolist() == [1, 3, 1, 3]
    assert masks[0].sum() == pytest.approx(math.pi * 12**2, rel=0.02)
    np.testing.assert_allclose(boxes[0], [20, 18, 44, 42], atol=1)
    assert boxes.dtype == np.float32


def test_group_id_joins_shapes_of_one_label_into_one_instance(labelme_folder):
    folder, _ = labelme_folder
    _, masks, labels, boxes = D.LabelMeDataset(folder).raw(1)
    # person, group 1: two overlapping rectangles, the union (not the sum 80 + 96) of them
    assert labels[1] == 3 and masks[1].sum() == 18 * 8
    np.testing.assert_array_equal(boxes[1], [2, 2, 20, 10])
    # cat, group 1: the same group_id with another label is another instance
    assert labels[2] == 1 and masks[2].sum() == 10 * 10
    np.testing.assert_array_equal(boxes[2], [2, 50, 12, 60])
    # person without group_id: an instance of its own
    assert labels[3] == 3 and masks[3].sum() == 20 * 10


def test_image_without_shapes_is_a_negative(labelme_folder):
    folder, _ = labelme_folder
    img, labels, masks, boxes, meta = D.LabelMeDataset(folder, SMALL[0], SMALL[1])[2]
    # 30 x 40 -> 64 x 85 (x 2.13, short side to 64), padded to 64 x 96
    assert img.shape == (3, 64, 96) and meta["input_size"] == (64, 85)
    assert labels.shape == (0,) and masks.shape == (0, 64, 96) and boxes.shape == (0, 4)
    assert meta["image_id"] == 2 and meta["file_name"] == str(folder / "c.png")


def test_image_embedded_as_image_data_only(labelme_folder):
    folder, images = labelme_folder
    assert not (folder / "d.png").exists()
    ds = D.LabelMeDataset(folder, short_side=SMALL[0], max_side=SMALL[1])
    image, masks, labels, boxes = ds.raw(3)
    np.testing.assert_array_equal(image, images["d"].transpose(2, 0, 1))
    assert labels.tolist() == [2] and masks.sum() == 16 * 8
    np.testing.assert_array_equal(boxes, [[4, 4, 20, 12]])
    img, labels, masks, boxes, meta = ds[3]  # 32 x 48 -> 64 x 96 (x 2)
    assert meta["file_name"] == str(folder / "d.json") and masks.sum() == 4 * 16 * 8
    torch.testing.assert_close(boxes, torch.tensor([[8.0, 8.0, 40.0, 24.0]]))


def test_preprocessing_equals_the_coco_path_on_labelmes_coco_export(labelme_folder, tmp_path):
    """The same image and polygons as a COCO json laid out as LabelMe's labelme2coco writes it
    (a `_background_` category with id 0, images under JPEGImages/) give the same sample."""
    folder, images = labelme_folder
    export = tmp_path / "export"
    (export / "JPEGImages").mkdir(parents=True)
    (export / "JPEGImages" / "a.png").write_bytes((folder / "a.png").read_bytes())
    rect = [10, 20, 30, 20, 30, 40, 10, 40]
    coco = {
        "info": {"description": "labelme2coco"},
        "images": [{"id": 0, "file_name": "JPEGImages/a.png", "height": 60, "width": 80}],
        "categories": [
            {"id": 0, "name": "_background_", "supercategory": None},
            {"id": 1, "name": "cat", "supercategory": None},
            {"id": 2, "name": "dog", "supercategory": None},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "segmentation": [rect],
             "area": 400.0, "bbox": [10, 20, 20, 20], "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 2,
             "segmentation": [[v for p in L_SHAPE for v in p]],
             "area": 500.0, "bbox": [40, 5, 30, 30], "iscrowd": 0},
        ],
    }  # fmt: skip
    (export / "annotations.json").write_text(json.dumps(coco))
    coco_train, _ = D.build_datasets(
        export / "annotations.json",
        export,
        size=SMALL,
        split=([0], []),
        augment=False,
        cis680_classes=False,
    )
    assert isinstance(coco_train, D.CocoDataset)
    c_img, c_labels, c_masks, c_boxes, c_meta = coco_train[0]
    labelme = D.LabelMeDataset(folder, short_side=SMALL[0], max_side=SMALL[1])
    img, labels, masks, boxes, meta = labelme[0]
    torch.testing.assert_close(img, c_img, rtol=0, atol=0)
    torch.testing.assert_close(masks, c_masks, rtol=0, atol=0)
    torch.testing.assert_close(boxes, c_boxes)
    assert [labelme.class_names[k - 1] for k in labels] == ["cat", "dog"]
    assert [coco_train.class_names[k - 1] for k in c_labels] == ["cat", "dog"]
    assert meta["input_size"] == c_meta["input_size"] == (64, 85)  # 60 x 80 x 1.07
    assert meta["scale"] == c_meta["scale"] and img.shape == (3, 64, 96)


def test_exif_orientation_is_applied_as_labelme_shows_the_photo(tmp_path):
    # Stored 40 x 60, left half red and right half blue, EXIF orientation 6 (turn 90 degrees
    # clockwise to show): shown 60 x 40 with red on top and blue below, as LabelMe shows it.
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:, :30, 0] = 255
    stored[:, 30:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "photo.jpg").write_bytes(data)
    red_half = [shape("red", [(0, 0), (40, 30)], "rectangle")]
    content = {"shapes": red_half, "imagePath": "photo.jpg", "imageData": None}
    (tmp_path / "photo.json").write_text(
        json.dumps({**content, "imageHeight": 60, "imageWidth": 40})
    )
    image, masks, _, _ = D.LabelMeDataset(tmp_path).raw(0)
    assert image.shape == (3, 60, 40)
    assert image[0, :28].mean() > 200 and image[2, :28].mean() < 50  # top: red
    assert image[2, 32:].mean() > 200 and image[0, 32:].mean() < 50  # bottom: blue
    assert masks.sum() == 40 * 30

    # Sizes of the stored frame in the json: the shapes were not drawn on this image.
    (tmp_path / "photo.json").write_text(
        json.dumps({**content, "imageHeight": 40, "imageWidth": 60})
    )
    with pytest.raises(D.DataError, match=r"imageHeight x imageWidth is 40 x 60") as excinfo:
        D.LabelMeDataset(tmp_path).raw(0)
    assert str(tmp_path / "photo.json") in str(excinfo.value)


def test_windows_image_path_with_backslashes_is_found(tmp_path):
    (tmp_path / "images").mkdir()
    image = noise(20, 30, 4)
    (tmp_path / "images" / "x.png").write_bytes(encode(image))
    write_labelme(
        tmp_path,
        "x",
        [shape("cat", [(1, 1), (11, 6)], "rectangle")],
        image,
        image_file=False,
        imagePath="images\\x.png",
    )
    ds = D.LabelMeDataset(tmp_path)
    np.testing.assert_array_equal(ds.raw(0)[0], image.transpose(2, 0, 1))
    assert ds[0][4]["file_name"] == str(tmp_path / "images" / "x.png")


def test_zero_area_shape_is_dropped_with_a_warning_naming_the_json(tmp_path):
    circle0 = shape("cat", [(10, 10), (10, 10)], "circle")  # radius 0
    path = write_labelme(
        tmp_path, "z", [circle0, shape("dog", [(0, 0), (5, 5)], "rectangle")], noise(20, 20, 5)
    )
    ds = D.LabelMeDataset(tmp_path, short_side=32, max_side=32)
    assert ds.num_instances(0) == 2
    with pytest.warns(
        UserWarning, match=re.escape(f"{path}: instance 0 (label 'cat') has an empty")
    ):
        _, labels, masks, _, _ = ds[0]
    assert labels.tolist() == [2] and masks.shape == (1, 32, 32)


# --------------------------------------------------------------------------------------------
# Bad input: a DataError naming the json and what was wrong
# --------------------------------------------------------------------------------------------

BAD_SHAPES = {
    "polygon of 2 points": (
        shape("cat", [(1, 1), (5, 5)]),
        "shapes[0] (label 'cat') polygon has 2 point(s); expected at least 3 points",
    ),
    "rectangle of 3 points": (
        shape("cat", [(1, 1), (5, 5), (9, 1)], "rectangle"),
        "rectangle has 3 point(s); expected 2 points (two opposite corners)",
    ),
    "circle of 1 point": (
        shape("cat", [(5, 5)], "circle"),
        "circle has 1 point(s); expected 2 points (the centre and a point on the circle)",
    ),
    "line": (shape("cat", [(1, 1), (5, 5)], "line"), "shape_type is 'line'"),
    "point": (shape("cat", [(1, 1)], "point"), "shape_type is 'point'"),
    "linestrip": (shape("cat", [(1, 1), (5, 5), (9, 1)], "linestrip"), "'linestrip'"),
    "points not pairs": (
        {**shape("cat", []), "points": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]},
        "points are [[1, 2, 3]",
    ),
    "points not numbers": ({**shape("cat", []), "points": "1 2 3 4"}, "points are '1 2 3 4'"),
    "empty label": (shape("", [(1, 1), (5, 5)], "rectangle"), "shapes[0] label is ''"),
    "group_id text": (
        shape("cat", [(1, 1), (5, 5)], "rectangle", group_id="g"),
        "group_id is 'g'; expected an integer or null",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
def test_bad_shape_gets_a_data_error_naming_the_json(case, tmp_path):
    bad_shape, message = BAD_SHAPES[case]
    write_labelme(tmp_path, "good", [shape("cat", [(1, 1), (5, 5)], "rectangle")], noise(8, 8, 6))
    bad = write_labelme(tmp_path, "bad", [bad_shape], noise(8, 8, 7))
    with pytest.raises(D.DataError, match=re.escape(message)) as excinfo:
        D.LabelMeDataset(tmp_path)
    assert str(excinfo.value).startswith(f"{bad}: ")


def test_missing_image_without_image_data_names_the_json(tmp_path):
    path = write_labelme(tmp_path, "lost", [], noise(8, 8, 8), image_file=False)
    with pytest.raises(D.DataError, match="imagePath 'lost.png'") as excinfo:
        D.LabelMeDataset(tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ") and str(tmp_path / "lost.png") in message
    assert "was not found and imageData is empty" in message


def test_unreadable_json_and_json_without_shapes_name_the_file(tmp_path):
    write_labelme(tmp_path, "good", [shape("cat", [(1, 1), (5, 5)], "rectangle")], noise(8, 8, 9))
    (tmp_path / "broken.json").write_text('{"shapes": [')
    with pytest.raises(D.DataError, match="could not be read as json") as excinfo:
        D.LabelMeDataset(tmp_path)
    assert str(tmp_path / "broken.json") in str(excinfo.value)
    (tmp_path / "broken.json").unlink()
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(D.DataError, match="field 'shapes' is missing") as excinfo:
        D.LabelMeDataset(tmp_path)
    assert str(tmp_path / "coco.json") in str(excinfo.value)


def test_image_data_that_is_no_image_names_the_json(tmp_path):
    path = write_labelme(
        tmp_path, "e", [shape("cat", [(1, 1), (5, 5)], "rectangle")], noise(8, 8, 10),
        image_file=False, imageData=base64.b64encode(b"not an image").decode("ascii"),
    )  # fmt: skip
    ds = D.LabelMeDataset(tmp_path)  # found at construction, decoded when read
    with pytest.raises(D.DataError, match="imageData could not be read") as excinfo:
        ds.raw(0)
    assert str(excinfo.value).startswith(f"{path}: ")


def test_folder_without_labelme_files_or_without_any_shape(tmp_path):
    with pytest.raises(D.DataError, match=r"holds no \*\.json files") as excinfo:
        D.LabelMeDataset(tmp_path)
    assert str(tmp_path) in str(excinfo.value) and "prefix" not in str(excinfo.value)
    (tmp_path / "solo_img_comp_zlib.h5").write_bytes(b"")
    with pytest.raises(D.DataError, match="give their prefix"):
        D.build_datasets(tmp_path)
    write_labelme(tmp_path, "neg", [], noise(8, 8, 11))
    with pytest.raises(D.DataError, match=r"have no shapes \(1 files\)"):
        D.LabelMeDataset(tmp_path)


# --------------------------------------------------------------------------------------------
# build_datasets, loaders and the scripts
# --------------------------------------------------------------------------------------------


def test_build_datasets_splits_the_folder_and_a_loader_batches_it(labelme_folder):
    folder, _ = labelme_folder
    # cis680_classes is on in main_train's presets; free-text LabelMe labels ignore it
    train, val = D.build_datasets(folder, size=SMALL, seed=0, cis680_classes=True)
    assert isinstance(train, D.LabelMeDataset) and isinstance(val, D.LabelMeDataset)
    assert len(train) == 3 and len(val) == 1  # the seeded 80/20 split of 4 images
    assert sorted(train.indices + val.indices) == [0, 1, 2, 3]
    assert train.class_names == val.class_names == ("cat", "dog", "person")
    assert isinstance(train.augment, D.TrainAugment) and val.augment is None
    assert "augment" in train[0][4] and "augment" not in val[0][4]

    torch.manual_seed(0)
    imgs, labels, masks, boxes, metas = next(iter(D.BuildDataLoader(train, batch_size=3).loader()))
    assert imgs.shape == (3, 3, 64, 96)  # a, c, d are 64 x 96 padded; b 64 x 64, padded here
    assert [m["image_id"] for m in metas] == train.indices
    for img_labels, img_masks, img_boxes in zip(labels, masks, boxes, strict=True):
        assert img_masks.dtype == torch.uint8 and img_masks.shape[1:] == (64, 96)
        assert len(img_labels) == len(img_masks) == len(img_boxes)
        torch.testing.assert_close(D.masks_to_boxes(img_masks), img_boxes)


def test_dataset_main_saves_pictures_of_the_folder(labelme_folder, tmp_path):
    pytest.importorskip("visualize")
    folder, _ = labelme_folder
    out = tmp_path / "pictures"
    saved = D.main(["--data", str(folder), "--out", str(out), "--num", "3", "--size", "64", "96"])
    assert len(saved) == 3 and all(p.is_file() and p.stat().st_size > 0 for p in saved)


def test_main_train_takes_the_folder_and_trains_on_it(labelme_folder, tmp_path):
    import main_train
    from config import config_from_args

    folder, _ = labelme_folder
    args = main_train.build_parser().parse_args(["--preset", "cpu", "--data", str(folder)])
    cfg = config_from_args(args)
    assert cfg.data == str(folder) and cfg.cis680_classes  # the preset's, ignored for LabelMe
    train_set, val_set = D.build_data(cfg)
    assert isinstance(train_set, D.CachedSamples)  # the preset caches its samples
    assert isinstance(train_set.dataset, D.LabelMeDataset)
    assert len(train_set) + len(val_set) == 4
    assert train_set.class_names == ("cat", "dog", "person")

    # One epoch of a tiny model: the classes reach the checkpoint and AP is computed on the
    # held-out image from its LabelMe masks.
    tiny = replace(
        cfg,
        input_size=(64, 96),
        depth=18,
        fpn_channels=16,
        seg_feat_channels=16,
        stacked_convs=1,
        num_grids=(8, 8, 6, 4, 3),
        scale_ranges=((1, 24), (12, 48), (24, 96), (48, 192), (96, 2048)),
        batch_size=3,
        epochs=1,
        warmup_iters=1,
        time_budget_min=0.0,
        num_workers=0,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    training.train(tiny)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["class_names"] == ["cat", "dog", "person"] and ckpt["config"]["data"] == str(folder)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics.keys() >= {"AP", "AP50"}
