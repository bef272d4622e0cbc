"""Issue #19, cases 6 and 8: annotation conventions that are no class, and data without objects.

Case 6: LabelMe's `__ignore__` shapes and labelme2coco's `_background_` / `__ignore__`
categories are no class and no target; ignore regions are scored as crowd regions (a detection
on one is neither a true nor a false positive). Case 8: a training split without any object is
refused before training. Every input is written here, in tmp_path, with known areas and known
AP. Run: python -m pytest -q tests/test_bad_annotations.py (CPU, seconds).
Shapes: N instances, h0 x w0 source image.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset as D
import evaluation
from evaluation import build_coco_gt, evaluate, results_to_coco

H0, W0 = 20, 30  # source image size of every test image
CAT = [(2, 2), (10, 10)]  # rectangle corners: columns 2..9, rows 2..9 (8 x 8 = 64 pixels)
IGNORE = [(15, 5), (25, 15)]  # columns 15..24, rows 5..14 (10 x 10 = 100 pixels)


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H0, W0, 3), dtype=np.uint8)


def rect_mask(corners) -> np.ndarray:
    (x1, y1), (x2, y2) = corners
    mask = np.zeros((H0, W0), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def rect_polygon(corners) -> list[float]:
    (x1, y1), (x2, y2) = corners
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def labelme_shape(label: str, corners, group_id=None) -> dict:
    return {
        "label": label,
        "points": [list(map(float, p)) for p in corners],
        "group_id": group_id,
        "shape_type": "rectangle",
        "flags": {},
    }


def write_labelme(folder: Path, stem: str, shapes: list, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(seed)).save(folder / f"{stem}.png")
    content = {
        "version": "5.5.0",
        "shapes": shapes,
        "imagePath": f"{stem}.png",
        "imageData": None,
        "imageHeight": H0,
        "imageWidth": W0,
    }
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(content))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder and its bytes: reading must change nothing."""
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prediction(image_id: int, masks: list[np.ndarray], labels: list[int], scores: list[float]):
    result = {
        "masks": np.stack(masks).astype(np.uint8),
        "labels": np.array(labels, dtype=np.int64),
        "scores": np.array(scores, dtype=np.float32),
    }
    return {"image_id": image_id}, result


# --------------------------------------------------------------------------------------------
# Case 6, LabelMe: __ignore__ shapes
# --------------------------------------------------------------------------------------------


def test_case_06_labelme_ignore_shapes_are_no_class_and_no_target(tmp_path):
    folder = tmp_path / "labelme"
    write_labelme(
        folder,
        "a",
        [
            labelme_shape("cat", CAT),
            labelme_shape(D.IGNORE_LABEL, IGNORE, group_id=1),
            labelme_shape(D.IGNORE_LABEL, [(0, 15), (4, 20)], group_id=1),  # same group
        ],
    )
    write_labelme(folder, "b", [labelme_shape("dog", IGNORE)], seed=1)
    before = snapshot(folder)
    ds = D.LabelMeDataset(folder, short_side=32, max_side=64)
    assert ds.class_names == ("cat", "dog")  # "__ignore__" is no class
    assert [ds.num_instances(i) for i in range(2)] == [1, 1]
    assert len(ds.files[0].ignore) == 1 and len(ds.files[0].ignore[0]) == 2  # one group
    _, masks, labels, boxes = ds.raw(0)
    assert labels.tolist() == [1] and masks.shape == (1, H0, W0)
    np.testing.assert_array_equal(masks[0], rect_mask(CAT))
    np.testing.assert_array_equal(boxes, [[2, 2, 10, 10]])
    region = ds.ignore_mask(0)
    assert region.dtype == np.uint8 and region.shape == (H0, W0)
    np.testing.assert_array_equal(region, rect_mask(IGNORE) | rect_mask([(0, 15), (4, 20)]))
    assert ds.ignore_mask(1) is None  # no ignore shape
    img, labels, masks, _, _ = ds[0]
    assert labels.tolist() == [1] and masks.shape[0] == 1
    assert snapshot(folder) == before  # reading changes nothing


