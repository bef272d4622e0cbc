"""Known-answer tests for evaluation.py (RLE encoding, COCO ground truth, mask AP).

Run: /work/venv/bin/python -m pytest -q tests/test_evaluation.py
Shapes: masks (N, h0, w0) uint8 at the original image size (here 32 x 48).
"""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from evaluation import (
    build_coco_gt,
    encode_masks,
    evaluate,
    format_table,
    results_to_coco,
    write_results_json,
)

H0, W0 = 32, 48
CLASS_NAMES = ("vehicle", "person", "animal")


def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(H0, W0) uint8 mask with ones on rows y0:y1, columns x0:x1."""
    m = np.zeros((H0, W0), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def stack(*masks) -> np.ndarray:
    """(N, H0, W0) uint8; (0, H0, W0) when called with nothing."""
    return np.stack(masks) if masks else np.zeros((0, H0, W0), dtype=np.uint8)


def ground_truth_samples():
    """Three images with several classes, and one image with no instances."""
    return [
        (1, (H0, W0), stack(box_mask(2, 12, 2, 14), box_mask(15, 30, 20, 40)), np.array([1, 2])),
        (2, (H0, W0), stack(box_mask(0, 20, 0, 20)), np.array([3])),
        (3, (H0, W0), stack(), np.zeros(0, dtype=np.int64)),
        (
            4,
            (H0, W0),
            stack(box_mask(4, 10, 30, 44), box_mask(12, 28, 3, 18), box_mask(20, 31, 25, 47)),
            np.array([1, 1, 2]),
        ),
    ]


def perfect_results(samples):
    """finish_single-style dicts that reproduce the ground truth exactly, score 1."""
    ids, results = [], []
    for image_id, _, masks, labels in samples:
        ids.append(image_id)
        results.append(
            {
                "masks": torch.from_numpy(masks),
                "labels": torch.from_numpy(labels).long(),
                "scores": torch.ones(len(labels)),
            }
        )
    return ids, results


def test_encode_masks_json_round_trip():
    masks = stack(box_mask(3, 8, 10, 20), box_mask(0, 32, 47, 48), np.zeros((H0, W0), np.uint8))
    rles = encode_masks(torch.from_numpy(masks))
    assert len(rles) == 3 and all(isinstance(r["counts"], str) for r in rles)
    loaded = json.loads(json.dumps(rles))
    decoded = mask_util.decode(loaded)  # (h0, w0, k)
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks)
    assert encode_masks(stack()) == []


def test_bbox_from_to_bbox():
    masks = stack(box_mask(3, 8, 10, 20), np.zeros((H0, W0), np.uint8))
    result = {"masks": masks, "labels": np.array([2, 1]), "scores": np.array([0.7, 0.1])}
    dets = results_to_coco([5], [result], label_to_category_id={1: 11, 2: 12})
    assert dets[0]["bbox"] == [10.0, 3.0, 10.0, 5.0]  # x, y, w, h
    assert dets[1]["bbox"] == [0.0, 0.0, 0.0, 0.0]
    assert [d["category_id"] for d in dets] == [12, 11]
    assert dets[0]["image_id"] == 5 and dets[0]["score"] == pytest.approx(0.7)
    json.dumps(dets)  # plain python types only


def test_build_coco_gt():
    coco = build_coco_gt(ground_truth_samples(), CLASS_NAMES)
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert [a["area"] for a in anns] == [120.0, 300.0]
    assert anns[0]["bbox"] == [2.0, 2.0, 12.0, 10.0] and anns[0]["iscrowd"] == 0
    assert coco.getAnnIds(imgIds=[3]) == []
    with pytest.raises(ValueError, match="class ids in 1..3"):
        build_coco_gt([(1, (H0, W0), stack(box_mask(0, 2, 0, 2)), np.array([4]))], CLASS_NAMES)


def test_ground_truth_against_itself_is_perfect():
    samples = ground_truth_samples()
    coco = build_coco_gt(samples, CLASS_NAMES)
    metrics = evaluate(coco, results_to_coco(*perfect_results(samples)))
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)
    # every object here is below 32**2 pixels: small AP is 1, medium / large have no truth
    assert metrics["APs"] == pytest.approx(1.0) and metrics["APl"] == -1.0
    table = format_table(metrics)
    assert "AP50" in table and "1.0000" in table and "n/a" in table


def test_half_the_instances_found_gives_half_ap():
    # one class, four instances; two found exactly: precision 1 up to recall 0.5, so AP is
    # 51 of COCO's 101 recall points = 0.505
    samples = [
        (1, (H0, W0), stack(box_mask(2, 12, 2, 14), box_mask(15, 30, 20, 40)), np.array([1, 1])),
        (2, (H0, W0), stack(box_mask(0, 20, 0, 20), box_mask(22, 30, 25, 45)), np.array([1, 1])),
    ]
    coco = build_coco_gt(samples, CLASS_NAMES)
    results = [
        {"masks": samples[0][2][:1], "labels": np.array([1]), "scores": np.array([0.9])},
        {"masks": samples[1][2][:1], "labels": np.array([1]), "scores": np.array([0.8])},
    ]
    metrics = evaluate(coco, results_to_coco([1, 2], results))
    assert metrics["AP"] == pytest.approx(0.5, abs=0.02)
    assert metrics["AP"] == pytest.approx(51 / 101, abs=1e-6)


def test_wrong_class_gives_zero():
    samples = ground_truth_samples()
    ids, results = perfect_results(samples)
    for r in results:
        r["labels"] = r["labels"] % 3 + 1  # every label shifted to another class
    metrics = evaluate(build_coco_gt(samples, CLASS_NAMES), results_to_coco(ids, results))
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0


def test_empty_detections_give_zero():
    samples = ground_truth_samples()
    coco = build_coco_gt(samples, CLASS_NAMES)
    metrics = evaluate(coco, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AP75"] == 0.0
    # results with no instances at all take the same path
    empty = {"masks": stack(), "labels": np.zeros(0), "scores": np.zeros(0)}
    assert results_to_coco([1, 2], [empty, empty]) == []
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate(coco, [{"image_id": 99, "category_id": 1, "score": 1.0, "segmentation": {}}])


def test_segm_area_is_mask_area_not_box_area():
    # an L-shaped mask of 325 pixels whose box is 30x40 = 1200 > 32**2: it is a small object
    mask = np.zeros((H0 + 8, W0), np.uint8)
    mask[0:30, 0:5] = 1
    mask[25:30, 5:40] = 1
    coco = build_coco_gt([(1, mask.shape, mask[None], np.array([1]))], CLASS_NAMES)
    result = {"masks": mask[None], "labels": np.array([1]), "scores": np.array([0.5])}
    metrics = evaluate(coco, results_to_coco([1], [result]))
    assert metrics["APs"] == pytest.approx(1.0) and metrics["APm"] == -1.0


def test_write_results_json(tmp_path):
    samples = ground_truth_samples()
    dets = results_to_coco(*perfect_results(samples))
    path = write_results_json(tmp_path / "sub" / "results.json", dets)
    assert json.loads(path.read_text()) == dets
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left
    metrics = evaluate(build_coco_gt(samples, CLASS_NAMES), json.loads(path.read_text()))
    assert metrics["AP"] == pytest.approx(1.0)
