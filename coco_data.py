"""The COCO-format reader: a json + an image folder -> the sample contract (`samples.py`).

COCO itself, LabelMe's COCO export (labelme2coco) and most labelling tools write this format:
`CocoDataset(json_path, image_dir)` checks the json at construction (fields, references,
segmentations, boxes, that every image file exists) and decodes an image's annotations when
the item is read. Besides the reader: the COCO segmentation decoder that the LabelMe reader
shares (`decode_segmentation`), the ground truth evaluation scores a json against
(`CocoDataset.coco`) and ignore regions as COCO crowd annotations (`crowd_annotations`).
`dataset.build_datasets` picks this reader for a path ending in .json; run
`python dataset.py --coco-json ann.json --coco-images imgs/` for pictures of its samples.

Shape legend: N instances of one image, C classes without background, h0 x w0 source.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cis680_files import CIS680_CLASSES
from conventions import masks_to_boxes
from errors import data_error as _fail
from samples import (
    BOX_TOLERANCE,
    IGNORE_LABEL,
    MAX_COORDINATE,
    PhotoDataset,
    image_to_rgb8,
    is_file,
    is_int,
    is_number,
)

# --------------------------------------------------------------------------------------------
# Config: COCO's categories
# --------------------------------------------------------------------------------------------

_VEHICLES = ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")
_ANIMALS = tuple("bird cat dog horse sheep cow elephant bear zebra giraffe".split())
# COCO category name -> CIS680 class id (1 vehicle, 2 person, 3 animal); others are dropped.
COCO_TO_CIS680: dict[str, int] = {
    **{name: 1 for name in _VEHICLES},
    "person": 2,
    **{name: 3 for name in _ANIMALS},
}
# COCO categories that are no class: labelme2coco writes "_background_" (id 0) and the
# ignore label as categories. "_background_" annotations are dropped, "__ignore__" ones
# become ignore regions.
NOT_CLASSES = ("_background_", IGNORE_LABEL)


# --------------------------------------------------------------------------------------------
# Pure functions: segmentations, annotation checks, the ground truth
# --------------------------------------------------------------------------------------------


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 (height, width).

    Polygons with fewer than 3 points are ignored (no area; pycocotools would read a 4-number
    list as a box).
    """
    rle = _segmentation_rle(segm, height, width)
    if rle is None:
        return np.zeros((height, width), dtype=np.uint8)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _segmentation_rle(segm: Any, height: int, width: int) -> dict | None:
    """COCO segmentation -> one compressed RLE (None: only polygons of < 3 points)."""
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm  # compressed RLE


def _rle_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString in Python),
    or None when the string is not one. Checked before pycocotools sees it: its decoder
    writes as many pixels as the runs add up to, whatever the mask's size."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                return None  # the last run is cut off
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _check_annotation(ann: dict, image: dict, json_path: Path) -> None:
    """Metadata check of one COCO annotation at construction (no decoding): polygons of
    finite numbers within MAX_COORDINATE, RLE whose runs cover exactly the image, a finite
    bbox inside the image."""
    where = f"annotation {ann.get('id')} (image {ann.get('image_id')})"
    h, w = image["height"], image["width"]
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        ok = all(
            isinstance(p, list)
            and len(p) % 2 == 0
            and all(is_number(v) and abs(v) <= MAX_COORDINATE for v in p)
            for p in segm
        )
        if not ok:
            raise _fail(
                json_path,
                f"{where} segmentation",
                "is malformed",
                f"polygons [x y x y ...] of numbers within +-{MAX_COORDINATE}",
            )
    elif isinstance(segm, dict):
        counts = segm.get("counts")
        if not isinstance(counts, (list, str)) or "size" not in segm:
            raise _fail(json_path, f"{where} segmentation", "is malformed", "RLE {counts, size}")
        if segm["size"] != [h, w]:
            raise _fail(
                json_path, f"{where} segmentation size", f"is {segm['size']}", f"[{h}, {w}]"
            )
        if isinstance(counts, str):
            runs = _rle_string_counts(counts)
        else:
            ints = all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
            runs = counts if ints else None
        if runs is None or any(r < 0 for r in runs) or sum(runs) != h * w:
            raise _fail(
                json_path,
                f"{where} segmentation counts",
                "are not run lengths of the image",
                f"non-negative runs adding up to {h} x {w} = {h * w} pixels",
            )
    else:
        raise _fail(json_path, f"{where} segmentation", f"is {type(segm).__name__}", "polygons/RLE")
    bbox = ann.get("bbox")
    if bbox is not None:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise _fail(json_path, f"{where} bbox", f"is {bbox}", "[x, y, width, height]")
        x, y, bw, bh = bbox
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + bw > w + t or y + bh > h + t:
            raise _fail(
                json_path,
                f"{where} bbox",
                f"{bbox} leaves the {w} x {h} image",
                "a box inside the image",
            )


