"""COCO mask AP for SOLO predictions, with pycocotools.

Predictions (dicts as `postprocess.finish_single` returns them) are run-length encoded and
scored with COCOeval against a ground truth that is either a COCO annotation file
(`pycocotools.coco.COCO(path)`) or, for CIS680-format data whose truth is masks, one built in
memory by `build_coco_gt`. COCO's area ranges (small < 32**2, medium < 96**2 pixels) apply to
masks at the original image size, which is why detections and truth are both at that size.

Nothing here is runnable on its own; `main_infer.py` calls it and `tests/test_evaluation.py`
checks it on hand-built masks with known AP.

Shape legend:
    k  detected instances of one image    N  ground-truth instances of one image
    h0 x w0  original image size          C  classes (category ids 1..C by default)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from coco_data import crowd_annotations
from config import Config
from dataset import collate_fn
from samples import SampleDataset, without_augment

# --- config ------------------------------------------------------------------------------

# Names of COCOeval.stats[0:6], in that order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --- encoding ----------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def encode_masks(masks) -> list[dict]:
    """Run-length encode binary masks, COCO style, with json-ready string counts.

    Args:
        masks: (k, h0, w0) uint8/bool {0, 1}, tensor or array.
    Returns:
        k dicts {"size": [h0, w0], "counts": str}.
    """
    masks = _to_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks: masks must be (k, h, w), got shape {masks.shape}.")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (h, w, k) in Fortran order: (k, h, w) -> (h, w, k)
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    rles = mask_util.encode(fortran)
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in rles]


def _bboxes(rles: list[dict]) -> list[list[float]]:
    """[x, y, w, h] of each RLE's tight box (pycocotools' toBbox); [0, 0, 0, 0] when empty."""
    if not rles:
        return []
    return [[float(v) for v in box] for box in mask_util.toBbox(rles)]


def results_to_coco(
    image_ids: Sequence[int],
    results: Sequence[Mapping],
    label_to_category_id: Mapping[int, int] | Callable[[int], int] | None = None,
) -> list[dict]:
    """Detections of several images as COCO result dicts.

    Args:
        image_ids: one COCO image id per result.
        results: dicts with "masks" (k, h0, w0) uint8, "labels" (k,) int, "scores" (k,) float.
        label_to_category_id: maps a label 1..C to a COCO category id (dict or function);
            default: the label itself.
    Returns:
        a list of {"image_id", "category_id", "segmentation" (RLE, str counts), "score",
        "bbox" [x, y, w, h]} dicts, json-ready (plain ints and floats).
    """
    if len(image_ids) != len(results):
        raise ValueError(
            f"results_to_coco: got {len(image_ids)} image ids for {len(results)} results."
        )
    if label_to_category_id is None:
        to_cat = int
    elif callable(label_to_category_id):
        to_cat = label_to_category_id
    else:
        to_cat = label_to_category_id.__getitem__
    detections = []
    for image_id, result in zip(image_ids, results, strict=True):
        rles = encode_masks(result["masks"])
        labels = _to_numpy(result["labels"]).tolist()
        scores = _to_numpy(result["scores"]).tolist()
        if not len(rles) == len(labels) == len(scores):
            raise ValueError(
                f"results_to_coco: image {image_id} has {len(rles)} masks, {len(labels)} labels "
                f"and {len(scores)} scores; they must match."
            )
        for rle, box, label, score in zip(rles, _bboxes(rles), labels, scores, strict=True):
            detections.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(to_cat(int(label))),
                    "segmentation": rle,
                    "score": float(score),
                    "bbox": box,
                }
            )
    return detections


# --- ground truth ------------------------------------------------------------------------


def _quiet_index(coco: COCO) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def build_coco_gt(
    samples: Iterable,
    class_names: Sequence[str],
    ignore_masks: Mapping[int, object] | None = None,
) -> COCO:
    """An in-memory COCO ground truth from masks (for CIS680-format data).

    Args:
        samples: iterable of (image_id, orig_size (h0, w0), masks (N, h0, w0) uint8 at the
            original size, labels (N,) in 1..C); N may be 0.
        class_names: C names; category ids are 1..C in this order.
        ignore_masks: image_id -> (h0, w0) uint8 {0, 1}, the image's ignore region (e.g.
            LabelMe's "__ignore__" shapes): a detection on it is neither a true nor a false
            positive. Default: none.
    Returns:
        a pycocotools COCO with images, categories and iscrowd-0 RLE annotations whose area
        is the mask's pixel count and bbox its tight box; each ignore region is added as
        iscrowd-1 annotations, one per category.
    """
    num_classes = len(class_names)
    ignore_masks = dict(ignore_masks or {})
    images, annotations = [], []
    for image_id, orig_size, masks, labels in samples:
        h0, w0 = (int(v) for v in orig_size)
        masks, labels = _to_numpy(masks), _to_numpy(labels).reshape(-1)
        if masks.shape != (len(labels), h0, w0):
            raise ValueError(
                f"build_coco_gt: image {image_id} has masks of shape {masks.shape}; expected "
                f"({len(labels)}, {h0}, {w0}) from its labels and orig_size."
            )
        if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(
                f"build_coco_gt: image {image_id} has labels {labels.tolist()}; expected "
                f"class ids in 1..{num_classes}."
            )
        images.append({"id": int(image_id), "height": h0, "width": w0, "file_name": str(image_id)})
        rles = encode_masks(masks)
        areas = mask_util.area(rles).tolist() if rles else []
        for rle, box, area, label in zip(rles, _bboxes(rles), areas, labels, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": float(area),
                    "bbox": box,
                    "iscrowd": 0,
                }
            )
        region = ignore_masks.pop(image_id, None)
        if region is None:
            continue
        region = _to_numpy(region)
        if region.shape != (h0, w0):
            raise ValueError(
                f"build_coco_gt: image {image_id} has an ignore mask of shape {region.shape}; "
                f"expected ({h0}, {w0}) from its orig_size."
            )
        if not region.any():
            continue
        (rle,) = encode_masks(region[None])
        annotations += crowd_annotations(
            rle, image_id, range(1, num_classes + 1), len(annotations) + 1
        )
    if ignore_masks:
        raise ValueError(
            f"build_coco_gt: ignore masks of image ids {sorted(ignore_masks)[:5]} that no "
            "sample has."
        )
    coco = COCO()
    coco.dataset = {
        "info": {"description": "SOLO ground truth built from masks"},
        "images": images,
        "categories": [
            {"id": i + 1, "name": str(name), "supercategory": "object"}
            for i, name in enumerate(class_names)
        ],
        "annotations": annotations,
    }
    return _quiet_index(coco)


# --- evaluation --------------------------------------------------------------------------


def _load_detections(coco_gt: COCO, detections: Sequence[Mapping], iou_type: str) -> COCO:
    """COCO results object; works for an empty list (COCO.loadRes fails on one)."""
    if not detections:
        res = COCO()
        res.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": list(coco_gt.dataset["categories"]),
            "annotations": [],
        }
        return _quiet_index(res)
    anns = [dict(d) for d in detections]  # loadRes writes into the dicts it gets
    if iou_type == "segm":
        # With a bbox present loadRes takes the box area as the instance area; the small /
        # medium / large split of mask AP must use the mask area instead.
        for ann in anns:
            ann.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(anns)


def evaluate(
    coco_gt: COCO,
    detections: Sequence[Mapping],
    iou_type: str = "segm",
    img_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO AP of detections against a ground truth, COCOeval's prints swallowed.

    Args:
        coco_gt: ground truth (from `build_coco_gt` or a COCO annotation file).
        detections: result dicts as `results_to_coco` makes them; may be empty.
        iou_type: "segm" (mask AP) or "bbox".
        img_ids: score only these images of the ground truth (a held-out split of a COCO
            json); default all of them.
    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} as floats in [0, 1]; -1 where COCO has no
        ground truth to score (e.g. APl when every object is small).
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"evaluate: iou_type must be 'segm' or 'bbox', got {iou_type!r}.")
    known = set(coco_gt.getImgIds())
    unknown = sorted({int(d["image_id"]) for d in detections} - known)
    if unknown:
        raise ValueError(
            f"evaluate: detections name image ids {unknown[:5]} that are not in the ground truth."
        )
    coco_dt = _load_detections(coco_gt, detections, iou_type)
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    if img_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats[:6], strict=True)}


# --- a model over a data set --------------------------------------------------------------


@torch.no_grad()
def predict_batches(model, loader, device, network=None) -> list[tuple[dict, dict]]:
    """[(meta, result)] for every image of `loader`; result = dict(masks (k,h0,w0) uint8,
    labels (k,) int64, scores (k,) float32) on the CPU. network: see `SOLOModel.predict`."""
    model.eval()
    out = []
    for imgs, _, _, _, metas in loader:
        results = model.predict(imgs.to(device), metas, network=network)
        for meta, result in zip(metas, results, strict=True):
            out.append((meta, {k: v.cpu() for k, v in result.items()}))
    return out


def data_loader(dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of `dataset` in order (`dataset.collate_fn`), for inference."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )


def uses_coco_json(dataset: SampleDataset) -> bool:
    """COCO-format data with its own categories is scored against its json (crowd regions
    included, as COCO does); everything else against truth built from the masks."""
    return dataset.json_ground_truth() is not None


def ground_truth_of(dataset: SampleDataset) -> COCO:
    """A pycocotools COCO ground truth for `dataset`, built from its masks at original size
    (CIS680 data, LabelMe folders, and COCO data mapped onto the CIS680 classes), with the
    data set's ignore regions (`ignore_mask`, e.g. LabelMe's "__ignore__" shapes) where it has
    them: a detection there is neither a true nor a false positive."""
    image_ids = dataset.image_ids

    def samples():
        for i, image_id in enumerate(image_ids):
            image, masks, labels, _ = dataset.raw(i)
            yield image_id, tuple(image.shape[-2:]), np.asarray(masks), np.asarray(labels)

    ignore = {}
    for i, image_id in enumerate(image_ids):
        region = dataset.ignore_mask(i)
        if region is not None:
            ignore[image_id] = region
    return build_coco_gt(samples(), dataset.class_names, ignore_masks=ignore)


def score(dataset: SampleDataset, detections: list[dict]) -> dict:
    """COCO mask AP of `detections` (from `detections_of`) on `dataset`."""
    truth = dataset.json_ground_truth()
    if truth is None:
        truth = ground_truth_of(dataset)
    return evaluate(truth, detections, img_ids=dataset.image_ids)


def evaluate_model(
    model, dataset: SampleDataset, cfg: Config, device, batch_size: int | None = None
) -> dict:
    """COCO mask AP/AP50/AP75/APs/APm/APl of `model` on `dataset` (no augmentation)."""
    if dataset.augment is not None:
        dataset = without_augment(dataset)
    loader = data_loader(dataset, batch_size or cfg.batch_size)
    predictions = predict_batches(model, loader, device)
    return score(dataset, detections_of(predictions, dataset))


def detections_of(
    predictions, dataset: SampleDataset | None = None, label_to_category_id=None
) -> list[dict]:
    """COCO results dicts; category ids are `label_to_category_id`'s when given, else the
    json's for COCO-format data, else the labels."""
    mapping = label_to_category_id
    if mapping is None and dataset is not None and uses_coco_json(dataset):
        mapping = dataset.label_to_cat_id
    return results_to_coco(
        [meta["image_id"] for meta, _ in predictions], [r for _, r in predictions], mapping
    )


