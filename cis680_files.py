"""The CIS680 hand-out's four-file format: its file names and a streaming writer.

    {prefix}_img_comp_zlib.h5     one HDF5 data set (N, 3, 300, 400) uint8, the images;
    {prefix}_mask_comp_zlib.h5    one HDF5 data set (M, 300, 400), every instance mask of
                                  every image, concatenated in image order;
    {prefix}_labels_comp_zlib.npy object array of N int arrays (n_i,), class ids 1..3;
    {prefix}_bboxes_comp_zlib.npy object array of N float arrays (n_i, 4), x1 y1 x2 y2.

`write_cis680` writes such files (the built-in data set, `dataset.coco_to_cis680`);
`dataset.BuildDataset` reads them, with `safe_npy.read_npy` for the two .npy files. Only
numpy and h5py: the generator in synthetic.py writes through this without importing torch.
`CIS680_CLASSES` names the class ids 1..3 for every module that uses them.

Shape legend: N images, M instances of the whole file, n_i instances of image i.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from errors import data_error as _fail

CIS680_IMAGE_SIZE = (300, 400)  # (h, w) of the hand-out's images
CIS680_CLASSES = ("vehicle", "person", "animal")  # class ids 1, 2, 3 (hand-out sec. 4.1)


def cis680_paths(prefix: str | Path) -> dict[str, Path]:
    """The four CIS680 file names of a prefix: keys "img", "mask", "labels", "bboxes"."""
    prefix = str(prefix)
    return {
        "img": Path(f"{prefix}_img_comp_zlib.h5"),
        "mask": Path(f"{prefix}_mask_comp_zlib.h5"),
        "labels": Path(f"{prefix}_labels_comp_zlib.npy"),
        "bboxes": Path(f"{prefix}_bboxes_comp_zlib.npy"),
    }


def _check_sample(
    i: int, image: Any, masks: Any, labels: Any, boxes: Any, frame: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate one writer sample and convert it to the stored dtypes."""
    where = f"write_cis680 sample {i}"
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != np.uint8:
        raise _fail(where, "image", f"is {image.dtype} {image.shape}", "uint8 (3, H, W)")
    if frame is not None and image.shape[1:] != frame:
        raise _fail(where, "image", f"has size {image.shape[1:]}", f"{frame} like sample 0")
    masks = np.asarray(masks)
    labels = np.asarray(labels).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(labels)
    if masks.shape != (n, *image.shape[1:]):
        raise _fail(where, "masks", f"have shape {masks.shape}", f"({n}, *image size)")
    if len(boxes) != n:
        raise _fail(where, "boxes", f"hold {len(boxes)} boxes", f"{n}, one per label")
    if masks.dtype.kind not in "biuf":
        raise _fail(where, "masks", f"have dtype {masks.dtype}", "uint8 or bool")
    binary = masks.dtype.kind == "b" or (masks.dtype.kind == "u" and masks.max(initial=0) <= 1)
    if masks.size and not binary and not np.isin(masks, (0, 1)).all():
        raise _fail(where, "masks", "hold values other than 0 and 1", "binary masks")
    if n and (labels.dtype.kind not in "iu" or labels.min() < 1):
        raise _fail(where, "labels", f"are {labels.tolist()}", "integer class ids >= 1")
    return image, masks.astype(np.uint8), labels.astype(np.int64), boxes


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)  # 1-D even when every entry has the same shape
    for i, item in enumerate(items):
        out[i] = item
    return out


def write_cis680(
    prefix: str | Path,
    samples: Iterable[tuple[Any, Any, Any, Any]],
    num_images: int | None = None,
) -> dict[str, Path]:
    """Write samples as the four CIS680 files of `prefix` (streamed, one image at a time).

    samples: iterable of (image uint8 (3, 300, 400), masks (N, 300, 400) {0, 1}, labels int
    (N,), boxes float (N, 4) x1 y1 x2 y2); any image size works if all images share it.
    num_images: the expected count, used to preallocate; at most that many samples are taken.
    Files are written under temporary names and renamed at the end, so an interrupted write
    leaves no half-written set. Returns {"img", "mask", "labels", "bboxes"} -> Path.
    """
    paths = cis680_paths(prefix)
    tmp = {key: p.with_name(f"{p.name}.{os.getpid()}.partial") for key, p in paths.items()}
    paths["img"].parent.mkdir(parents=True, exist_ok=True)
    label_list: list[np.ndarray] = []
    box_list: list[np.ndarray] = []
    img_file = h5py.File(tmp["img"], "w")
    mask_file = h5py.File(tmp["mask"], "w")
    try:
        img_ds = mask_ds = None
        frame = None
        num_masks = 0
        for i, sample in enumerate(samples):
            if num_images is not None and i >= num_images:
                break
            image, masks, labels, boxes = _check_sample(i, *sample, frame=frame)
            if img_ds is None:
                frame = tuple(image.shape[1:])
                img_ds, mask_ds = _create_h5_sets(img_file, mask_file, frame, num_images or 0)
            if i >= img_ds.shape[0]:
                img_ds.resize(i + 1, axis=0)
            img_ds[i] = image
            if len(masks):
                mask_ds.resize(num_masks + len(masks), axis=0)
                mask_ds[num_masks:] = masks
                num_masks += len(masks)
            label_list.append(labels)
            box_list.append(boxes)
        if img_ds is None:
            img_ds, mask_ds = _create_h5_sets(img_file, mask_file, CIS680_IMAGE_SIZE, 0)
        img_ds.resize(len(label_list), axis=0)  # fewer samples than num_images
        img_file.close()
        mask_file.close()
        with open(tmp["labels"], "wb") as f:
            np.save(f, _object_array(label_list), allow_pickle=True)
        with open(tmp["bboxes"], "wb") as f:
            np.save(f, _object_array(box_list), allow_pickle=True)
        for key in paths:
            os.replace(tmp[key], paths[key])
    except BaseException:
        img_file.close()
        mask_file.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    return paths


def _create_h5_sets(img_file, mask_file, frame, num_images):
    h, w = frame
    img_ds = img_file.create_dataset(
        "data",
        shape=(num_images, 3, h, w),
        maxshape=(None, 3, h, w),
        dtype=np.uint8,
        chunks=(1, 3, h, w),
        compression="gzip",
    )
    mask_ds = mask_file.create_dataset(
        "data",
        shape=(0, h, w),
        maxshape=(None, h, w),
        dtype=np.uint8,
        chunks=(1, h, w),
        compression="gzip",
    )
    return img_ds, mask_ds