def _decode_annotation(ann: dict, height: int, width: int, json_path: Path) -> np.ndarray:
    """The mask of a checked COCO annotation, uint8 (height, width); DataError when
    pycocotools cannot decode it."""
    try:
        return decode_segmentation(ann["segmentation"], height, width)
    except Exception as exc:  # pycocotools raises assorted types on bad input
        raise _fail(
            json_path,
            f"annotation {ann['id']} segmentation",
            f"could not be decoded ({exc})",
            "valid polygons or RLE",
        ) from exc


def crowd_annotations(
    rle: dict, image_id: int, category_ids: Iterable[int], first_id: int
) -> list[dict]:
    """An ignore region (RLE with str counts) as COCO `iscrowd: 1` annotations, one per
    category, ids from `first_id`. COCOeval matches a crowd region only with detections of its
    own category, so one copy per category makes the region class-agnostic: a detection of any
    class on it (crowd IoU = intersection / detection area) is neither a true nor a false
    positive, and a crowd region is never a missed object. Used for the COCO json's ignore
    annotations here and for `evaluation.build_coco_gt`'s ignore masks."""
    area = float(mask_utils.area(rle))
    box = [float(v) for v in mask_utils.toBbox(rle)]
    return [
        {
            "id": first_id + k,
            "image_id": int(image_id),
            "category_id": int(category_id),
            "segmentation": rle,
            "area": area,
            "bbox": box,
            "iscrowd": 1,
        }
        for k, category_id in enumerate(category_ids)
    ]