def format_table(metrics: Mapping[str, float]) -> str:
    """A small aligned two-column table; values < 0 (nothing to score) print as "n/a"."""
    width = max([len("metric"), *(len(str(k)) for k in metrics)])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in metrics.items():
        text = "n/a" if value < 0 else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {text:>6}")
    return "\n".join(lines)


def write_results_json(path: str | os.PathLike, detections: Sequence[Mapping]) -> Path:
    """Write detections as a COCO results json, atomically (`write_json`)."""
    return write_json(path, list(detections))


def images_json(predictions, class_names: Sequence[str], label_to_category_id) -> dict:
    """A COCO annotation file without annotations for images that have none (main_infer.py
    --images): "images" (id = meta["image_id"], file_name, height, width at the original size)
    and "categories" ({"id": label_to_category_id[k], "name": class_names[k - 1]}), so that
    `COCO(images.json).loadRes(results.json)` reads the detections with their names."""
    images = []
    for meta, _ in predictions:
        h0, w0 = (int(v) for v in meta["orig_size"])
        images.append(
            {"id": int(meta["image_id"]), "file_name": str(meta["file_name"]), "height": h0,
             "width": w0}
        )  # fmt: skip
    categories = [
        {"id": int(label_to_category_id[k]), "name": str(name)}
        for k, name in enumerate(class_names, start=1)
    ]
    return {"images": images, "annotations": [], "categories": categories}


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as json, atomically (temporary file, then rename); numpy and torch values
    are stored as numbers and lists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _to_numpy(obj).tolist()
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    raise TypeError(f"write_json: cannot store a {type(obj).__name__} in json.")
