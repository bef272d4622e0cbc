"""The sample contract every data set keeps, and the preprocessing that makes a sample.

`SampleDataset` is the base of every reader (CIS680 files: `dataset.BuildDataset`; COCO json:
`coco_data.CocoDataset`; LabelMe folders: `labelme_data.LabelMeDataset`; plain image files:
`main_infer.ImageFiles`); its docstring states the contract once, and training, evaluation and
the export rely on it alone. `PhotoDataset` adds what the readers of photos at their own sizes
share. The free functions turn a raw image and its instances into a sample (`preprocess`: the
hand-out's resize, normalisation and padding) and decode a picture file (`image_to_rgb8`).
Nothing here runs on its own; `dataset.py` picks a reader and `tests/test_samples.py` checks
the base on a hand-built reader.

Shape legend: N instances of one image, C classes without background, H x W padded input,
h x w resized input before padding, h0 x w0 source.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from conventions import IMAGENET_MEAN, IMAGENET_STD
from errors import data_error as _fail

# --------------------------------------------------------------------------------------------
# Config: limits every reader applies
# --------------------------------------------------------------------------------------------

BOX_TOLERANCE = 1.0  # pixels a stored box may reach past the image border before it is an error
# LabelMe's ignore convention (its instance-segmentation example): shapes with this label are
# regions where a detection is neither a true nor a false positive, as COCO's crowd regions.
IGNORE_LABEL = "__ignore__"
# Largest |coordinate| of a polygon or shape point, pixels: the polygon rasteriser's work and
# memory grow with the coordinates (a circle of radius 1e12 would never finish).
MAX_COORDINATE = 100_000


# --------------------------------------------------------------------------------------------
# Pure functions: resizing, preprocessing, decoding
# --------------------------------------------------------------------------------------------


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


def is_number(v: Any) -> bool:
    """A finite json number (bool is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v: Any) -> bool:
    """A json integer (bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_file(path: Path) -> bool:
    """Path.is_file, False for a name no file can have (a NUL byte, too long)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Modules: the data set base classes
# --------------------------------------------------------------------------------------------


