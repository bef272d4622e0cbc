"""Data sets, augmentation and loaders for SOLO (CIS680 hand-out, section 4): a path -> samples.

Three sources give the same samples, the contract that `samples.SampleDataset` states (a
5-tuple `(img, labels, masks, boxes, meta)`, `.class_names`, `subset`, `num_instances`, ...):

* CIS680 files (the hand-out's format), read by `BuildDataset(prefix)`, here:
  `{prefix}_img_comp_zlib.h5`    one HDF5 data set (N, 3, 300, 400) uint8, the images;
  `{prefix}_mask_comp_zlib.h5`   one HDF5 data set (M, 300, 400), every instance mask of every
                                 image, concatenated in image order;
  `{prefix}_labels_comp_zlib.npy` object array of N int arrays (n_i,), class ids 1..3;
  `{prefix}_bboxes_comp_zlib.npy` object array of N float arrays (n_i, 4), x1 y1 x2 y2 pixels.
  The masks of image i are rows sum(n_0..n_{i-1}) .. + n_i of the mask file (the hand-out's
  "use the labels list to figure out which mask belongs to which image").
  `write_cis680` writes such files; `coco_to_cis680` makes them from any COCO subset.
* COCO-format json + image folder (COCO itself, LabelMe's COCO export and most labelling
  tools), read by `CocoDataset(json_path, image_dir)` (coco_data.py).
* A folder of LabelMe annotations (one json per image, polygon / rectangle / circle shapes,
  `imagePath` relative to the json or the image embedded as `imageData`), read by
  `LabelMeDataset(folder)` (labelme_data.py); label names become classes 1..C in sorted order.
`build_datasets(data, ...)` picks the source from `data`: a path ending in .json is COCO, a
folder is LabelMe, anything else a CIS680 prefix; `build_data(cfg)` is what training,
inference and the export call. `TrainAugment` augments a training sample; `collate_fn` pads
the images and masks of a batch at the bottom/right to the largest H and W and returns
`(imgs (B, 3, H, W), label_list, mask_list, box_list, meta_list)`. Boxes of masks follow
`conventions.masks_to_boxes` (pixel edges). The names the readers' modules define stay
importable from here (`dataset.CocoDataset`, `dataset.preprocess`, ...).

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
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF2

import synthetic
import visualize
from cis680_files import CIS680_CLASSES, CIS680_IMAGE_SIZE, cis680_paths, write_cis680
from coco_data import (  # noqa: F401  (and the names it defines, as `dataset.X` as before)
    COCO_TO_CIS680,
    NOT_CLASSES,
    CocoDataset,
    crowd_annotations,
    decode_segmentation,
)
from config import Config
from conventions import IMAGENET_MEAN, IMAGENET_STD, masks_to_boxes
from errors import DataError  # noqa: F401  (dataset.DataError, as callers have always used it)
from errors import data_error as _fail
from labelme_data import (  # noqa: F401  (and the names it defines, as `dataset.X` as before)
    LABELME_SHAPE_POINTS,
    LabelMeDataset,
    LabelMeFile,
    circle_polygon,
    read_labelme,
)
from safe_npy import read_npy
from samples import (  # noqa: F401  (the contract's helpers, as `dataset.X` as before)
    BOX_TOLERANCE,
    IGNORE_LABEL,
    MAX_COORDINATE,
    PhotoDataset,
    SampleDataset,
    coco_input_size,
    image_to_rgb8,
    padded_size,
    preprocess,
    resize_image,
    resize_masks,
    without_augment,
)

# --------------------------------------------------------------------------------------------
# Config: constants of the hand-out
# --------------------------------------------------------------------------------------------

CIS680_INPUT_SIZE = (800, 1066)  # hand-out resize target, padded to 800 x 1088
MASK_CHECK_CHUNK = 256  # masks read at a time when BuildDataset checks that none is empty
# Least IoU between a CIS680 mask's tight box and the box stored for it, both grown by
# BOX_TOLERANCE on every side. A mask and its own box describe one object and nearly coincide:
# coco128 converted by `coco_to_cis680` has IoU >= 0.60 (0.71 grown; tiny objects, whose json
# box edges fall between pixels after the 300 x 400 letterbox, are the lowest; the growth keeps
# 1-3 pixel objects clear of the bound), the built-in data 1.0. A mask that slid by one row to
# the next instance or image lies on another object: IoU >= 0.5 for under 2 % of such rows in
# both sets. 0.5 is also the usual "same object" bound of detection matching (VOC, COCO AP50).
MASK_BOX_MIN_IOU = 0.5

# --------------------------------------------------------------------------------------------
# Pure functions: letterbox, splits
# --------------------------------------------------------------------------------------------


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


def _box_text(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in np.round(box.astype(np.float64), 1)) + "]"


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


class BuildDataset(SampleDataset):
    """The hand-out's data set over CIS680 files, in the sample contract (`samples.py`).

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
        self._set_indices(indices, self.num_images, img_path)

    # -- construction-time checks -----------------------------------------------------------
    def _per_image_entries(self, path: Path, field: str) -> list[np.ndarray]:
        """The entries of the labels or bboxes file, checked to be one per image."""
        items = _load_object_npy(path, field)
        if len(items) != self.num_images:
            raise _fail(
                path,
                field,
                f"cover {len(items)} images",
                f"{self.num_images}, the number of images in {self.paths['img']}",
            )
        return items

    def _load_labels(self, path: Path) -> list[np.ndarray]:
        items = self._per_image_entries(path, "labels")
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
        items = self._per_image_entries(path, "bboxes")
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
        mask_boxes = masks_to_boxes(binary)  # (n, 4); an empty mask gives (0, 0, 0, 0)
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

    def file_name(self, i: int) -> str:
        return f"{self.paths['img']}#{self.indices[i]}"

    def resized_size(self, orig_size: tuple[int, int]) -> tuple[int, int]:
        return self.size


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


def build_datasets(
    data: str | Path,
    coco_images: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    split: Any = None,
    augment: bool | Callable | None = True,
    **source_options: Any,
) -> tuple[SampleDataset, SampleDataset]:
    """(train_set, val_set) for a CIS680 prefix, a COCO json (a path ending in .json, with
    coco_images its image folder) or a folder of LabelMe json files, opened by `open_dataset`
    with source_options (its size, pad_to, short_side, max_side, cis680_classes, drop_empty).
    The split (see `resolve_split`: None gives the seeded 80/20 split) runs over all images of
    the source; augment (True: `TrainAugment()`, or any callable) applies to the training part
    only. A training split whose images hold no object at all is a DataError naming `data`.
    """
    if augment is True:
        augment = TrainAugment()
    augment = augment or None
    full = open_dataset(data, coco_images, **source_options)
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


# A split that holds out every image (nothing to train on): to evaluate a model on all of it.
EVERY_IMAGE_HELD_OUT = ((), None)


def build_data(cfg: Config, split: Any = None):
    """(train_set, val_set) for the configured data; augmentation on the training part only.
    split: a `resolve_split` spec that replaces the config's (e.g. `EVERY_IMAGE_HELD_OUT`)."""
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
        split=split if split is not None else (cfg.split_file or None),
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
        self.augment = dataset.augment
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
