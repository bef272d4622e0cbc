"""main_infer.py on a released model zoo file, as downloaded: pictures, results, --eval.

The files are made here in mmdetection's layout with random weights (tests/test_zoo.py's
helpers); what is tested is the path from the file to the pictures and the AP table, and the
matching of the model's 80 COCO classes to the evaluated json's by name."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from test_zoo import filled_state, layout_file, saved, small_config

import evaluation
import main_infer
import zoo
from errors import ModelFileError

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


@pytest.fixture(scope="module")
def released_file(tmp_path_factory):
    """A SOLOv2-light (ResNet-18) file in mmdetection's layout, 80 COCO classes. Its category
    output is constant: every cell scores 0.5 for "person" and 0.38 for "car" and nothing for
    the other classes, so a bounded number of candidates (the cells) passes."""
    state = filled_state(small_config("solov2_light"), classes=len(zoo.COCO_CLASSES))
    state["head.cate_out.weight"] = torch.zeros_like(state["head.cate_out.weight"])
    bias = torch.full_like(state["head.cate_out.bias"], -9.0)
    bias[zoo.COCO_CLASSES.index("person")] = 0.0
    bias[zoo.COCO_CLASSES.index("car")] = -0.5
    state["head.cate_out.bias"] = bias
    folder = tmp_path_factory.mktemp("released")
    return saved(folder, layout_file(state, "mmdet", classes=zoo.COCO_CLASSES))


def test_align_labels_matches_classes_by_name():
    model_names = ("person", "bicycle", "car")
    data_names = ("car", "person")
    result = {
        "labels": torch.tensor([1, 2, 3, 1]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "masks": torch.arange(4, dtype=torch.uint8).view(4, 1, 1),
    }
    [(meta, aligned)] = main_infer.align_labels([({"k": 1}, result)], model_names, data_names)
    assert meta == {"k": 1}
    assert aligned["labels"].tolist() == [2, 1, 2]  # person -> 2, car -> 1, bicycle dropped
    assert aligned["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert aligned["masks"].flatten().tolist() == [0, 2, 3]
    same = main_infer.align_labels([({}, result)], data_names, data_names)
    assert same[0][1] is result
    with pytest.raises(ValueError, match="no name in common"):
        main_infer.align_labels([({}, result)], ("dog",), ("cat",))
    # mmdetection 1.x's "traffic_light" is a json's "traffic light".
    [(_, under)] = main_infer.align_labels(
        [({}, result)], ("traffic_light", "x", "y"), ("Traffic Light",)
    )
    assert under["labels"].tolist() == [1, 1]


def test_a_released_file_runs_on_photos(tmp_path):
    # Its cells score 0.5 for "person" (COCO id 1) and "toothbrush" (label 80, COCO id 90).
    state = filled_state(small_config("solov2_light"), classes=len(zoo.COCO_CLASSES))
    state["head.cate_out.weight"] = torch.zeros_like(state["head.cate_out.weight"])
    bias = torch.full_like(state["head.cate_out.bias"], -9.0)
    bias[zoo.COCO_CLASSES.index("person")] = 0.0
    bias[zoo.COCO_CLASSES.index("toothbrush")] = 0.0
    state["head.cate_out.bias"] = bias
    released = saved(tmp_path, layout_file(state, "mmdet", classes=zoo.COCO_CLASSES))
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size in (("a.jpg", (300, 500)), ("b.png", (240, 200))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(photos / name)
    out = tmp_path / "out"
    main_infer.main(["--checkpoint", str(released), "--images", str(photos), "--out", str(out)])
    assert (out / "0000_a_pred.png").is_file() and (out / "0001_b_pred.png").is_file()
    detections = json.loads((out / "results.json").read_text())
    assert {d["category_id"] for d in detections} == {1, 90}  # COCO's ids, not labels 1..80
    sizes = {d["image_id"]: d["segmentation"]["size"] for d in detections}
    assert sizes == {0: [300, 500], 1: [240, 200]}  # the original sizes
    # images.json names the images and categories: pycocotools reads the two together.
    images = json.loads((out / "images.json").read_text())
    assert [(im["id"], Path(im["file_name"]).name, im["height"], im["width"]) for im in
            images["images"]] == [(0, "a.jpg", 300, 500), (1, "b.png", 240, 200)]  # fmt: skip
    assert len(images["categories"]) == 80 and images["annotations"] == []
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "images.json"))
        results = coco.loadRes(str(out / "results.json"))
    names = {results.cats[a["category_id"]]["name"] for a in results.anns.values()}
    assert names == {"person", "toothbrush"} and len(results.anns) == len(detections)


def test_a_project_model_on_photos_keeps_its_labels_as_ids(tmp_path):
    names = ("vehicle", "person", "animal")
    assert zoo.category_ids(names) == {1: 1, 2: 2, 3: 3}
    meta = {"image_id": 7, "file_name": "x.jpg", "orig_size": (4, 6)}
    images = evaluation.images_json([(meta, {})], names, zoo.category_ids(names))
    assert images["images"] == [{"id": 7, "file_name": "x.jpg", "height": 4, "width": 6}]
    assert images["categories"] == [
        {"id": 1, "name": "vehicle"}, {"id": 2, "name": "person"}, {"id": 3, "name": "animal"}
    ]  # fmt: skip


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"coco128 not found at {COCO128}")
def test_a_released_file_is_evaluated_on_every_image_of_a_json(released_file, tmp_path):
    # A json of 4 coco128 images holding two of COCO's categories: the model's other 78
    # classes are dropped, its "person" and "car" scored as the json's.
    full = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    keep_cats = [c for c in full["categories"] if c["name"] in ("person", "car")]
    ids = {c["id"] for c in keep_cats}
    anns = [a for a in full["annotations"] if a["category_id"] in ids]
    images = [im for im in full["images"] if any(a["image_id"] == im["id"] for a in anns)][:4]
    image_ids = {im["id"] for im in images}
    small = {
        "images": images,
        "annotations": [a for a in anns if a["image_id"] in image_ids],
        "categories": keep_cats,
    }
    ann_file = tmp_path / "two_classes.json"
    ann_file.write_text(json.dumps(small))
    out = tmp_path / "eval"
    metrics = main_infer.main(
        [
            "--checkpoint",
            str(released_file),
            "--eval",
            "--data",
            str(ann_file),
            "--coco-images",
            str(COCO128 / "train2017"),
            "--out",
            str(out),
            "--max-pictures",
            "1",
        ]
    )
    assert 0.0 <= metrics["AP"] <= 1.0  # random weights: a number, not a good one
    detections = json.loads((out / "results.json").read_text())
    assert {d["image_id"] for d in detections} <= image_ids
    assert {d["category_id"] for d in detections} <= ids  # the json's own category ids
    assert len({d["image_id"] for d in detections}) == 4  # every image, no 80/20 split


def test_a_file_that_is_neither_ours_nor_released_says_both(tmp_path):
    path = saved(tmp_path, torch.nn.Linear(2, 2).state_dict(), "model.pt")
    with pytest.raises(ModelFileError) as info:
        main_infer.load_model(path, torch.device("cpu"))
    message = str(info.value)
    assert "not a checkpoint written by main_train.py" in message
    assert "nor is it a released SOLO / SOLOv2 file" in message and "\n" not in message


def test_a_released_file_is_read_once(released_file, monkeypatch):
    reads = []
    load = torch.load

    def counted(*args, **kwargs):
        reads.append(args[0])
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    _, cfg, names = main_infer.load_model(released_file, torch.device("cpu"))
    assert reads == [released_file] and names == zoo.COCO_CLASSES and cfg.preset == "released"
