"""Data sets, preprocessing, augmentation and loaders for SOLO (CIS680 hand-out, section 4).

Three sources give the same samples:

* CIS680 files (the hand-out's format), read by `BuildDataset(prefix)`:
  `{prefix}_img_comp_zlib.h5`    one HDF5 data set (N, 3, 300, 400) uint8, the images;
  `{prefix}_mask_comp_zlib.h5`   one HDF5 data set (M, 300, 400), every instance mask of every
                                 image, concatenated in image order;
  `{prefix}_labels_comp_zlib.npy` object array of N int arrays (n_i,), class ids 1..3;
  `{prefix}_bboxes_comp_zlib.npy` object array of N float arrays (n_i, 4), x1 y1 x2 y2 pixels.
  The masks of image i are rows sum(n_0..n_{i-1}) .. + n_i of the mask file (the hand-out's
  "use the labels list to figure out which mask belongs to which image").
  `write_cis680` writes such files; `coco_to_cis680` makes them from any COCO subset.
* COCO-format json + image folder (COCO itself, LabelMe's COCO export and most labelling
  tools), read by `CocoDataset(json_path, image_dir)`.
* A folder of LabelMe annotations (one json per image, polygon / rectangle / circle shapes,
  `imagePath` relative to the json or the image embedded as `imageData`), read by
  `LabelMeDataset(folder)`; label names become classes 1..C in sorted order.
`build_datasets(data, ...)` picks the source from `data`: a path ending in .json is COCO, a
folder is LabelMe, anything else a CIS680 prefix.

Output contract (the project's stable interface; other modules rely on it)
--------------------------------------------------------------------------
A data set item is a 5-tuple `(img, labels, masks, boxes, meta)`:
  img     float32 (3, H, W)  scaled to [0, 1], resized (bilinear `F.interpolate`), normalised
                             with IMAGENET_MEAN / IMAGENET_STD, zero-padded at the bottom/right
                             to H x W, multiples of `pad_to` (CIS680 default: 800 x 1066 resize,
                             800 x 1088 padded, as the hand-out asks).
  labels  int64 (N,)         class ids 1..C (0 is background and never appears).
  masks   uint8 (N, H, W)    values {0, 1}, same padded frame as img.
  boxes   float32 (N, 4)     x1 y1 x2 y2 in padded-input pixels.
  meta    dict               "image_id" int, "orig_size" (h0, w0), "input_size" (h, w) of the
                             resized image before padding, "scale" (sy, sx) with
                             h = round(h0 * sy), w = round(w0 * sx), "file_name" str (the image
                             file, or "<h5 file>#<index>"); augmented samples add "augment".
N may be 0: labels (0,), masks (0, H, W), boxes (0, 4). `.class_names` is a tuple of C names
for ids 1..C (CIS680: ("vehicle", "person", "animal"); LabelMe: the sorted label names).
`collate_fn` pads images and masks of a batch at the bottom/right to the largest H and W and
returns `(imgs (B, 3, H, W), label_list, mask_list, box_list, meta_list)`.

Box-from-mask convention (`masks_to_boxes`, the one place it lives): x1 = first column,
y1 = first row, x2 = last column + 1, y2 = last row + 1, i.e. pixel edges, so a mask of one
pixel at (row 5, col 7) has the box (7, 5, 8, 6) and box width = number of columns covered.

Run:
  python dataset.py                               # built-in data, 5 pictures to outputs/...
  python dataset.py --cis680 data/builtin/solo    # CIS680 files with that prefix
  python dataset.py --coco-json ann.json --coco-images imgs/ [--cis680-classes]
  python dataset.py --coco-json ann.json --coco-images imgs/ --to-cis680 data/mine/solo
  python dataset.py --data my_photos/             # a folder of LabelMe json files (or any
                                                  # --data of main_train.py)

Shape legend: B batch, N instances of one image, M instances of a whole file, C classes
without background, H x W padded input, h x w resized input before padding, h0 x w0 source.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import copy
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF2

import synthetic
import visualize
from cis680_files import CIS680_IMAGE_SIZE, cis680_paths, write_cis680  # noqa: F401
from config import Config
from errors import DataError  # noqa: F401  (dataset.DataError, as callers have always used it)
from errors import data_error as _fail
from safe_npy import read_npy

# --------------------------------------------------------------------------------------------
# Config: constants of the hand-out and of COCO
# --------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # hand-out section 4.3 (ImageNet statistics)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIS680_CLASSES = ("vehicle", "person", "animal")  # ids 1, 2, 3
CIS680_INPUT_SIZE = (800, 1066)  # hand-out resize target, padded to 800 x 1088

_VEHICLES = ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")
_ANIMALS = tuple("bird cat dog horse sheep cow elephant bear zebra giraffe".split())
# COCO category name -> CIS680 class id (1 vehicle, 2 person, 3 animal); others are dropped.
COCO_TO_CIS680: dict[str, int] = {
    **{name: 1 for name in _VEHICLES},
    "person": 2,
    **{name: 3 for name in _ANIMALS},
}

BOX_TOLERANCE = 1.0  # pixels a stored box may reach past the image border before it is an error
MASK_CHECK_CHUNK = 256  # masks read at a time when BuildDataset checks that none is empty
# Least IoU between a CIS680 mask's tight box and the box stored for it, both grown by
# BOX_TOLERANCE on every side. A mask and its own box describe one object and nearly coincide:
# coco128 converted by `coco_to_cis680` has IoU >= 0.60 (0.71 grown; tiny objects, whose json
# box edges fall between pixels after the 300 x 400 letterbox, are the lowest; the growth keeps
# 1-3 pixel objects clear of the bound), the built-in data 1.0. A mask that slid by one row to
# the next instance or image lies on another object: IoU >= 0.5 for under 2 % of such rows in
# both sets. 0.5 is also the usual "same object" bound of detection matching (VOC, COCO AP50).
MASK_BOX_MIN_IOU = 0.5
# LabelMe shapes with an area, and the points each takes (LabelMe's own meaning of them)
LABELME_SHAPE_POINTS = {
    "polygon": "at least 3 points",
    "rectangle": "2 points (two opposite corners)",
    "circle": "2 points (the centre and a point on the circle)",
}
# LabelMe's ignore convention (its instance-segmentation example): shapes with this label are
# regions where a detection is neither a true nor a false positive, as COCO's crowd regions.
IGNORE_LABEL = "__ignore__"
# COCO categories that are no class: labelme2coco writes "_background_" (id 0) and the
# ignore label as categories. "_background_" annotations are dropped, "__ignore__" ones
# become ignore regions.
NOT_CLASSES = ("_background_", IGNORE_LABEL)
# Largest |coordinate| of a polygon or shape point, pixels: the polygon rasteriser's work and
# memory grow with the coordinates (a circle of radius 1e12 would never finish).
MAX_COORDINATE = 100_000


# --------------------------------------------------------------------------------------------
# Pure functions: boxes, resizing, preprocessing, splits
# --------------------------------------------------------------------------------------------


def masks_to_boxes(masks: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Tight boxes of masks (N, H, W) -> (N, 4) float32 x1 y1 x2 y2, same type as the input.

    x1 = first nonzero column, y1 = first nonzero row, x2 = last column + 1, y2 = last row + 1
    (pixel edges; see the module docstring). An empty mask gives (0, 0, 0, 0).
    """
    is_numpy = isinstance(masks, np.ndarray)
    nonzero = torch.as_tensor(masks) != 0  # (N, H, W) bool
    N, H, W = nonzero.shape
    boxes = torch.zeros((N, 4), dtype=torch.float32)
    if N > 0:
        rows = nonzero.any(dim=2)  # (N, H): row holds a mask pixel
        cols = nonzero.any(dim=1)  # (N, W)
        row_idx = torch.arange(H)
        col_idx = torch.arange(W)
        boxes[:, 0] = torch.where(cols, col_idx, W).amin(dim=1).float()
        boxes[:, 1] = torch.where(rows, row_idx, H).amin(dim=1).float()
        boxes[:, 2] = torch.where(cols, col_idx, -1).amax(dim=1).float() + 1
        boxes[:, 3] = torch.where(rows, row_idx, -1).amax(dim=1).float() + 1
        boxes[~rows.any(dim=1)] = 0
    return boxes.numpy() if is_numpy else boxes