def test_case_06_labelme_folder_with_only_ignore_shapes_says_so(tmp_path):
    folder = tmp_path / "labelme"
    write_labelme(folder, "a", [labelme_shape(D.IGNORE_LABEL, IGNORE)])
    with pytest.raises(D.DataError) as excinfo:
        D.LabelMeDataset(folder)
    message = str(excinfo.value)
    assert message.startswith(f"{folder}: ") and "only '__ignore__' shapes" in message


def test_case_06_a_detection_on_a_labelme_ignore_region_costs_no_ap(tmp_path):
    """One cat, found exactly (score 0.9), and a higher-scored cat detection on the ignore
    region (0.95): with the region AP is 1.0; without it the first detection is a false
    positive and precision is 1/2 at every recall, AP 0.5 at every IoU threshold."""
    with_ignore, without = tmp_path / "with", tmp_path / "without"
    write_labelme(
        with_ignore, "a", [labelme_shape("cat", CAT), labelme_shape("__ignore__", IGNORE)]
    )
    write_labelme(without, "a", [labelme_shape("cat", CAT)])
    predictions = [prediction(0, [rect_mask(IGNORE), rect_mask(CAT)], [1, 1], [0.95, 0.9])]
    metrics = {}
    for name, folder in (("with", with_ignore), ("without", without)):
        ds = D.LabelMeDataset(folder)
        metrics[name] = evaluation.score(ds, evaluation.detections_of(predictions, ds))
    assert metrics["with"]["AP"] == pytest.approx(1.0)
    assert metrics["without"]["AP"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Case 6, evaluation: ignore masks in build_coco_gt
# --------------------------------------------------------------------------------------------


def test_case_06_build_coco_gt_ignore_regions_are_crowd_of_every_class():
    """A cat (class 1) and a dog (class 2) found exactly, and a dog detection with the
    highest score on the ignore region. The region is written once per category, so the dog
    detection there is ignored: AP 1.0. Without the region the dog class has AP 0.5 (precision
    1/2 at every recall) and the mean over the two classes is 0.75."""
    dog = [(2, 12), (12, 18)]
    samples = [(7, (H0, W0), np.stack([rect_mask(CAT), rect_mask(dog)]), np.array([1, 2]))]
    masks = [rect_mask(IGNORE), rect_mask(CAT), rect_mask(dog)]
    detections = results_to_coco([7], [prediction(7, masks, [2, 1, 2], [0.95, 0.9, 0.9])[1]])
    coco = build_coco_gt(samples, ("cat", "dog"), ignore_masks={7: rect_mask(IGNORE)})
    crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert sorted(a["category_id"] for a in crowd) == [1, 2]
    assert all(a["area"] == 100 and a["bbox"] == [15, 5, 10, 10] for a in crowd)
    assert evaluate(coco, detections)["AP"] == pytest.approx(1.0)
    assert evaluate(build_coco_gt(samples, ("cat", "dog")), detections)["AP"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"ignore mask of shape \(4, 4\)"):
        build_coco_gt(samples, ("cat", "dog"), ignore_masks={7: np.ones((4, 4), np.uint8)})
    with pytest.raises(ValueError, match=r"image ids \[8\] that no sample has"):
        build_coco_gt(samples, ("cat", "dog"), ignore_masks={8: rect_mask(IGNORE)})


# --------------------------------------------------------------------------------------------
# Case 6, COCO json: labelme2coco's _background_ and __ignore__ categories
# --------------------------------------------------------------------------------------------


def write_labelme2coco(folder: Path, names=("cat", "dog")) -> Path:
    """A json as labelme2coco writes it: `_background_` with id 0, ids from 0, plus an
    `__ignore__` category (id 3) with a region, and one `_background_` annotation."""
    (folder / "JPEGImages").mkdir(parents=True)
    Image.fromarray(noise(0)).save(folder / "JPEGImages" / "a.png")
    Image.fromarray(noise(1)).save(folder / "JPEGImages" / "b.png")
    dog = [(2, 12), (12, 18)]
    data = {
        "images": [
            {"id": 0, "file_name": "JPEGImages/a.png", "height": H0, "width": W0},
            {"id": 1, "file_name": "JPEGImages/b.png", "height": H0, "width": W0},
        ],
        "categories": [
            {"id": 0, "name": "_background_"},
            {"id": 1, "name": names[0]},
            {"id": 2, "name": names[1]},
            {"id": 3, "name": "__ignore__"},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "segmentation": [rect_polygon(CAT)],
             "area": 64.0, "bbox": [2, 2, 8, 8], "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 3, "segmentation": [rect_polygon(IGNORE)],
             "area": 100.0, "bbox": [15, 5, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 0, "segmentation": [rect_polygon(dog)],
             "area": 60.0, "bbox": [2, 12, 10, 6], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [rect_polygon(dog)],
             "bbox": [2, 12, 10, 6], "iscrowd": 0},  # no "area": COCOeval needs one
        ],
    }  # fmt: skip
    path = folder / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def test_case_06_coco_background_and_ignore_categories_are_dropped_saying_so_once(tmp_path):
    json_path = write_labelme2coco(tmp_path / "export")
    before = snapshot(tmp_path / "export")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, val = D.build_datasets(
            json_path, tmp_path / "export", size=(32, 64), split=([0], [1]), augment=False
        )
        train[0], val[0], train.subset([0])[0]
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(said) == 1, said
    assert said[0].startswith(f"{json_path}: ") and "'_background_' (id 0)" in said[0]
    assert "'__ignore__' (id 3)" in said[0]
    assert train.class_names == ("cat", "dog") and train.label_to_cat_id == {1: 1, 2: 2}
    assert train.num_instances(0) == 1 and val.num_instances(0) == 1  # ignore, background out
    _, masks, labels, _ = train.raw(0)
    assert labels.tolist() == [1] and masks.sum() == 64
    np.testing.assert_array_equal(train.ignore_mask(0), rect_mask(IGNORE))
    assert val.ignore_mask(0) is None
    # the ground truth evaluation uses has neither category; the region is a crowd of each
    gt = train.coco.dataset
    assert sorted(c["id"] for c in gt["categories"]) == [1, 2]
    assert {a["category_id"] for a in gt["annotations"]} == {1, 2}
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert sorted(a["category_id"] for a in crowd) == [1, 2] and crowd[0]["area"] == 100
    assert all(a["id"] >= 1 for a in gt["annotations"])  # labelme2coco counts from 0
    assert next(a for a in gt["annotations"] if a["image_id"] == 1)["area"] == 60
    assert snapshot(tmp_path / "export") == before


def test_case_06_a_detection_on_a_coco_ignore_region_costs_no_ap(tmp_path):
    """Scored against the json's own ground truth (`.coco`): the cat (annotation id 0, which
    COCOeval would take for "no match") found exactly, a dog detection with a higher score on
    the `__ignore__` region, and the dog of image 1 found exactly: AP 1.0 over cat and dog;
    `_background_` and `__ignore__` are no categories to average over."""
    json_path = write_labelme2coco(tmp_path / "export")
    with pytest.warns(UserWarning, match="are not classes"):
        ds = D.CocoDataset(json_path, tmp_path / "export")
    dog = [(2, 12), (12, 18)]
    predictions = [
        prediction(0, [rect_mask(IGNORE), rect_mask(CAT)], [2, 1], [0.95, 0.9]),
        prediction(1, [rect_mask(dog)], [2], [0.9]),
    ]
    detections = evaluation.detections_of(predictions, ds)
    assert evaluation.uses_coco_json(ds)
    assert evaluation.score(ds, detections)["AP"] == pytest.approx(1.0)
    plain = [d for d in detections if d["score"] != pytest.approx(0.95)]
    assert evaluation.score(ds, plain)["AP"] == pytest.approx(1.0)


def test_case_06_with_cis680_classes_the_conventions_break_nothing(tmp_path):
    json_path = write_labelme2coco(tmp_path / "export", names=("person", "dog"))
    with pytest.warns(UserWarning, match="are not classes"):
        ds = D.CocoDataset(json_path, tmp_path / "export", cis680_classes=True)
    assert ds.class_names == D.CIS680_CLASSES
    assert [ds.raw(i)[2].tolist() for i in range(2)] == [[2], [3]]  # person, dog -> animal
    np.testing.assert_array_equal(ds.ignore_mask(0), rect_mask(IGNORE))
    assert not evaluation.uses_coco_json(ds)  # scored against truth built from the masks
    dog = [(2, 12), (12, 18)]
    predictions = [
        prediction(0, [rect_mask(IGNORE), rect_mask(CAT)], [3, 2], [0.95, 0.9]),
        prediction(1, [rect_mask(dog)], [3], [0.9]),
    ]
    metrics = evaluation.score(ds, evaluation.detections_of(predictions, ds))
    assert metrics["AP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Case 8: no training image has an object
# --------------------------------------------------------------------------------------------


def test_case_08_coco_json_whose_annotations_are_all_crowd_or_dropped_is_refused(tmp_path):
    """Crowd, `_background_` and `__ignore__` annotations are no objects. The images are not
    valid image files: the refusal comes from the annotations alone, before any image read."""
    folder = tmp_path / "coco"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"not read")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H0, "width": W0},
            {"id": 2, "file_name": "b.png", "height": H0, "width": W0},
        ],
        "categories": [{"id": 0, "name": "_background_"}, {"id": 1, "name": "cat"},
                       {"id": 2, "name": "__ignore__"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [rect_polygon(CAT)],
             "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [rect_polygon(IGNORE)]},
            {"id": 3, "image_id": 2, "category_id": 0, "segmentation": [rect_polygon(CAT)]},
        ],
    }  # fmt: skip
    json_path = folder / "ann.json"
    json_path.write_text(json.dumps(data))
    before = snapshot(folder)
    with pytest.warns(UserWarning, match="are not classes"):
        with pytest.raises(D.DataError) as excinfo:
            D.build_datasets(json_path, folder, split=([0, 1], []))
    message = str(excinfo.value)
    assert message.startswith(f"{json_path}: training split has no object")
    assert "none of its 2 images" in message
    assert snapshot(folder) == before