class SampleDataset(Dataset):
    """The sample contract (the project's stable interface; other modules rely on it alone).

    An item `self[i]` is a 5-tuple `(img, labels, masks, boxes, meta)`:
      img     float32 (3, H, W)  scaled to [0, 1], resized (bilinear `F.interpolate`), normalised
                                 with IMAGENET_MEAN / IMAGENET_STD, zero-padded at the
                                 bottom/right to H x W, multiples of `pad_to` (CIS680 default:
                                 800 x 1066 resize, 800 x 1088 padded, as the hand-out asks).
      labels  int64 (N,)         class ids 1..C (0 is background and never appears).
      masks   uint8 (N, H, W)    values {0, 1}, same padded frame as img.
      boxes   float32 (N, 4)     x1 y1 x2 y2 in padded-input pixels (`conventions.py`).
      meta    dict               "image_id" int (`image_id(i)`), "orig_size" (h0, w0),
                                 "input_size" (h, w) of the resized image before padding,
                                 "scale" (sy, sx) with h = round(h0 * sy), w = round(w0 * sx),
                                 "file_name" str (the image file, or "<h5 file>#<index>");
                                 augmented samples add "augment".
    N may be 0: labels (0,), masks (0, H, W), boxes (0, 4).

    Besides the items, every data set has:
      class_names          tuple of the C names of ids 1..C (CIS680: vehicle, person, animal).
      indices              list of the items' positions in the source (all of it, or a split).
      augment              None or a callable applied to each preprocessed sample.
      raw(i)               item i before preprocessing, numpy: image uint8 (3, h0, w0), masks
                           uint8 (N, h0, w0), labels int64 (N,), boxes float32 (N, 4) source
                           pixels.
      num_instances(i)     item i's N from the annotations alone (no image read).
      subset(items, augment)  some items (positions) as a data set of their own, nothing read
                           again; len(ds) items in all.
      image_ids            meta["image_id"] of every item (the source's ids, e.g. COCO's, or
                           the positions `indices`).
      ignore_mask(i)       item i's ignore regions, uint8 (h0, w0), or None (the default):
                           scored as crowd regions, never a training target.
      json_ground_truth()  the source's own COCO ground truth to score against, in the
                           category ids `label_to_cat_id[label]` (an attribute of such a
                           reader); None (the default): evaluation builds the truth from the
                           masks (`evaluation.build_coco_gt`).
    Bad data raises `errors.DataError` naming the file and the field, where it enters.

    A reader sets class_names, pad_to, augment and indices (`_set_indices`) in its __init__
    and defines raw, num_instances, file_name and resized_size; __getitem__ here makes the
    sample from them. What a copy must not share (BuildDataset: its open HDF5 files) it drops
    in `__getstate__`, which copy.copy (`subset`, `without_augment`) and the pickling to
    DataLoader workers both go through.
    """

    class_names: tuple[str, ...] = ()
    augment: Callable | None = None
    pad_to: int | None
    indices: list[int]

    def _set_indices(self, indices: Sequence[int] | None, n: int, where: Any) -> None:
        """indices (None: all n items of the source), checked to lie in 0..n - 1."""
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise _fail(where, "indices", f"include {bad[:5]}", f"0..{n - 1}")

    # -- what a reader defines ----------------------------------------------------------------
    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Item i before preprocessing: image, masks, labels, boxes (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not define raw")

    def num_instances(self, i: int) -> int:
        """Number of instances of item i, from the annotations (no image read)."""
        raise NotImplementedError(f"{type(self).__name__} does not define num_instances")

    def file_name(self, i: int) -> str:
        """meta["file_name"] of item i."""
        raise NotImplementedError(f"{type(self).__name__} does not define file_name")

    def resized_size(self, orig_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) an image of size (h0, w0) is resized to before padding."""
        raise NotImplementedError(f"{type(self).__name__} does not define resized_size")

    # -- what the contract adds, with its defaults ------------------------------------------
    def image_id(self, i: int) -> int:
        """meta["image_id"] of item i: its position in the source."""
        return int(self.indices[i])

    @property
    def image_ids(self) -> list[int]:
        return [self.image_id(i) for i in range(len(self))]

    def ignore_mask(self, i: int) -> np.ndarray | None:
        """Item i's ignore regions at the original size, uint8 (h0, w0) {0, 1}; None: none."""
        return None

    def json_ground_truth(self) -> COCO | None:
        """The source's own COCO ground truth (see the class docstring); None: none."""
        return None

    # -- items ------------------------------------------------------------------------------
    def subset(self, items: Sequence[int], augment: Callable | None = None) -> SampleDataset:
        """A data set of some of this one's items (positions in it), with its own augment;
        the files are not read again."""
        new = copy.copy(self)  # through __getstate__: e.g. no open file is shared
        new.indices = [self.indices[int(i)] for i in items]
        new.augment = augment
        return new

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, masks, labels, boxes = self.raw(i)
        img, masks_t, boxes_t, parts = preprocess(
            torch.from_numpy(image),
            torch.from_numpy(masks),
            torch.from_numpy(boxes),
            self.resized_size(tuple(image.shape[1:])),
            self.pad_to,
        )
        meta = {"image_id": self.image_id(i), **parts, "file_name": self.file_name(i)}
        sample = (img, torch.from_numpy(labels), masks_t, boxes_t, meta)
        return self.augment(sample) if self.augment is not None else sample


class PhotoDataset(SampleDataset):
    """Photos at their own sizes (COCO json, LabelMe folders, plain image files): each is
    resized with its aspect kept, short side to `short_side` unless the long side would pass
    `max_side` (`coco_input_size`), then padded to multiples of `pad_to`. An instance whose
    mask comes out empty is left out of the targets with one warning per data set
    (`_warn_once`; a subset warns anew). A reader sets short_side, max_side and `_warned`
    (an empty set) in its __init__."""

    short_side: int
    max_side: int
    _warned: set

    def resized_size(self, orig_size: tuple[int, int]) -> tuple[int, int]:
        return coco_input_size(orig_size, self.short_side, self.max_side)

    def subset(self, items: Sequence[int], augment: Callable | None = None) -> PhotoDataset:
        new = super().subset(items, augment)
        new._warned = set()
        return new

    def _warn_once(self, key: Any, message: str) -> None:
        """warnings.warn(message) the first time this data set meets `key`, pointing at the
        caller of the method that calls this one (`raw`)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def without_augment(dataset: SampleDataset) -> SampleDataset:
    """A shallow copy of `dataset` that reads its samples without augmentation; the files are
    not read again."""
    plain = copy.copy(dataset)
    plain.augment = None
    return plain