def padded_size(size: tuple[int, int], pad_to: int | None) -> tuple[int, int]:
    """(h, w) rounded up to multiples of pad_to (no change for pad_to None or 1)."""
    h, w = size
    if not pad_to or pad_to <= 1:
        return int(h), int(w)
    return int(math.ceil(h / pad_to) * pad_to), int(math.ceil(w / pad_to) * pad_to)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks (N, h0, w0) -> uint8 (N, h, w) in {0, 1}: bilinear, then >= 0.5.

    Downscaling can erase a thin object (plain bilinear even skips source pixels); such a mask
    keeps the pixels where its antialiased (area-weighted) resize peaks, so an instance is
    never lost.
    """
    N, h0, w0 = masks.shape
    if N == 0:
        return torch.zeros((0, *size), dtype=torch.uint8)
    if (h0, w0) == tuple(size):
        return (masks >= 0.5).to(torch.uint8)
    masks = masks.float()
    soft = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]
    binary = soft >= 0.5  # (N, h, w)
    lost = ~binary.flatten(1).any(dim=1) & (masks.flatten(1) >= 0.5).any(dim=1)
    if lost.any():
        smooth = F.interpolate(
            masks[lost][None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0]
        peak = smooth.flatten(1).amax(dim=1)  # (n_lost,)
        binary[lost] = smooth >= peak[:, None, None]
    return binary.to(torch.uint8)


def resize_image(
    image: torch.Tensor, size: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """uint8 or float image (3, h0, w0) -> float32 (3, h, w) in [0, 1], bilinear."""
    img = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(
        img[None], size=size, mode="bilinear", align_corners=False, antialias=antialias
    )[0].clamp_(0.0, 1.0)


def preprocess(
    image: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    boxes: torch.Tensor | np.ndarray,
    size: tuple[int, int],
    pad_to: int | None = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, tuple]]:
    """The hand-out's preprocessing of one image and its instances.

    image uint8 (3, h0, w0); masks (N, h0, w0) {0, 1}; boxes (N, 4) x1 y1 x2 y2 source pixels;
    size (h, w) resize target. Steps: scale to [0, 1]; bilinear `F.interpolate` to (h, w);
    normalise with ImageNet mean/std; zero-pad bottom/right to multiples of pad_to.
    Returns img float32 (3, H, W), masks uint8 (N, H, W), boxes float32 (N, 4) scaled by
    (sx, sy) and clipped to the image, and meta parts {"orig_size", "input_size", "scale"}.
    """
    image = torch.as_tensor(image)
    masks = torch.as_tensor(masks)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    h0, w0 = image.shape[-2:]
    h, w = int(size[0]), int(size[1])
    H, W = padded_size((h, w), pad_to)
    sy, sx = h / h0, w / w0

    img = TF.normalize(resize_image(image, (h, w)), IMAGENET_MEAN, IMAGENET_STD)
    img = F.pad(img, (0, W - w, 0, H - h))  # zero-pad right and bottom
    out_masks = F.pad(resize_masks(masks, (h, w)), (0, W - w, 0, H - h))
    out_boxes = boxes * torch.tensor([sx, sy, sx, sy])
    out_boxes[:, 0::2] = out_boxes[:, 0::2].clamp(0, w)
    out_boxes[:, 1::2] = out_boxes[:, 1::2].clamp(0, h)
    meta = {"orig_size": (int(h0), int(w0)), "input_size": (h, w), "scale": (sy, sx)}
    return img.contiguous(), out_masks.contiguous(), out_boxes, meta


def coco_input_size(orig_size: tuple[int, int], short_side: int, max_side: int) -> tuple[int, int]:
    """Aspect-kept resize: short side to short_side unless the long side would pass max_side."""
    h0, w0 = orig_size
    scale = min(short_side / min(h0, w0), max_side / max(h0, w0))
    return max(1, round(h0 * scale)), max(1, round(w0 * scale))


def letterbox(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    size: tuple[int, int] = CIS680_IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit an image and its instances into `size`, aspect kept, zero padding bottom/right.

    image uint8 (3, h0, w0), masks (N, h0, w0), boxes (N, 4) -> uint8 (3, *size),
    uint8 (N, *size), float32 (N, 4). Used to make CIS680-style 300 x 400 files.
    """
    h0, w0 = image.shape[-2:]
    Ht, Wt = size
    scale = min(Ht / h0, Wt / w0)
    h, w = min(Ht, max(1, round(h0 * scale))), min(Wt, max(1, round(w0 * scale)))
    img = resize_image(torch.from_numpy(np.ascontiguousarray(image)), (h, w), antialias=True)
    img = (img * 255.0).round_().to(torch.uint8)
    out_img = np.zeros((3, Ht, Wt), dtype=np.uint8)
    out_img[:, :h, :w] = img.numpy()
    out_masks = np.zeros((len(masks), Ht, Wt), dtype=np.uint8)
    out_masks[:, :h, :w] = resize_masks(torch.from_numpy(np.asarray(masks)), (h, w)).numpy()
    out_boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.array(
        [w / w0, h / h0, w / w0, h / h0], dtype=np.float32
    )
    out_boxes[:, 0::2] = out_boxes[:, 0::2].clip(0, w)
    out_boxes[:, 1::2] = out_boxes[:, 1::2].clip(0, h)
    return out_img, out_masks, out_boxes


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded random train/validation split of range(n) (hand-out: 80 % training).

    The validation part has round(n * val_fraction) images (at least 1 and at most n - 1 when
    n >= 2 and 0 < val_fraction < 1). Both lists are sorted; the same seed gives the same split.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if n >= 2 and 0.0 < val_fraction < 1.0:
        n_val = min(max(n_val, 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def load_split(path: str | Path) -> tuple[list[int] | None, list[int] | None]:
    """Read an explicit split -> (train_idx or None, val_idx or None).

    json: {"train": [...], "val": [...]} (either key may be left out: the other part is then
    the rest), or a plain list. A plain list (json list, or a txt file of integers separated by
    white space or commas, '#' starts a comment) holds the VALIDATION image indices.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "split file", "was not found", "a json or txt file of image indices")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(path, "split json", f"could not be parsed ({exc})", "valid json") from exc
        if isinstance(data, dict):
            unknown = set(data) - {"train", "val"}
            if unknown or not data:
                raise _fail(path, "split keys", f"are {sorted(data)}", '"train" and/or "val"')
            return (
                _index_list(data.get("train"), path, "train"),
                _index_list(data.get("val"), path, "val"),
            )
        return None, _index_list(data, path, "val")
    tokens = [t for line in text.splitlines() for t in line.split("#")[0].replace(",", " ").split()]
    try:
        return None, [int(t) for t in tokens]
    except ValueError as exc:
        raise _fail(path, "split entries", f"hold a non-integer ({exc})", "integers") from exc


def _index_list(values: Any, path: Path, field: str) -> list[int] | None:
    if values is None:
        return None
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise _fail(path, f"split field '{field}'", "is not a list of integers", "image indices")
    return list(values)


def resolve_split(
    split: Any, n: int, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Turn a split spec into checked (train_idx, val_idx) over range(n).

    split: None (seeded `split_indices`), a path (`load_split`), a (train, val) pair (either
    may be None: the rest of range(n)), or a plain sequence of validation indices.
    """
    source: Any = "split"
    if split is None:
        return split_indices(n, val_fraction, seed)
    if isinstance(split, (str, Path)):
        source = Path(split)
        train, val = load_split(split)
    elif isinstance(split, tuple) and len(split) == 2 and not isinstance(split[0], int):
        train, val = split
    else:
        train, val = None, list(split)
    for name, part in (("train", train), ("val", val)):
        if part is None:
            continue
        bad = [i for i in part if not 0 <= int(i) < n]
        if bad:
            raise _fail(source, f"{name} indices", f"include {bad[:5]}", f"indices in 0..{n - 1}")
        if len(set(part)) != len(part):
            raise _fail(source, f"{name} indices", "repeat an index", "each image at most once")
    if train is None and val is None:
        return split_indices(n, val_fraction, seed)
    if train is None:
        train = sorted(set(range(n)) - set(val))
    if val is None:
        val = sorted(set(range(n)) - set(train))
    if set(train) & set(val):
        raise _fail(source, "train and val indices", "overlap", "disjoint parts")
    return [int(i) for i in train], [int(i) for i in val]


# --------------------------------------------------------------------------------------------
# CIS680 files: reader helpers (names and writer: cis680_files.py)
# --------------------------------------------------------------------------------------------


def _h5_single_dataset(h5file: h5py.File, path: Path) -> h5py.Dataset:
    """The file's one data set, whatever its name ("data" wins when there are several)."""
    found: list[tuple[str, h5py.Dataset]] = []

    def collect(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append((name, obj))

    h5file.visititems(collect)
    names = [name for name, _ in found]
    if "data" in names:
        return h5file["data"]
    if len(found) != 1:
        raise _fail(path, "HDF5 data sets", f"are {names}", 'one data set (named "data")')
    return found[0][1]


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise _fail(path, "file", f"could not be opened as HDF5 ({exc})", "an HDF5 file") from exc


def _load_object_npy(path: Path, field: str) -> list[np.ndarray]:
    """The per-image entries of a CIS680 labels or bboxes file: numeric arrays, one per image
    (an object array's entries, or the rows of a plain numeric array)."""
    arr = read_npy(path, field)
    if arr.ndim == 0:
        raise _fail(path, field, "is a single value", "an array with one entry per image")
    items = list(arr)
    for i, item in enumerate(items):
        if not isinstance(item, np.ndarray) or item.dtype.kind not in "biuf":
            what = (
                f"an array of dtype {item.dtype}"
                if isinstance(item, np.ndarray)
                else f"a {type(item).__name__}"
            )
            raise _fail(path, f"{field} of image {i}", f"are {what}", "a numeric array")
    return items


def _paired_box_iou(a: np.ndarray, b: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """IoU of box a[k] with box b[k], boxes (n, 4) x1 y1 x2 y2 each grown by `grow` pixels on
    every side -> (n,) float32 (0 where both are empty)."""
    margin = np.array([-grow, -grow, grow, grow], dtype=np.float32)
    a, b = a + margin, b + margin
    wh = (np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2])).clip(min=0)  # (n, 2)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)
    area_b = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def _projection_boxes(masks: np.ndarray) -> np.ndarray:
    """`masks_to_boxes` of bool masks (n, h, w), from their row and column projections in
    numpy -> (n, 4) float32, same pixel-edge convention, (0, 0, 0, 0) for an empty mask. The
    construction-time pass over every mask uses it: 3 ms per 256 masks of 300 x 400, where
    the torch version's elementwise `!= 0` alone takes 200 ms."""
    n, h, w = masks.shape
    rows = masks.any(axis=2)  # (n, h): row holds a mask pixel
    cols = masks.any(axis=1)  # (n, w)
    boxes = np.zeros((n, 4), dtype=np.float32)
    boxes[:, 0] = cols.argmax(axis=1)  # first True
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = w - cols[:, ::-1].argmax(axis=1)  # last True + 1
    boxes[:, 3] = h - rows[:, ::-1].argmax(axis=1)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def image_to_rgb8(image: Image.Image, where: Any) -> np.ndarray:
    """A PIL image -> uint8 (3, h0, w0) RGB: how every reader (COCO, LabelMe, main_infer's
    image files) decodes a picture.

    16-bit grayscale (modes I;16, I;16B, I;16L, I;16N, and I holding 0..65535) is scaled to
    8 bits, round(value * 255 / 65535), where PIL's convert("RGB") would clip it to a white
    image; float grayscale (mode F) from [0, 1] or [0, 255] likewise. Every other mode goes
    through convert("RGB") (PIL itself opens 16-bit RGB PNGs as 8-bit RGB). Values outside
    those ranges raise DataError naming `where`, the image's file.
    """
    mode = image.mode
    if mode.startswith("I"):
        values = np.asarray(image).astype(np.int64)  # I;16*: uint16 (either byte order); I: int32
        if values.size and (values.min() < 0 or values.max() > 65535):
            found = f"holds {values.min()}..{values.max()}"
            raise _fail(where, f"image (mode {mode})", found, "16-bit values 0..65535")
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # rounded, half up
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise _fail(where, "image (mode F)", "holds NaN or infinity", "finite values")
        high = values.max(initial=0.0)
        if values.size and (values.min() < 0 or high > 255):
            found = f"holds {values.min():g}..{high:g}"
            raise _fail(where, "image (mode F)", found, "values in [0, 1] or [0, 255]")
        gray = np.round(values * 255 if high <= 1 else values).astype(np.uint8)
    else:
        rgb = np.asarray(image.convert("RGB"))  # grayscale, palette, RGBA, CMYK -> RGB
        # (h0, w0, 3) -> (3, h0, w0); np.array copies always: PIL's array is read-only, and a
        # transpose of a 1-pixel-wide image is already contiguous
        return np.array(rgb.transpose(2, 0, 1), order="C")
    return np.array(np.broadcast_to(gray, (3, *gray.shape)), order="C")  # gray -> 3 channels


def _box_text(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in np.round(box.astype(np.float64), 1)) + "]"


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


class BuildDataset(Dataset):
    """The hand-out's data set over CIS680 files (see the module docstring for the contract).

    prefix: CIS680 prefix (see `cis680_paths`); size: (h, w) resize target, the hand-out's
    800 x 1066; pad_to: padded size = size rounded up to multiples of it (800 x 1088);
    indices: image indices of the file this data set holds (a split), default all;
    augment: callable applied to each preprocessed sample (e.g. `TrainAugment()`);
    check_masks: read every mask once at construction, in chunks of MASK_CHECK_CHUNK, to check
    that none is empty and that each lies on the box stored for it (`_check_masks`: a shifted
    per-image count in the labels file would hand masks to the wrong image; a few seconds for
    a few thousand 300 x 400 masks); when False, each item's masks are checked when it is read.

    Everything but the masks is validated at construction (counts, shapes, dtypes, label range,
    boxes inside the image); a problem raises DataError naming the file. Images and masks are
    read lazily per item; the HDF5 files are opened on first use in each process (DataLoader
    workers included) and never pickled.
    """

    class_names = CIS680_CLASSES

    def __init__(
        self,
        prefix: str | Path,
        size: tuple[int, int] = CIS680_INPUT_SIZE,
        pad_to: int | None = 32,
        indices: Sequence[int] | None = None,
        augment: Callable | None = None,
        check_masks: bool = True,
    ):
        self.paths = cis680_paths(prefix)
        for key, path in self.paths.items():
            if not path.is_file():
                raise _fail(path, "file", "was not found", f"the CIS680 {key} file of {prefix}")
        self.size = (int(size[0]), int(size[1]))
        self.pad_to = pad_to
        self.augment = augment
        self._files: dict[str, h5py.File] | None = None
        self._pid: int | None = None

        img_path, mask_path = self.paths["img"], self.paths["mask"]
        with _open_h5(img_path) as f:
            ds = _h5_single_dataset(f, img_path)
            self._img_key, img_shape, img_dtype = ds.name, ds.shape, ds.dtype
        with _open_h5(mask_path) as f:
            ds = _h5_single_dataset(f, mask_path)
            self._mask_key, mask_shape, mask_dtype = ds.name, ds.shape, ds.dtype
        if len(img_shape) != 4 or img_shape[1] != 3:
            raise _fail(img_path, "images", f"have shape {img_shape}", "(N, 3, H, W)")
        if img_dtype != np.uint8:
            raise _fail(img_path, "images", f"have dtype {img_dtype}", "uint8")
        if len(mask_shape) != 3 or tuple(mask_shape[1:]) != tuple(img_shape[2:]):
            raise _fail(
                mask_path,
                "masks",
                f"have shape {mask_shape}",
                f"(M, {img_shape[2]}, {img_shape[3]})",
            )
        if mask_dtype.kind not in "buf":
            raise _fail(mask_path, "masks", f"have dtype {mask_dtype}", "uint8, bool or float")
        self.num_images = int(img_shape[0])
        self.image_size = (int(img_shape[2]), int(img_shape[3]))
        self.labels = self._load_labels(self.paths["labels"])
        self.boxes = self._load_boxes(self.paths["bboxes"])
        counts = np.array([len(lab) for lab in self.labels], dtype=np.int64)
        if counts.sum() != mask_shape[0]:
            raise _fail(
                mask_path,
                "masks",
                f"number {mask_shape[0]}",
                f"{counts.sum()}, the total number of labels in {self.paths['labels']}",
            )
        # mask rows of image i: offsets[i] .. offsets[i + 1] (the hand-out's grouping)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.check_masks = check_masks
        if check_masks:
            self._check_all_masks()
        all_idx = range(self.num_images)
        self.indices = list(all_idx) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < self.num_images]
        if bad:
            raise _fail(img_path, "indices", f"include {bad[:5]}", f"0..{self.num_images - 1}")

    # -- construction-time checks -----------------------------------------------------------
    def _load_labels(self, path: Path) -> list[np.ndarray]:
        items = _load_object_npy(path, "labels")
        if len(items) != self.num_images:
            raise _fail(
                path,
                "labels",
                f"cover {len(items)} images",
                f"{self.num_images}, the number of images in {self.paths['img']}",
            )
        C = len(self.class_names)
        labels = []
        for i, lab in enumerate(items):
            lab = lab.reshape(-1)
            if lab.size and (
                lab.dtype.kind not in "iuf" or not np.all(np.equal(np.mod(lab, 1), 0))
            ):
                raise _fail(path, f"labels of image {i}", f"are {lab.tolist()}", "integer ids")
            lab = lab.astype(np.int64)
            if lab.size and (lab.min() < 1 or lab.max() > C):
                raise _fail(path, f"labels of image {i}", f"are {lab.tolist()}", f"ids in 1..{C}")
            labels.append(lab)
        return labels

    def _load_boxes(self, path: Path) -> list[np.ndarray]:
        items = _load_object_npy(path, "bboxes")
        if len(items) != self.num_images:
            raise _fail(
                path,
                "bboxes",
                f"cover {len(items)} images",
                f"{self.num_images}, the number of images in {self.paths['img']}",
            )
        h, w = self.image_size
        t = BOX_TOLERANCE
        boxes = []
        for i, (box, lab) in enumerate(zip(items, self.labels, strict=True)):
            n = len(lab)
            if box.size == 0 and n == 0:
                boxes.append(np.zeros((0, 4), dtype=np.float32))
                continue
            if box.dtype.kind not in "iuf" or box.ndim != 2 or box.shape[1] != 4:
                raise _fail(path, f"bboxes of image {i}", f"have shape {box.shape}", f"({n}, 4)")
            if len(box) != n:
                raise _fail(
                    path,
                    f"bboxes of image {i}",
                    f"number {len(box)}",
                    f"{n}, the number of labels of that image",
                )
            box = box.astype(np.float32)
            x1, y1, x2, y2 = box.T
            bad = ~np.isfinite(box).all(1) | (x1 < -t) | (y1 < -t) | (x2 > w + t) | (y2 > h + t)
            bad |= (x2 <= x1) | (y2 <= y1)
            # Clipped to the image, a box within BOX_TOLERANCE past an edge keeps an area only
            # if it covers some of the image (x1 = 8.5, x2 = 8.9 in an 8-wide image: none).
            bad |= (np.minimum(x2, w) <= np.maximum(x1, 0)) | (
                np.minimum(y2, h) <= np.maximum(y1, 0)
            )
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise _fail(
                    path,
                    f"box {k} of image {i}",
                    f"is {box[k].tolist()}",
                    f"0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h} (inside the image)",
                )
            box[:, 0::2] = box[:, 0::2].clip(0, w)
            box[:, 1::2] = box[:, 1::2].clip(0, h)
            boxes.append(box)
        return boxes

    def _check_all_masks(self) -> None:
        """Read every mask once, MASK_CHECK_CHUNK at a time, and check it (`_check_masks`)."""
        stored = np.concatenate([np.zeros((0, 4), np.float32), *self.boxes])  # (M, 4), row order
        with _open_h5(self.paths["mask"]) as f:
            ds = f[self._mask_key]
            for start in range(0, ds.shape[0], MASK_CHECK_CHUNK):
                chunk = ds[start : start + MASK_CHECK_CHUNK]  # (n, h, w)
                # >= 0.5 as everywhere, but without promoting integer masks to float64
                chunk = chunk >= 0.5 if chunk.dtype.kind == "f" else chunk != 0
                self._check_masks(start, chunk, stored[start : start + len(chunk)])

    def _check_masks(self, start: int, masks: np.ndarray, stored: np.ndarray) -> None:
        """Masks (n, h, w) of mask rows start .. start + n - 1 against their stored boxes (n, 4):
        none may be empty, and each mask's tight box must overlap its stored box with IoU >=
        MASK_BOX_MIN_IOU (both grown by BOX_TOLERANCE). A labels file whose per-image counts
        are shifted (totals equal) hands masks to the wrong image; they then miss its boxes."""
        binary = masks if masks.dtype == bool else masks != 0
        mask_boxes = _projection_boxes(binary)  # (n, 4); an empty mask gives (0, 0, 0, 0)
        empty = mask_boxes[:, 2] <= mask_boxes[:, 0]
        if empty.any():
            self._raise_empty_mask(start + int(np.flatnonzero(empty)[0]))
        iou = _paired_box_iou(mask_boxes, stored, grow=BOX_TOLERANCE)  # (n,)
        bad = iou < MASK_BOX_MIN_IOU
        if not bad.any():
            return
        k = int(np.flatnonzero(bad)[0])
        row = start + k
        image = int(np.searchsorted(self.offsets, row, side="right") - 1)
        raise _fail(
            self.paths["mask"],
            f"mask {row} (instance {row - self.offsets[image]} of image {image})",
            f"has the box {_box_text(mask_boxes[k])} but {self.paths['bboxes']} stores "
            f"{_box_text(stored[k])} for it (IoU {iou[k]:.2f})",
            f"IoU >= {MASK_BOX_MIN_IOU} between a mask and its box: the per-image mask counts "
            f"of {self.paths['labels']} may be shifted, so that masks slide from one image to "
            "the next",
        )

    def _raise_empty_mask(self, row: int) -> None:
        image = int(np.searchsorted(self.offsets, row, side="right") - 1)
        raise _fail(
            self.paths["mask"],
            f"mask {row} (instance {row - self.offsets[image]} of image {image})",
            "is empty",
            "at least one nonzero pixel per instance",
        )

    # -- lazy per-process file access -------------------------------------------------------
    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._files is None or self._pid != os.getpid():
            # a fresh process (DataLoader worker): open our own handles, never reuse a parent's
            self._files = {
                "img": _open_h5(self.paths["img"]),
                "mask": _open_h5(self.paths["mask"]),
            }
            self._pid = os.getpid()
        return self._files["img"][self._img_key], self._files["mask"][self._mask_key]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = None  # open HDF5 handles are not picklable; reopened on first use
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._files is not None and self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = None

    # -- items ------------------------------------------------------------------------------
    def subset(self, items: Sequence[int], augment: Callable | None = None) -> BuildDataset:
        """A data set of some of this one's items (positions in it), with its own augment;
        the files are not read again."""
        new = copy.copy(self)
        new._files, new._pid = None, None
        new.indices = [self.indices[int(i)] for i in items]
        new.augment = augment
        return new

    def __len__(self) -> int:
        return len(self.indices)

    def num_instances(self, i: int) -> int:
        """Number of instances of item i, from the labels file (no image read)."""
        return len(self.labels[self.indices[i]])

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Item i before preprocessing: image uint8 (3, h0, w0), masks uint8 (N, h0, w0),
        labels int64 (N,), boxes float32 (N, 4) in source pixels."""
        idx = self.indices[i]
        img_ds, mask_ds = self._datasets()
        image = np.asarray(img_ds[idx])
        start, end = int(self.offsets[idx]), int(self.offsets[idx + 1])
        if end > start:
            masks = (np.asarray(mask_ds[start:end]) >= 0.5).astype(np.uint8)
            if not self.check_masks:  # not checked at construction: check this item's now
                self._check_masks(start, masks, self.boxes[idx])
            else:  # boxes checked at construction; the file may have changed since
                empty = ~masks.reshape(end - start, -1).any(axis=1)
                if empty.any():
                    self._raise_empty_mask(start + int(np.flatnonzero(empty)[0]))
        else:
            masks = np.zeros((0, *self.image_size), dtype=np.uint8)
        return image, masks, self.labels[idx].copy(), self.boxes[idx].copy()

    def __getitem__(self, i: int):
        idx = self.indices[i]
        image, masks, labels, boxes = self.raw(i)
        img, masks_t, boxes_t, parts = preprocess(
            torch.from_numpy(image),
            torch.from_numpy(masks),
            torch.from_numpy(boxes),
            self.size,
            self.pad_to,
        )
        meta = {"image_id": int(idx), **parts, "file_name": f"{self.paths['img']}#{idx}"}
        sample = (img, torch.from_numpy(labels), masks_t, boxes_t, meta)
        return self.augment(sample) if self.augment is not None else sample


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


def _is_number(v: Any) -> bool:
    """A finite json number (bool is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    """A json integer (bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_file(path: Path) -> bool:
    """Path.is_file, False for a name no file can have (a NUL byte, too long)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


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
            and all(_is_number(v) and abs(v) <= MAX_COORDINATE for v in p)
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
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
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


def photo_sample(data, raw: tuple, image_id: int, file_name: str) -> tuple:
    """The sample contract from a photo's raw (image, masks, labels, boxes) at its own size:
    aspect-kept resize (`coco_input_size` with data.short_side / max_side), `preprocess`
    with data.pad_to, the meta dict, then data.augment. Shared by the COCO and LabelMe sets."""
    image, masks, labels, boxes = raw
    size = coco_input_size(image.shape[1:], data.short_side, data.max_side)
    img, masks_t, boxes_t, parts = preprocess(
        torch.from_numpy(image),
        torch.from_numpy(masks),
        torch.from_numpy(boxes),
        size,
        data.pad_to,
    )
    meta = {"image_id": image_id, **parts, "file_name": file_name}
    sample = (img, torch.from_numpy(labels), masks_t, boxes_t, meta)
    return data.augment(sample) if data.augment is not None else sample


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
        if ann["category_id"] in checked and not _is_number(ann.get("area")):
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


class CocoDataset(Dataset):
    """COCO-format json + image folder with the same output contract as BuildDataset.

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
    of the json that evaluation scores against (`_coco_ground_truth`: no NOT_CLASSES
    category, ignore regions as crowd regions of every category) and `.image_ids` the COCO
    ids of this data set's items, in item order.
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
        n = len(self.all_image_ids)
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise _fail(self.json_path, "indices", f"include {bad[:5]}", f"0..{n - 1}")
        self.image_ids = [self.all_image_ids[i] for i in self.indices]
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
            if not _is_int(image["id"]) or image["id"] in images:
                raise _fail(path, f"images[{k}] id", f"is {image['id']!r}", "a unique integer")
            for field in ("height", "width"):
                if not _is_int(image[field]) or image[field] < 1:
                    raise _fail(
                        path, f"images[{k}] {field}", f"is {image[field]!r}", "a positive integer"
                    )
            file_name = image["file_name"]
            if not isinstance(file_name, str) or not _is_file(self.image_dir / file_name):
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
            if not _is_int(cat["id"]) or cat["id"] in cat_ids:
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
                if not _is_int(ann.get(field)) or ann[field] not in known:
                    where = f"annotations[{k}] {field}"
                    raise _fail(path, where, f"is {ann.get(field)!r}", expected)
            if ann.get("iscrowd", 0) not in (0, 1):  # False and True are 0 and 1
                raise _fail(path, f"annotations[{k}] iscrowd", f"is {ann['iscrowd']!r}", "0 or 1")
            if not _is_int(ann.setdefault("id", k + 1)):
                raise _fail(path, f"annotations[{k}] id", f"is {ann['id']!r}", "an integer")
        return data

    def subset(self, items: Sequence[int], augment: Callable | None = None) -> CocoDataset:
        """A data set of some of this one's items (positions in it), with its own augment;
        the json is not read again."""
        new = copy.copy(self)
        new.indices = [self.indices[int(i)] for i in items]
        new.image_ids = [self.all_image_ids[i] for i in new.indices]
        new.augment = augment
        new._warned = set()
        return new

    def __len__(self) -> int:
        return len(self.indices)

    def num_instances(self, i: int) -> int:
        """Number of annotations of item i kept for training (before decoding)."""
        return len(self._anns[self.image_ids[i]])

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
        image_id = self.image_ids[i]
        info = self.coco.imgs[image_id]
        image = self._read_image(info)
        h0, w0 = image.shape[1:]
        masks, labels, boxes = [], [], []
        for ann in self._anns[image_id]:
            mask = _decode_annotation(ann, h0, w0, self.json_path)
            if not mask.any():
                if ann["id"] not in self._warned:
                    self._warned.add(ann["id"])
                    warnings.warn(
                        f"{self.json_path}: annotation {ann['id']} of image {image_id} has an "
                        "empty mask; it is left out of the targets.",
                        stacklevel=2,
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
        image_id = self.image_ids[i]
        if not self._ignore[image_id]:
            return None
        info = self.coco.imgs[image_id]
        h0, w0 = info["height"], info["width"]  # checked against the image file when read
        region = np.zeros((h0, w0), dtype=np.uint8)
        for ann in self._ignore[image_id]:
            region |= _decode_annotation(ann, h0, w0, self.json_path)
        return region if region.any() else None

    def __getitem__(self, i: int):
        image_id = self.image_ids[i]
        file_name = str(self.image_dir / self.coco.imgs[image_id]["file_name"])
        return photo_sample(self, self.raw(i), int(image_id), file_name)


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
    if group_id is not None and (not isinstance(group_id, int) or isinstance(group_id, bool)):
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
            if _is_file(path.parent / candidate):
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


class LabelMeDataset(Dataset):
    """A folder of LabelMe annotations with the same output contract as BuildDataset.

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
        n = len(self.files)
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise _fail(self.folder, "indices", f"include {bad[:5]}", f"0..{n - 1}")
        self._warned: set = set()

    def subset(self, items: Sequence[int], augment: Callable | None = None) -> LabelMeDataset:
        """A data set of some of this one's items (positions in it), with its own augment;
        the json files are not read again."""
        new = copy.copy(self)
        new.indices = [self.indices[int(i)] for i in items]
        new.augment = augment
        new._warned = set()
        return new

    def __len__(self) -> int:
        return len(self.indices)

    def num_instances(self, i: int) -> int:
        """Number of instances of item i (shape groups, before rasterising)."""
        return len(self.files[self.indices[i]].instances)

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
                if (file.json_path, k) not in self._warned:
                    self._warned.add((file.json_path, k))
                    warnings.warn(
                        f"{file.json_path}: instance {k} (label {label!r}) has an empty mask "
                        f"in the {w0} x {h0} image; it is left out of the targets.",
                        stacklevel=2,
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

    def __getitem__(self, i: int):
        file = self.files[self.indices[i]]
        file_name = str(file.image_path if file.image_path is not None else file.json_path)
        return photo_sample(self, self.raw(i), int(self.indices[i]), file_name)


# --------------------------------------------------------------------------------------------
# Training augmentation
# --------------------------------------------------------------------------------------------


def _denormalize(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return img * std + mean


class TrainAugment:
    """Random photometric and geometric augmentation of a preprocessed sample.

    Applied to the 5-tuple a data set returns (after preprocessing and padding): it works on
    the valid region meta["input_size"] (the padding is cut away first), so the flip mirrors
    the image, not the padding. Steps, with torchvision.transforms.v2 on tv_tensors:
    brightness and contrast jitter (factors in 1 +- brightness / contrast, on the [0, 1]
    image), horizontal flip with flip_prob, a random scale in scale_range, then a random crop
    back to at most input_size (a smaller image is kept whole). The result is renormalised
    and zero-padded into the same H x W frame, so batches still stack; image content stays
    inside the input_size region. Instances with fewer than min_area mask pixels left are
    dropped, and boxes are recomputed from the masks (`masks_to_boxes`). meta is kept and
    gains meta["augment"] = {"hflip", "scale", "crop" (top, left), "brightness", "contrast"}.

    Random numbers come from torch's global generator (one fixed-size draw per call), so
    torch.manual_seed and DataLoader worker seeding make it reproducible.
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        scale_range: tuple[float, float] = (0.8, 1.2),
        min_area: int = 4,
    ):
        self.flip_prob = flip_prob
        self.brightness = brightness
        self.contrast = contrast
        self.scale_range = scale_range
        self.min_area = min_area

    def __repr__(self) -> str:
        return (
            f"TrainAugment(flip_prob={self.flip_prob}, brightness={self.brightness}, "
            f"contrast={self.contrast}, scale_range={self.scale_range}, min_area={self.min_area})"
        )

    def __call__(self, sample: tuple) -> tuple:
        img, labels, masks, boxes, meta = sample
        _, H, W = img.shape
        h, w = meta["input_size"]
        u = torch.rand(6).tolist()  # brightness, contrast, flip, scale, crop top, crop left
        bright = 1.0 + self.brightness * (2 * u[0] - 1)
        contr = 1.0 + self.contrast * (2 * u[1] - 1)
        flip = u[2] < self.flip_prob
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * u[3]

        image = tv_tensors.Image(_denormalize(img[:, :h, :w]).clamp(0, 1))
        ins_masks = tv_tensors.Mask(masks[:, :h, :w])
        N = len(labels)
        image = TF2.adjust_brightness(image, bright)
        image = TF2.adjust_contrast(image, contr)
        if flip:
            image = TF2.horizontal_flip(image)
            ins_masks = TF2.horizontal_flip(ins_masks)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            image = TF2.resize(image, [nh, nw], antialias=True)
            if N:
                ins_masks = TF2.resize(ins_masks, [nh, nw])  # nearest for Mask: stays {0, 1}
        ch, cw = min(nh, h), min(nw, w)
        top = min(int(u[4] * (nh - ch + 1)), nh - ch)
        left = min(int(u[5] * (nw - cw + 1)), nw - cw)
        image = TF2.crop(image, top, left, ch, cw)

        out_img = torch.zeros((3, H, W), dtype=torch.float32)
        out_img[:, :ch, :cw] = TF.normalize(
            image.as_subclass(torch.Tensor), IMAGENET_MEAN, IMAGENET_STD
        )
        out_masks = torch.zeros((N, H, W), dtype=torch.uint8)
        if N:
            ins_masks = TF2.crop(ins_masks, top, left, ch, cw)
            out_masks[:, :ch, :cw] = ins_masks.as_subclass(torch.Tensor)
        keep = out_masks.flatten(1).sum(dim=1) >= self.min_area
        out_masks = out_masks[keep]
        meta = {
            **meta,
            "augment": {
                "hflip": flip,
                "scale": scale,
                "crop": (top, left),
                "brightness": bright,
                "contrast": contr,
            },
        }
        return out_img, labels[keep], out_masks, masks_to_boxes(out_masks), meta


# --------------------------------------------------------------------------------------------
# Building data sets and loaders
# --------------------------------------------------------------------------------------------


def collate_fn(batch: Sequence[tuple]) -> tuple:
    """The hand-out's collate function, with padding to the batch's largest H and W.

    batch: list of (img (3, H_b, W_b), labels (N_b,), masks (N_b, H_b, W_b), boxes (N_b, 4),
    meta). Returns imgs (B, 3, H, W), label_list, mask_list (each (N_b, H, W)), box_list,
    meta_list. Padding is at the bottom/right, so boxes and meta are unchanged.
    """
    H = max(sample[0].shape[-2] for sample in batch)
    W = max(sample[0].shape[-1] for sample in batch)
    imgs, label_list, mask_list, box_list, meta_list = [], [], [], [], []
    for img, labels, masks, boxes, meta in batch:
        pad = (0, W - img.shape[-1], 0, H - img.shape[-2])
        imgs.append(F.pad(img, pad))
        label_list.append(labels)
        mask_list.append(F.pad(masks, pad))
        box_list.append(boxes)
        meta_list.append(meta)
    return torch.stack(imgs, dim=0), label_list, mask_list, box_list, meta_list


class BuildDataLoader:
    """The hand-out's loader builder: `BuildDataLoader(ds, 2, shuffle=True).loader()`.

    seed: seeds the shuffling and, through it, the DataLoader workers' torch generators
    (hence TrainAugment), so a run is reproducible. pin_memory defaults to CUDA availability;
    workers persist between epochs when num_workers > 0.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 2,
        shuffle: bool = False,
        num_workers: int = 0,
        seed: int | None = None,
        pin_memory: bool | None = None,
        drop_last: bool = False,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.drop_last = drop_last

    collect_fn = staticmethod(collate_fn)  # the hand-out's spelling

    def loader(self) -> DataLoader:
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )


def open_dataset(
    data: str | Path,
    coco_images: str | Path | None = None,
    *,
    size: tuple[int, int] = CIS680_INPUT_SIZE,
    pad_to: int | None = 32,
    short_side: int | None = None,
    max_side: int | None = None,
    cis680_classes: bool = False,
    drop_empty: bool = False,
) -> BuildDataset | CocoDataset | LabelMeDataset:
    """Every image of one source, picked by what `data` is: a path ending in .json is a
    COCO-format json (coco_images: its image folder), a folder holds LabelMe json files
    (`LabelMeDataset`), anything else is a CIS680 prefix. size is the CIS680 resize target;
    COCO and LabelMe keep the aspect ratio with short_side / max_side, by default min(size) /
    max(size), so one size setting serves every source. cis680_classes and drop_empty apply to
    COCO json only (LabelMe labels are free text and always become their own classes);
    coco_images applies to COCO json only (a LabelMe json names its own image).
    """
    short_side = short_side or min(size)
    max_side = max_side or max(size)
    if str(data).lower().endswith(".json"):
        if coco_images is None:
            raise _fail(data, "coco_images", "was not given", "the folder of the json's images")
        return CocoDataset(
            data,
            coco_images,
            short_side=short_side,
            max_side=max_side,
            pad_to=pad_to,
            cis680_classes=cis680_classes,
            drop_empty=drop_empty,
        )
    if Path(data).is_dir():
        return LabelMeDataset(data, short_side=short_side, max_side=max_side, pad_to=pad_to)
    return BuildDataset(data, size=size, pad_to=pad_to)


def without_augment(dataset):
    """A shallow copy of `dataset` (any of this module's data sets) that reads its samples
    without augmentation; the files are not read again."""
    plain = copy.copy(dataset)
    plain.augment = None
    return plain


def build_datasets(
    data: str | Path,
    coco_images: str | Path | None = None,
    *,
    size: tuple[int, int] = CIS680_INPUT_SIZE,
    pad_to: int | None = 32,
    short_side: int | None = None,
    max_side: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    split: Any = None,
    augment: bool | Callable | None = True,
    cis680_classes: bool = False,
    drop_empty: bool = False,
) -> tuple[Dataset, Dataset]:
    """(train_set, val_set) for a CIS680 prefix, a COCO json (a path ending in .json, with
    coco_images its image folder) or a folder of LabelMe json files (see `open_dataset`). The
    split (see `resolve_split`: None gives the seeded 80/20 split) runs over all images of the
    source; augment (True: `TrainAugment()`, or any callable) applies to the training part only.
    A training split whose images hold no object at all is a DataError naming `data`.
    """
    if augment is True:
        augment = TrainAugment()
    augment = augment or None
    full = open_dataset(
        data,
        coco_images,
        size=size,
        pad_to=pad_to,
        short_side=short_side,
        max_side=max_side,
        cis680_classes=cis680_classes,
        drop_empty=drop_empty,
    )
    train_idx, val_idx = resolve_split(split, len(full), val_fraction, seed)
    # Nothing to learn from trains with a zero mask loss and scores AP n/a: refuse it here,
    # from the annotations alone (no image read). An empty training split (every image held
    # out, to evaluate) and a held-out split without objects are fine.
    if train_idx and not any(full.num_instances(i) for i in train_idx):
        raise _fail(
            data,
            "training split",
            f"has no object: none of its {len(train_idx)} images has an annotation to learn "
            "from (crowd and ignore regions and left-out categories are no objects)",
            "at least one training image with an object",
        )
    return full.subset(train_idx, augment=augment), full.subset(val_idx)


def coco_to_cis680(
    json_path: str | Path,
    image_dir: str | Path,
    out_prefix: str | Path,
    drop_empty: bool = False,
    image_size: tuple[int, int] = CIS680_IMAGE_SIZE,
) -> dict[str, Path]:
    """Convert COCO-format data into CIS680 files with the hand-out's three classes.

    Categories are grouped by COCO_TO_CIS680 (others dropped, crowd regions left out); images
    are brought to image_size (300 x 400) with the aspect ratio kept and zero padding at the
    bottom/right; masks and boxes follow. Images with no mapped instance are kept as negatives
    unless drop_empty. Returns the written paths (see `write_cis680`).
    """
    source = CocoDataset(json_path, image_dir, cis680_classes=True, drop_empty=drop_empty)

    def samples():
        for i in range(len(source)):
            image, masks, labels, boxes = source.raw(i)
            image, masks, boxes = letterbox(image, masks, boxes, image_size)
            yield image, masks, labels, boxes

    return write_cis680(out_prefix, samples(), num_images=len(source))


# --------------------------------------------------------------------------------------------
# The data of a config: what training, inference and the export read
# --------------------------------------------------------------------------------------------


def augmentation(cfg: Config):
    """The training split's `dataset.TrainAugment` from the config; None when off (and in
    --overfit, which fits the images as they are)."""
    if not cfg.augment or cfg.overfit:
        return None
    return TrainAugment(
        brightness=cfg.aug_color, contrast=cfg.aug_color, scale_range=tuple(cfg.aug_scale)
    )


def build_data(cfg: Config):
    """(train_set, val_set) for the configured data; augmentation on the training part only."""
    if cfg.data == "builtin":
        source = str(
            synthetic.ensure_builtin_dataset(num_images=cfg.num_images, seed=cfg.data_seed)
        )
    else:
        source = cfg.data
    train_set, val_set = build_datasets(
        source,
        cfg.coco_images or None,
        size=tuple(cfg.input_size),
        pad_to=cfg.pad_to,
        val_fraction=cfg.val_fraction,
        seed=cfg.split_seed,
        split=cfg.split_file or None,
        augment=augmentation(cfg),
        cis680_classes=cfg.cis680_classes,
    )
    cache = cfg.cache_data and cfg.num_workers == 0
    if cfg.cache_data and not cache:
        warnings.warn(
            f"cache_data ignored with num_workers={cfg.num_workers}: each DataLoader worker "
            "would fill a cache of its own and lose it after the epoch; use --num-workers 0",
            stacklevel=2,
        )
    if cfg.overfit:
        # The seeds' check before any long run: fit N training images, evaluate on them.
        # The N images are repeated to an epoch of about the full training set's length, so
        # the preset's epochs, schedule and time budget keep their meaning.
        val_set = train_set.subset(list(range(min(cfg.overfit, len(train_set)))))
        times = max(1, len(train_set) // len(val_set))
        train_set = Repeated(CachedSamples(val_set) if cache else val_set, times)
    elif cache:
        train_set = CachedSamples(train_set)
    return train_set, val_set


class CachedSamples(Dataset):
    """`dataset` with its preprocessed samples kept in memory after their first read.

    The samples are cached before augmentation, which still runs on every read (with the same
    random draws as without the cache, so a run gives the same numbers either way). Meant for
    `num_workers=0`: a DataLoader worker would fill a copy of its own and lose it after the
    epoch. Under torchrun every process fills its own cache, and as the distributed sampler
    deals other samples every epoch, each ends up holding most of the training set.
    """

    def __init__(self, dataset):
        self.augment = getattr(dataset, "augment", None)
        self.dataset = without_augment(dataset)
        self.class_names = dataset.class_names
        self._samples: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self._samples.get(i)
        if sample is None:
            sample = self._samples[i] = self.dataset[i]
        return self.augment(sample) if self.augment is not None else sample


class Repeated(Dataset):
    """`dataset` repeated `times` times (the --overfit epochs)."""

    def __init__(self, dataset, times: int):
        self.dataset = dataset
        self.times = times
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


# --------------------------------------------------------------------------------------------
# Plotting helpers
# --------------------------------------------------------------------------------------------


def pick_samples(dataset: Dataset, num: int) -> list[int]:
    """Up to num item indices: images with >= 2 instances first, then the others, in order."""
    counts = [dataset.num_instances(i) for i in range(len(dataset))]
    several = [i for i, c in enumerate(counts) if c >= 2]
    others = [i for i, c in enumerate(counts) if c < 2]
    return (several + others)[:num]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description="Visual check of the data: save pictures of images, boxes and masks."
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="as main_train.py's --data: builtin, a CIS680 prefix, a COCO json (with "
        "--coco-images) or a folder of LabelMe json files",
    )
    parser.add_argument("--cis680", metavar="PREFIX", help="CIS680 files with this prefix")
    parser.add_argument("--coco-json", metavar="FILE", help="COCO-format annotation json")
    parser.add_argument("--coco-images", metavar="DIR", help="image folder of --coco-json")
    parser.add_argument(
        "--cis680-classes", action="store_true", help="map COCO categories to the 3 classes"
    )
    parser.add_argument(
        "--to-cis680", metavar="OUT_PREFIX", help="convert --coco-json to CIS680 files first"
    )
    parser.add_argument(
        "--drop-empty", action="store_true", help="--to-cis680: leave out images without objects"
    )
    parser.add_argument("--out", default="outputs/dataset_samples", help="output folder")
    parser.add_argument("--num", type=int, default=5, help="number of pictures")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="resize target (CIS680, default 800 1066) or short/long side (COCO and LabelMe, "
        "800 1333)",
    )
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.data, args.cis680, args.coco_json)) > 1:
        parser.error("give one of --data, --cis680 and --coco-json")
    if args.data is not None and args.data.lower().endswith(".json"):
        args.coco_json, args.data = args.data, None  # a COCO json: the --coco-json path
    if (args.coco_json is None) != (args.coco_images is None):
        parser.error("--coco-json and --coco-images go together")
    if args.to_cis680 and args.coco_json is None:
        parser.error("--to-cis680 needs --coco-json and --coco-images")

    cis_size = tuple(args.size) if args.size else CIS680_INPUT_SIZE
    if args.to_cis680:
        paths = coco_to_cis680(
            args.coco_json, args.coco_images, args.to_cis680, drop_empty=args.drop_empty
        )
        print("wrote CIS680 files:", *(str(p) for p in paths.values()), sep="\n  ")
        dataset: Dataset = BuildDataset(args.to_cis680, size=cis_size)
    elif args.coco_json:
        short, long = args.size if args.size else (800, 1333)
        dataset = CocoDataset(
            args.coco_json,
            args.coco_images,
            short_side=short,
            max_side=long,
            cis680_classes=args.cis680_classes,
        )
    elif args.data not in (None, "builtin"):
        short, long = args.size if args.size else (800, 1333)
        dataset = open_dataset(args.data, size=cis_size, short_side=short, max_side=long)
    else:
        prefix = args.cis680
        if prefix is None:
            prefix = synthetic.ensure_builtin_dataset()
        dataset = BuildDataset(prefix, size=cis_size)
    print(f"{len(dataset)} images, classes {dataset.class_names}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for k, i in enumerate(pick_samples(dataset, args.num)):
        img, labels, masks, boxes, meta = dataset[i]
        title = f"{Path(meta['file_name']).name}: {len(labels)} objects"
        fig = visualize.draw_instances(
            img, masks, labels, dataset.class_names, boxes=boxes, title=title
        )
        path = out / f"sample_{k:02d}.png"
        fig.savefig(path, dpi=80)
        saved.append(path)
    print(f"saved {len(saved)} pictures to {out}")
    return saved


if __name__ == "__main__":
    from cli import run

    run(main)