def _coco_ground_truth(
    data: dict, cats: list[dict], checked: set, ignore: dict[int, list[dict]]
) -> COCO:
    """The ground truth COCOeval scores a checked json against: the categories `cats` (the
    json's less NOT_CLASSES) with their annotations, and every ignore annotation (image id ->
    list) as an iscrowd region of each category.

    COCOeval matches a crowd region only with detections of the region's own category; one
    copy per category makes an ignore region class-agnostic, so a detection of any class on
    it is neither a true nor a false positive. Annotations of the categories in `checked`
    (those `_check_annotation` passed) get their mask's area where the json has none (COCOeval
    needs it), and ids become 1..n where the json's are not unique and positive (COCOeval
    reads a match with id 0 as no match; labelme2coco numbers from 0).
    """
    images = {image["id"]: image for image in data["images"]}
    cat_ids = {c["id"] for c in cats}
    anns = [dict(a) for a in data["annotations"] if a["category_id"] in cat_ids]
    ids = [a["id"] for a in anns]
    if min(ids, default=1) < 1 or len(set(ids)) != len(ids):
        for k, ann in enumerate(anns):
            ann["id"] = k + 1
    for ann in anns:
        if ann["category_id"] in checked and not is_number(ann.get("area")):
            image = images[ann["image_id"]]
            rle = _segmentation_rle(ann["segmentation"], image["height"], image["width"])
            ann["area"] = float(mask_utils.area(rle)) if rle is not None else 0.0
    next_id = max((a["id"] for a in anns), default=0) + 1
    for image_id, regions in ignore.items():
        image = images[image_id]
        for region in regions:
            rle = _segmentation_rle(region["segmentation"], image["height"], image["width"])
            if rle is None:
                continue
            counts = rle["counts"]
            rle = {
                "size": [int(v) for v in rle["size"]],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
            }
            crowd = crowd_annotations(rle, image_id, [c["id"] for c in cats], next_id)
            anns += crowd
            next_id += len(crowd)
    coco = COCO()
    coco.dataset = {**data, "categories": list(cats), "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------
# Modules: the data set
# --------------------------------------------------------------------------------------------


class CocoDataset(PhotoDataset):
    """COCO-format json + image folder in the sample contract (`samples.SampleDataset`).

    short_side / max_side: aspect-kept resize (short side to short_side unless the long side
    would pass max_side); pad_to: zero padding to multiples of it. indices: positions in
    `all_image_ids` (the json's image order, after drop_empty). cis680_classes: map categories
    onto CIS680_CLASSES with COCO_TO_CIS680 (instances of other categories are dropped);
    otherwise category ids map to 1..C in increasing id order, names kept in `.class_names`
    and `.label_to_cat_id`. Categories named in NOT_CLASSES are no class (one warning says
    so): annotations of "_background_" (labelme2coco's id 0) are dropped, those of
    "__ignore__" are ignore regions (`ignore_mask`). Crowd annotations never enter the targets;
    images without (kept) annotations stay as negatives unless drop_empty. An annotation whose
    mask decodes to nothing is dropped with a warning. `.coco` is the pycocotools ground truth
    of the json (`_coco_ground_truth`: no NOT_CLASSES category, ignore regions as crowd
    regions of every category), which evaluation scores against unless cis680_classes
    (`json_ground_truth`); `.image_ids` are the COCO ids of this data set's items, in order.
    Validated at construction: the json, its references, annotation fields and boxes, and that
    every image file exists (DataError naming the file otherwise).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_dir: str | Path,
        short_side: int = 800,
        max_side: int = 1333,
        pad_to: int | None = 32,
        indices: Sequence[int] | None = None,
        augment: Callable | None = None,
        cis680_classes: bool = False,
        drop_empty: bool = False,
    ):
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        self.short_side, self.max_side, self.pad_to = short_side, max_side, pad_to
        self.augment = augment
        self.cis680_classes = cis680_classes
        data = self._read_json()

        cats = sorted(data["categories"], key=lambda c: c["id"])
        special = [c for c in cats if c["name"] in NOT_CLASSES]
        if special:
            names = ", ".join(f"{c['name']!r} (id {c['id']})" for c in special)
            warnings.warn(
                f"{self.json_path}: categories {names} are not classes and are left out; "
                "annotations of '_background_' are dropped and those "
                f"of {IGNORE_LABEL!r} are ignore regions (neither true nor false positives, as "
                "crowd regions).",
                stacklevel=2,
            )
        ignore_cat_ids = {c["id"] for c in special if c["name"] == IGNORE_LABEL}
        cats = [c for c in cats if c["name"] not in NOT_CLASSES]
        if cis680_classes:
            self.class_names = CIS680_CLASSES
            self.cat_to_label = {
                c["id"]: COCO_TO_CIS680[c["name"]] for c in cats if c["name"] in COCO_TO_CIS680
            }
            self.label_to_cat_id: dict[int, int] = {}
        else:
            self.class_names = tuple(c["name"] for c in cats)
            self.cat_to_label = {c["id"]: k + 1 for k, c in enumerate(cats)}
            self.label_to_cat_id = {k + 1: c["id"] for k, c in enumerate(cats)}

        images = {image["id"]: image for image in data["images"]}
        self._anns: dict[int, list[dict]] = {k: [] for k in images}  # training targets
        self._ignore: dict[int, list[dict]] = {k: [] for k in images}  # ignore regions
        for ann in data["annotations"]:
            category = ann["category_id"]
            if category in ignore_cat_ids:
                _check_annotation(ann, images[ann["image_id"]], self.json_path)
                self._ignore[ann["image_id"]].append(ann)
            elif category in self.cat_to_label:
                _check_annotation(ann, images[ann["image_id"]], self.json_path)
                if not ann.get("iscrowd", 0):
                    self._anns[ann["image_id"]].append(ann)
        self.coco = _coco_ground_truth(data, cats, set(self.cat_to_label), self._ignore)
        self.all_image_ids = [
            im["id"] for im in data["images"] if self._anns[im["id"]] or not drop_empty
        ]
        self._set_indices(indices, len(self.all_image_ids), self.json_path)
        self._warned: set = set()

    def _read_json(self) -> dict:
        path = self.json_path
        if not path.is_file():
            raise _fail(path, "annotation file", "was not found", "a COCO-format json file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _fail(path, "file", f"could not be read as json ({exc})", "COCO json") from exc
        if not isinstance(data, dict):
            raise _fail(path, "top level", f"is a {type(data).__name__}", "a json object")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise _fail(path, f"field '{key}'", "is missing or not a list", "a list")
        data.setdefault("annotations", [])
        if not isinstance(data["annotations"], list):
            raise _fail(path, "field 'annotations'", "is not a list", "a list")
        images = {}
        for k, image in enumerate(data["images"]):
            if not isinstance(image, dict):
                raise _fail(path, f"images[{k}]", f"is a {type(image).__name__}", "a json object")
            missing = [f for f in ("id", "file_name", "height", "width") if f not in image]
            if missing:
                raise _fail(
                    path, f"images[{k}]", f"lacks {missing}", "id, file_name, height, width"
                )
            if not is_int(image["id"]) or image["id"] in images:
                raise _fail(path, f"images[{k}] id", f"is {image['id']!r}", "a unique integer")
            for field in ("height", "width"):
                if not is_int(image[field]) or image[field] < 1:
                    raise _fail(
                        path, f"images[{k}] {field}", f"is {image[field]!r}", "a positive integer"
                    )
            file_name = image["file_name"]
            if not isinstance(file_name, str) or not is_file(self.image_dir / file_name):
                raise _fail(
                    self.image_dir / str(file_name),
                    f"image file (images[{k}] of {path})",
                    "was not found",
                    f"an image file in {self.image_dir}",
                )
            images[image["id"]] = image
        cat_ids = set()
        for k, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise _fail(path, f"categories[{k}]", "lacks id or name", "{id, name}")
            if not is_int(cat["id"]) or cat["id"] in cat_ids:
                raise _fail(path, f"categories[{k}] id", f"is {cat['id']!r}", "a unique integer")
            if not isinstance(cat["name"], str):
                raise _fail(path, f"categories[{k}] name", f"is {cat['name']!r}", "a string")
            cat_ids.add(cat["id"])
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise _fail(path, f"annotations[{k}]", f"is a {type(ann).__name__}", "an object")
            for field, known, expected in (
                ("image_id", images, "the id of an entry of 'images'"),
                ("category_id", cat_ids, "the id of an entry of 'categories'"),
            ):
                if not is_int(ann.get(field)) or ann[field] not in known:
                    where = f"annotations[{k}] {field}"
                    raise _fail(path, where, f"is {ann.get(field)!r}", expected)
            if ann.get("iscrowd", 0) not in (0, 1):  # False and True are 0 and 1
                raise _fail(path, f"annotations[{k}] iscrowd", f"is {ann['iscrowd']!r}", "0 or 1")
            if not is_int(ann.setdefault("id", k + 1)):
                raise _fail(path, f"annotations[{k}] id", f"is {ann['id']!r}", "an integer")
        return data

    def image_id(self, i: int) -> int:
        """meta["image_id"] of item i: the json's id of its image."""
        return self.all_image_ids[self.indices[i]]

    def num_instances(self, i: int) -> int:
        """Number of annotations of item i kept for training (before decoding)."""
        return len(self._anns[self.image_id(i)])

    def file_name(self, i: int) -> str:
        return str(self.image_dir / self.coco.imgs[self.image_id(i)]["file_name"])

    def json_ground_truth(self) -> COCO | None:
        """`.coco`, unless the categories are mapped onto the CIS680 classes: the truth is then
        built from the masks, in those classes."""
        return None if self.cis680_classes else self.coco

    def _read_image(self, info: dict) -> np.ndarray:
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                if im.size != (info["width"], info["height"]):
                    raise _fail(
                        path,
                        "image size",
                        f"is {im.size[0]} x {im.size[1]}",
                        f"{info['width']} x {info['height']} as {self.json_path} says",
                    )
                return image_to_rgb8(im, path)  # 16-bit, grayscale, palette, RGBA -> RGB
        except OSError as exc:
            raise _fail(path, "image", f"could not be read ({exc})", "an image file") from exc

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Item i at its original size: image uint8 (3, h0, w0), masks uint8 (N, h0, w0),
        labels int64 (N,), boxes float32 (N, 4) x1 y1 x2 y2 (json bbox, or the mask's box
        when the json has none)."""
        image_id = self.image_id(i)
        info = self.coco.imgs[image_id]
        image = self._read_image(info)
        h0, w0 = image.shape[1:]
        masks, labels, boxes = [], [], []
        for ann in self._anns[image_id]:
            mask = _decode_annotation(ann, h0, w0, self.json_path)
            if not mask.any():
                self._warn_once(
                    ann["id"],
                    f"{self.json_path}: annotation {ann['id']} of image {image_id} has an "
                    "empty mask; it is left out of the targets.",
                )
                continue
            bbox = ann.get("bbox")
            box = np.zeros(4, dtype=np.float32)
            if bbox is not None:
                x, y, bw, bh = bbox
                box = np.array([x, y, x + bw, y + bh], dtype=np.float32)
                box[0::2] = box[0::2].clip(0, w0)
                box[1::2] = box[1::2].clip(0, h0)
            if not (box[2] > box[0] and box[3] > box[1]):  # no bbox, or none left inside
                box = masks_to_boxes(mask[None])[0]
            masks.append(mask)
            labels.append(self.cat_to_label[ann["category_id"]])
            boxes.append(box)
        if masks:
            return image, np.stack(masks), np.array(labels, np.int64), np.stack(boxes)
        empty = np.zeros((0, h0, w0), dtype=np.uint8)
        return image, empty, np.zeros((0,), np.int64), np.zeros((0, 4), np.float32)

    def ignore_mask(self, i: int) -> np.ndarray | None:
        """The union of item i's ignore regions (annotations of an IGNORE_LABEL category) at
        the original size, uint8 (h0, w0) {0, 1}; None when it has none. They are never a
        training target; evaluation scores them as crowd regions (`evaluation.build_coco_gt`,
        and `.coco`)."""
        image_id = self.image_id(i)
        if not self._ignore[image_id]:
            return None
        info = self.coco.imgs[image_id]
        h0, w0 = info["height"], info["width"]  # checked against the image file when read
        region = np.zeros((h0, w0), dtype=np.uint8)
        for ann in self._ignore[image_id]:
            region |= _decode_annotation(ann, h0, w0, self.json_path)
        return region if region.any() else None