def test_case_08_cis680_set_with_zero_labels_is_refused(tmp_path):
    prefix = tmp_path / "empty"
    image = np.zeros((3, 6, 8), dtype=np.uint8)
    none = (np.zeros((0, 6, 8), np.uint8), np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    D.write_cis680(prefix, [(image, *none)] * 3)
    before = snapshot(tmp_path)
    with pytest.raises(D.DataError) as excinfo:
        D.build_datasets(prefix, size=(16, 16))
    message = str(excinfo.value)
    assert message.startswith(f"{prefix}: training split has no object")
    assert "at least one training image with an object" in message
    assert snapshot(tmp_path) == before


def test_case_08_only_the_training_split_must_hold_objects(tmp_path):
    """The object is in image 1: held out, the training split of images 0 and 2 has none and
    is refused; in training, a held-out split without objects is fine, and so is an empty
    training split (every image held out, to evaluate)."""
    prefix = tmp_path / "one"
    image = np.zeros((3, 6, 8), dtype=np.uint8)
    none = (np.zeros((0, 6, 8), np.uint8), np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    mask = np.zeros((1, 6, 8), np.uint8)
    mask[0, 1:3, 2:5] = 1
    one = (mask, np.array([2]), np.array([[2, 1, 5, 3]], np.float32))
    D.write_cis680(prefix, [(image, *none), (image, *one), (image, *none)])
    with pytest.raises(D.DataError, match="training split has no object: none of its 2 images"):
        D.build_datasets(prefix, size=(16, 16), split=[1])
    train, val = D.build_datasets(prefix, size=(16, 16), split=[0, 2])
    assert train.indices == [1] and val.indices == [0, 2]
    train, val = D.build_datasets(prefix, size=(16, 16), split=([], [0, 1, 2]))
    assert len(train) == 0 and len(val) == 3
