"""The LabelMe reader: a folder of LabelMe json files -> the sample contract (`samples.py`).

One json per image, as LabelMe saves them: polygon, rectangle and circle shapes (all turned
into polygons, rasterised as COCO polygons are: `coco_data.decode_segmentation`), the image
at `imagePath` relative to the json or embedded as `imageData`. `read_labelme` checks one
file; `LabelMeDataset(folder)` reads them all, label names becoming classes 1..C in sorted
order. `dataset.build_datasets` picks this reader for a folder; run
`python dataset.py --data my_photos/` for pictures of its samples.

Shape legend: N instances of one image, C classes without background, h0 x w0 source.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from coco_data import decode_segmentation
from conventions import masks_to_boxes
from errors import data_error as _fail
from samples import IGNORE_LABEL, MAX_COORDINATE, PhotoDataset, image_to_rgb8, is_file, is_int

# --------------------------------------------------------------------------------------------
# Config: LabelMe's shapes
# --------------------------------------------------------------------------------------------

# LabelMe shapes with an area, and the points each takes (LabelMe's own meaning of them)
LABELME_SHAPE_POINTS = {
    "polygon": "at least 3 points",
    "rectangle": "2 points (two opposite corners)",
    "circle": "2 points (the centre and a point on the circle)",
}


# --------------------------------------------------------------------------------------------
# Pure functions: one LabelMe json
# --------------------------------------------------------------------------------------------


def circle_polygon(centre: Sequence[float], rim: Sequence[float]) -> list[float]:
    """A LabelMe circle (centre, a point on the circle) as a polygon [x y x y ...].

    The vertices lie on the circle about one pixel apart (at least 16), so the inscribed
    polygon's area is pi r^2 (1 - 1 / (6 r^2)) and the polygon rasteriser of the COCO path
    serves circles too.
    """
    cx, cy = float(centre[0]), float(centre[1])
    r = math.hypot(float(rim[0]) - cx, float(rim[1]) - cy)
    n = max(16, math.ceil(2 * math.pi * r))
    t = np.arange(n) * (2 * math.pi / n)
    xy = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)  # (n, 2)
    return xy.ravel().tolist()  # (n, 2) -> [x0, y0, x1, y1, ...]


@dataclass(frozen=True)
class LabelMeFile:
    """One checked LabelMe json: where its image is and its instances as polygons."""

    json_path: Path
    image_path: Path | None  # None: the image is the json's embedded imageData
    size: tuple[int, int] | None  # (imageHeight, imageWidth) as the json states them, if it does
    instances: tuple[tuple[str, tuple[tuple[float, ...], ...]], ...]  # (label, polygons), each
    #                                        polygon (x0, y0, x1, y1, ...); a group is their union
    ignore: tuple[tuple[tuple[float, ...], ...], ...] = ()  # IGNORE_LABEL groups, as polygons


def _labelme_shape(shape: Any, k: int, path: Path) -> tuple[str, int | None, list[float]]:
    """Check shapes[k] of a LabelMe json -> (label, group_id, polygon [x y x y ...])."""
    if not isinstance(shape, dict):
        raise _fail(path, f"shapes[{k}]", f"is a {type(shape).__name__}", "a json object")
    label = shape.get("label")
    if not isinstance(label, str) or not label:
        raise _fail(path, f"shapes[{k}] label", f"is {label!r}", "a non-empty string")
    where = f"shapes[{k}] (label {label!r})"
    shape_type = shape.get("shape_type") or "polygon"  # LabelMe before 3.0 wrote polygons only
    if not isinstance(shape_type, str) or shape_type not in LABELME_SHAPE_POINTS:
        raise _fail(
            path, f"{where} shape_type", f"is {shape_type!r}", "polygon, rectangle or circle"
        )
    points = shape.get("points")
    try:
        xy = np.asarray(points if points != [] else np.zeros((0, 2)), dtype=np.float64)
    except (TypeError, ValueError):
        xy = np.zeros(0)  # not numbers, or ragged
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise _fail(path, f"{where} points", f"are {points!r}", "a list of [x, y] number pairs")
    if np.abs(xy).max(initial=0) > MAX_COORDINATE:
        raise _fail(
            path, f"{where} points", f"are {points!r}", f"coordinates within +-{MAX_COORDINATE}"
        )
    n = len(xy)
    if (n < 3) if shape_type == "polygon" else (n != 2):
        expected = LABELME_SHAPE_POINTS[shape_type]
        raise _fail(path, f"{where} {shape_type}", f"has {n} point(s)", expected)
    group_id = shape.get("group_id")
    if group_id is not None and not is_int(group_id):
        raise _fail(path, f"{where} group_id", f"is {group_id!r}", "an integer or null")
    if shape_type == "rectangle":
        (xa, ya), (xb, yb) = xy.tolist()
        polygon = [xa, ya, xb, ya, xb, yb, xa, yb]
    elif shape_type == "circle":
        polygon = circle_polygon(xy[0], xy[1])
    else:
        polygon = xy.ravel().tolist()  # (n, 2) -> [x0, y0, x1, y1, ...]
    return label, group_id, polygon


def _labelme_image_path(path: Path, data: dict) -> Path | None:
    """The image file of a LabelMe json, or None when only its imageData holds the image."""
    image_path = data.get("imagePath")
    has_data = isinstance(data.get("imageData"), str) and bool(data["imageData"])
    if isinstance(image_path, str) and image_path:
        # LabelMe on Windows writes relative paths with backslashes
        for candidate in dict.fromkeys((image_path, image_path.replace("\\", "/"))):
            if is_file(path.parent / candidate):
                return path.parent / candidate
    if has_data:
        return None
    looked = f" ({path.parent / image_path})" if isinstance(image_path, str) and image_path else ""
    raise _fail(
        path,
        "imagePath",
        f"{image_path!r}{looked} was not found and imageData is empty",
        "an image file at imagePath, relative to the json, or the image embedded as imageData",
    )


def read_labelme(json_path: str | Path) -> LabelMeFile:
    """Read and check one LabelMe json (any problem: a DataError naming it).

    Shapes: polygon (>= 3 points), rectangle (2 opposite corners) and circle (centre, a point
    on the circle), all turned into polygons; other shape types have no area and are an error.
    Shapes with the same (label, group_id) form one instance, the union of their areas; a shape
    without group_id is an instance of its own. Instances keep the order of their first shape.
    Shapes labelled IGNORE_LABEL are no instance: they are grouped alike into `.ignore`.
    """
    path = Path(json_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, "file", f"could not be read as json ({exc})", "a LabelMe json") from exc
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise _fail(
            path, "field 'shapes'", "is missing or not a list", "a LabelMe annotation (shapes)"
        )
    groups: dict[tuple, tuple[str, list[tuple[float, ...]]]] = {}
    for k, shape in enumerate(data["shapes"]):
        label, group_id, polygon = _labelme_shape(shape, k, path)
        key = (label, group_id) if group_id is not None else (None, k)  # labels are never None
        groups.setdefault(key, (label, []))[1].append(tuple(polygon))
    ignore = tuple(tuple(polygons) for label, polygons in groups.values() if label == IGNORE_LABEL)
    h, w = data.get("imageHeight"), data.get("imageWidth")
    size = (h, w) if isinstance(h, int) and isinstance(w, int) else None
    return LabelMeFile(
        json_path=path,
        image_path=_labelme_image_path(path, data),
        size=size,
        instances=tuple(
            (label, tuple(polygons)) for label, polygons in groups.values() if label != IGNORE_LABEL
        ),
        ignore=ignore,
    )


# --------------------------------------------------------------------------------------------
# Modules: the data set
# --------------------------------------------------------------------------------------------


class LabelMeDataset(PhotoDataset):
    """A folder of LabelMe annotations in the sample contract (`samples.SampleDataset`).

    Every `*.json` of `folder` (not of its subfolders), in sorted file-name order, is one image
    (`read_labelme`): the image file at its imagePath, relative to the json, or else the image
    embedded as imageData. Images are turned upright by their EXIF orientation, as LabelMe shows
    them while labelling. Label names map to classes 1..C in sorted order (`.class_names`);
    shapes labelled IGNORE_LABEL ("__ignore__", LabelMe's own convention) are no class and no
    target but ignore regions (`ignore_mask`), scored as crowd regions.
    Shapes become masks with pycocotools' polygon rasteriser, as COCO polygons do, and boxes
    are the masks' boxes (`masks_to_boxes`); an instance whose mask comes out empty (a
    zero-area shape) is dropped with a warning. Images without shapes are negatives.
    short_side / max_side / pad_to: the COCO path's aspect-kept resize and padding.
    indices: positions in the sorted json list, which are also the items' meta["image_id"].
    Validated at construction: every json, its shapes and that its image can be found;
    a problem raises DataError naming the json.
    """

    def __init__(
        self,
        folder: str | Path,
        short_side: int = 800,
        max_side: int = 1333,
        pad_to: int | None = 32,
        indices: Sequence[int] | None = None,
        augment: Callable | None = None,
    ):
        self.folder = Path(folder)
        self.short_side, self.max_side, self.pad_to = short_side, max_side, pad_to
        self.augment = augment
        if not self.folder.is_dir():
            raise _fail(self.folder, "folder", "was not found", "a folder of LabelMe json files")
        json_paths = sorted(self.folder.glob("*.json"))
        if not json_paths:
            hint = ""
            if any(self.folder.glob("*_img_comp_zlib.h5")):
                hint = " (for CIS680 files give their prefix, e.g. FOLDER/solo, not the folder)"
            raise _fail(self.folder, "folder", "holds no *.json files", f"LabelMe json files{hint}")
        self.files = [read_labelme(p) for p in json_paths]
        names = {label for file in self.files for label, _ in file.instances}
        if not names:
            only_ignore = any(file.ignore for file in self.files)
            what = f"only {IGNORE_LABEL!r} shapes" if only_ignore else "no shapes"
            raise _fail(
                self.folder,
                "LabelMe json files",
                f"have {what} ({len(self.files)} files)",
                "at least one labelled object to learn from",
            )
        self.class_names = tuple(sorted(names))
        self.label_of = {name: k + 1 for k, name in enumerate(self.class_names)}
        self._set_indices(indices, len(self.files), self.folder)
        self._warned: set = set()

    def num_instances(self, i: int) -> int:
        """Number of instances of item i (shape groups, before rasterising)."""
        return len(self.files[self.indices[i]].instances)

    def file_name(self, i: int) -> str:
        file = self.files[self.indices[i]]
        return str(file.image_path if file.image_path is not None else file.json_path)

    def _read_image(self, file: LabelMeFile) -> np.ndarray:
        if file.image_path is not None:
            source: Any = file.image_path
            where, field = file.image_path, "image"
        else:  # read again here: the data set does not keep every image's bytes in memory
            where, field = file.json_path, "imageData"
            with open(file.json_path, encoding="utf-8") as f:
                image_data = json.load(f)["imageData"]
            try:
                source = io.BytesIO(base64.b64decode(image_data))
            except (binascii.Error, ValueError) as exc:
                raise _fail(where, field, f"is not base64 ({exc})", "base64 image bytes") from exc
        try:
            with Image.open(source) as im:
                upright = ImageOps.exif_transpose(im)  # LabelMe labels photos as shown, upright
                array = image_to_rgb8(upright, where)  # 16-bit, grayscale, palette, RGBA -> RGB
        except OSError as exc:
            raise _fail(where, field, f"could not be read ({exc})", "an image file") from exc
        h0, w0 = array.shape[1:]
        if file.size is not None and file.size != (h0, w0):
            raise _fail(
                file.json_path,
                "imageHeight x imageWidth",
                f"is {file.size[0]} x {file.size[1]} but its image is {h0} x {w0}",
                "the size of the image the shapes were drawn on",
            )
        return array

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Item i at its original size: image uint8 (3, h0, w0), masks uint8 (N, h0, w0),
        labels int64 (N,), boxes float32 (N, 4) x1 y1 x2 y2 (the masks' boxes)."""
        file = self.files[self.indices[i]]
        image = self._read_image(file)
        h0, w0 = image.shape[1:]
        masks, labels = [], []
        for k, (label, polygons) in enumerate(file.instances):
            mask = decode_segmentation([list(p) for p in polygons], h0, w0)  # union of the group
            if not mask.any():
                self._warn_once(
                    (file.json_path, k),
                    f"{file.json_path}: instance {k} (label {label!r}) has an empty mask "
                    f"in the {w0} x {h0} image; it is left out of the targets.",
                )
                continue
            masks.append(mask)
            labels.append(self.label_of[label])
        if masks:
            stacked = np.stack(masks)
            return image, stacked, np.array(labels, np.int64), masks_to_boxes(stacked)
        empty = np.zeros((0, h0, w0), dtype=np.uint8)
        return image, empty, np.zeros((0,), np.int64), np.zeros((0, 4), np.float32)

    def ignore_mask(self, i: int) -> np.ndarray | None:
        """The union of item i's IGNORE_LABEL shapes at the original size, uint8 (h0, w0)
        {0, 1}; None when it has none. They are never a training target; evaluation scores
        them as crowd regions (`evaluation.build_coco_gt`)."""
        file = self.files[self.indices[i]]
        if not file.ignore:
            return None
        # The json's stated size is checked against the image when it is read; only a json
        # that states none makes us decode the image for its size.
        h0, w0 = file.size if file.size is not None else self._read_image(file).shape[1:]
        polygons = [list(p) for group in file.ignore for p in group]
        region = decode_segmentation(polygons, h0, w0)
        return region if region.any() else None
