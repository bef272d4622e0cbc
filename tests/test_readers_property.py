"""Property-based test of the data readers (issue #19): random and mutated inputs are either
valid samples or one `dataset.DataError`, never another exception, never a hang.

Hypothesis writes small COCO json files (with their PNG images), LabelMe json files (images on
disk or embedded) and CIS680 file sets (`dataset.write_cis680`, then the arrays mutated: wrong
dtypes, shapes, counts, NaN, negative, huge, empty) into a temporary folder and reads them with
the public readers (`CocoDataset`, `LabelMeDataset`, `BuildDataset`, `build_datasets`); every
item is read and checked against the output contract of dataset.py's docstring. Each example
runs under a wall-clock alarm (a hang fails the test) and hypothesis' deadline.
Run: python -m pytest -q tests/test_readers_property.py (CPU, well under a minute).
Shapes: N instances, H x W padded input, h0 x w0 source image.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image
from pycocotools import mask as mask_utils

import dataset as D

SHORT, LONG, PAD = 16, 24, 8  # COCO / LabelMe resize (short side, long-side cap) and padding
CIS_SIZE = (12, 16)  # CIS680 resize target
CIS_FRAME = (6, 8)  # CIS680 source image size (h0, w0)
HANG_S = 10  # wall-clock seconds one example may take before it counts as a hang
SETTINGS = settings(
    max_examples=150,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# One intra-op thread for every test here (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@contextlib.contextmanager
def no_hang(seconds: float = HANG_S):
    """Raise TimeoutError in the reader when it runs longer than `seconds` (a hang)."""

    def alarm(signum, frame):
        raise TimeoutError(f"reader still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# The output contract and reading every item
# --------------------------------------------------------------------------------------------


def check_sample(sample: tuple, num_classes: int, pad_to: int) -> None:
    """The contract of dataset.py's docstring for one item."""
    img, labels, masks, boxes, meta = sample
    assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
    _, H, W = img.shape
    assert H % pad_to == 0 and W % pad_to == 0 and torch.isfinite(img).all()
    N = len(labels)
    assert labels.dtype == torch.int64 and labels.shape == (N,)
    assert masks.dtype == torch.uint8 and masks.shape == (N, H, W)
    assert boxes.dtype == torch.float32 and boxes.shape == (N, 4)
    h, w = meta["input_size"]
    assert 1 <= h <= H and 1 <= w <= W and isinstance(meta["image_id"], int)
    assert len(meta["orig_size"]) == 2 and isinstance(meta["file_name"], str)
    if N:
        assert labels.min() >= 1 and labels.max() <= num_classes
        assert masks.max() <= 1 and masks.flatten(1).any(dim=1).all()  # binary, non-empty
        assert torch.isfinite(boxes).all()
        x1, y1, x2, y2 = boxes.unbind(1)
        assert (0 <= x1).all() and (x1 < x2).all() and (x2 <= w).all()
        assert (0 <= y1).all() and (y1 < y2).all() and (y2 <= h).all()


def check_ignore(data, i: int) -> None:
    region = data.ignore_mask(i) if hasattr(data, "ignore_mask") else None
    if region is not None:
        h0, w0 = data.raw(i)[0].shape[1:]
        assert region.dtype == np.uint8 and region.shape == (h0, w0)
        assert region.max() == 1 and region.min() == 0 or region.all()


def read_everything(make, pad_to: int) -> str:
    """Build the data set(s) with make() and read every item: "read", or "refused" on a
    DataError. Any other exception, or a broken contract, fails the test."""
    with warnings.catch_warnings(), no_hang():
        warnings.simplefilter("ignore")  # empty masks and dropped categories warn
        try:
            made = make()
            for data in made if isinstance(made, tuple) else (made,):
                for i in range(len(data)):
                    check_sample(data[i], len(data.class_names), pad_to)
                    check_ignore(data, i)
        except D.DataError as exc:
            assert str(exc).strip() and "\n" not in str(exc)  # one line
            note(f"refused: {str(exc).split(';')[0].split(': ', 1)[-1][:40]}")
            return "refused"
    note("read")
    return "read"


def note(outcome: str) -> None:
    """Count outcomes for `pytest --hypothesis-show-statistics`."""
    if currently_in_test_context():
        event(outcome)


# --------------------------------------------------------------------------------------------
# Random json values and mutations of a json tree
# --------------------------------------------------------------------------------------------

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4)
    | st.sampled_from(["", "a\x00b", "../x", "_background_", "__ignore__"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=4,
)


def tree_paths(node, path=()) -> list[tuple]:
    """Every path (keys and list indices) into a json tree, the root () included."""
    paths = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            paths += tree_paths(value, (*path, key))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            paths += tree_paths(value, (*path, k))
    return paths


def mutate(data, tree):
    """0-3 random edits of a json tree (replace a value by junk, delete it, or change a
    number: negate, scale, shift, NaN); returns the new tree."""
    for _ in range(data.draw(st.integers(0, 3), label="edits")):
        paths = tree_paths(tree)
        path = paths[data.draw(st.integers(0, len(paths) - 1), label="where")]
        if not path:
            tree = data.draw(junk, label="root")
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key, value = path[-1], parent[path[-1]]
        edit = data.draw(st.sampled_from(["junk", "delete", "number"]), label="edit")
        if edit == "delete":
            del parent[key]
        elif edit == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = data.draw(
                st.sampled_from([-value, value * 1000, value + 0.5, float("nan"), 1e300, 0])
            )
        else:
            parent[key] = data.draw(junk, label="value")
    return tree


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def small_image(draw) -> np.ndarray:
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 3))
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image if draw(st.booleans()) else image[..., 0]  # RGB or grayscale


def corrupt(data, payload: bytes) -> bytes:
    """The image bytes, or (rarely) cut short or with a byte changed."""
    how = data.draw(st.sampled_from(["keep"] * 6 + ["cut", "flip"]), label="image bytes")
    if how == "cut":
        return payload[: data.draw(st.integers(0, len(payload) - 1))]
    if how == "flip":
        k = data.draw(st.integers(0, len(payload) - 1))
        return payload[:k] + bytes([payload[k] ^ 0xFF]) + payload[k + 1 :]
    return payload


# --------------------------------------------------------------------------------------------
# COCO json
# --------------------------------------------------------------------------------------------

CATEGORY_NAMES = ["person", "cat", "dog", "kite", "_background_", "__ignore__"]


@st.composite
def coco_annotation(draw, image_id: int, h: int, w: int, cat_ids: list[int]) -> dict:
    kind = draw(st.sampled_from(["polygon", "rle", "rle_list"]))
    if kind == "polygon":
        n = draw(st.integers(2, 6))
        xy = draw(st.lists(st.floats(-2, max(w, h) + 2), min_size=2 * n, max_size=2 * n))
        segm: object = [xy]
    else:
        bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
        mask = np.asfortranarray(np.array(bits, dtype=np.uint8).reshape(h, w))
        rle = mask_utils.encode(mask)
        if kind == "rle":
            segm = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        else:
            flat = mask.flatten(order="F")
            change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
            counts = np.diff(np.concatenate([[0], change])).tolist()
            segm = {"size": [h, w], "counts": [int(c) for c in counts]}
    ann = {
        "image_id": image_id,
        "category_id": draw(st.sampled_from(cat_ids)),
        "segmentation": segm,
        "iscrowd": draw(st.sampled_from([0, 0, 0, 1])),
    }
    if draw(st.booleans()):
        x, y = draw(st.floats(0, w)), draw(st.floats(0, h))
        ann["bbox"] = [x, y, draw(st.floats(0, w - x)), draw(st.floats(0, h - y))]
    return ann


@st.composite
def coco_files(draw):
    """(json tree, {file name: image bytes}) of a valid COCO-format data set."""
    images = draw(st.lists(small_image(), min_size=1, max_size=3))
    names = draw(st.lists(st.sampled_from(CATEGORY_NAMES), min_size=1, max_size=4, unique=True))
    cat_ids = draw(
        st.lists(st.integers(0, 90), min_size=len(names), max_size=len(names), unique=True)
    )
    tree = {"images": [], "categories": [], "annotations": []}
    files = {}
    for k, image in enumerate(images):
        h, w = image.shape[:2]
        tree["images"].append({"id": k + 1, "file_name": f"{k}.png", "height": h, "width": w})
        files[f"{k}.png"] = png_bytes(image)
        for ann in draw(st.lists(coco_annotation(k + 1, h, w, cat_ids), max_size=3)):
            tree["annotations"].append({"id": len(tree["annotations"]), **ann})
    tree["categories"] = [{"id": i, "name": n} for i, n in zip(cat_ids, names, strict=True)]
    return tree, files


def write_coco(folder: Path, tree, files: dict, data) -> Path:
    for name, payload in files.items():
        (folder / name).write_bytes(corrupt(data, payload))
    path = folder / "ann.json"
    path.write_text(json.dumps(tree))
    return path


@SETTINGS
@given(files=coco_files(), data=st.data())
def test_mutated_coco_json_gives_samples_or_a_data_error(files, data):
    tree, images = files
    tree = mutate(data, tree)
    cis680 = data.draw(st.booleans(), label="cis680_classes")
    via_build = data.draw(st.booleans(), label="build_datasets")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_coco(folder, tree, images, data)

        def make():
            if via_build:
                return D.build_datasets(
                    path, folder, size=(SHORT, LONG), pad_to=PAD, cis680_classes=cis680
                )
            return D.CocoDataset(path, folder, SHORT, LONG, PAD, cis680_classes=cis680)

        read_everything(make, PAD)


@settings(SETTINGS, max_examples=40)
@given(content=junk | st.binary(max_size=20).map(lambda b: b.decode("latin-1")))
def test_any_json_file_is_coco_or_a_data_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_text(json.dumps(content) if not isinstance(content, str) else content)
        read_everything(lambda: D.CocoDataset(path, tmp, SHORT, LONG, PAD), PAD)
        read_everything(lambda: D.LabelMeDataset(tmp, SHORT, LONG, PAD), PAD)


# --------------------------------------------------------------------------------------------
# LabelMe folders
# --------------------------------------------------------------------------------------------

SHAPE_POINTS = {"polygon": (3, 6), "rectangle": (2, 2), "circle": (2, 2), "line": (2, 2)}


@st.composite
def labelme_shape(draw, h: int, w: int) -> dict:
    shape_type = draw(st.sampled_from(["polygon", "rectangle", "circle"] * 3 + ["line"]))
    lo, hi = SHAPE_POINTS[shape_type]
    point = st.tuples(st.floats(-2, w + 2), st.floats(-2, h + 2)).map(list)
    return {
        "label": draw(st.sampled_from(["cat", "dog", "__ignore__"])),
        "points": draw(st.lists(point, min_size=lo, max_size=hi)),
        "group_id": draw(st.sampled_from([None, None, 1, 2])),
        "shape_type": shape_type,
        "flags": {},
    }


@st.composite
def labelme_file(draw) -> tuple[dict, bytes, bool]:
    """(json tree, image bytes, embedded) of one LabelMe annotation."""
    image = draw(small_image())
    h, w = image.shape[:2]
    payload = png_bytes(image)
    embed = draw(st.booleans())
    tree = {
        "version": "5.5.0",
        "flags": {},
        "shapes": draw(st.lists(labelme_shape(h, w), min_size=1, max_size=4)),
        "imagePath": "IMAGE",
        "imageData": base64.b64encode(payload).decode("ascii") if embed else None,
        "imageHeight": h,
        "imageWidth": w,
    }
    return tree, payload, embed


@SETTINGS
@given(files=st.lists(labelme_file(), min_size=1, max_size=2), data=st.data())
def test_mutated_labelme_folder_gives_samples_or_a_data_error(files, data):
    via_build = data.draw(st.booleans(), label="build_datasets")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for k, (tree, payload, embed) in enumerate(files):
            tree["imagePath"] = f"{k}.png"
            if not embed:
                (folder / f"{k}.png").write_bytes(corrupt(data, payload))
            (folder / f"{k}.json").write_text(json.dumps(mutate(data, tree)))

        def make():
            if via_build:
                return D.build_datasets(folder, size=(SHORT, LONG), pad_to=PAD)
            return D.LabelMeDataset(folder, SHORT, LONG, PAD)

        read_everything(make, PAD)


# --------------------------------------------------------------------------------------------
# CIS680 file sets
# --------------------------------------------------------------------------------------------


@st.composite
def cis680_samples(draw) -> list[tuple]:
    """1-3 valid samples (image (3, 6, 8), masks, labels 1..3, the masks' boxes)."""
    h, w = CIS_FRAME
    samples = []
    for _ in range(draw(st.integers(1, 3))):
        seed = draw(st.integers(0, 3))
        image = np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)
        n = draw(st.integers(0, 2))
        masks = np.zeros((n, h, w), dtype=np.uint8)
        for m in masks:
            y1, x1 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            m[y1 : draw(st.integers(y1 + 1, h)), x1 : draw(st.integers(x1 + 1, w))] = 1
        labels = np.array(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)), np.int64)
        samples.append((image, masks, labels, D.masks_to_boxes(masks)))
    return samples


BAD_ENTRIES = [
    np.array([np.nan]),
    np.array([0.5, 1.0]),
    np.array([-1.0, 2.0]),
    np.array([1e20]),
    np.array([2**62], dtype=np.int64),
    np.array([True]),
    np.array(["cat"]),
    np.zeros((0,)),
    np.zeros((0, 4)),
    np.ones((1, 3)),
    np.array([[0.0, 0.0, np.inf, 2.0]]),
    np.array([[-5.0, -5.0, -1.0, -1.0]]),
    np.array([[1.0, 1.0, 1e30, 1e30]]),
    np.array([[3.0, 3.0, 1.0, 1.0]]),
    np.array([[0, 0, 4, 4]], dtype=np.uint8),
    np.array([[1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 5.0, 5.0]]),
    np.array([1, 2, 3]),
]


def mutate_npy(data, path: Path, field: str) -> None:
    """Rewrite a labels / bboxes file: one entry replaced, an entry moved to another image
    (counts shifted, totals equal), entries dropped or added, or a non-object array."""
    items = list(np.load(path, allow_pickle=True))
    edit = data.draw(
        st.sampled_from(["keep", "entry", "shift", "drop", "add", "plain", "scalar"]), label=field
    )
    if edit == "entry":
        items[data.draw(st.integers(0, len(items) - 1))] = data.draw(st.sampled_from(BAD_ENTRIES))
    elif edit == "shift" and len(items) >= 2 and len(items[0]):
        items[1] = np.concatenate([np.asarray(items[1]), np.asarray(items[0])[:1]])
        items[0] = np.asarray(items[0])[1:]
    elif edit == "drop":
        items = items[:-1]
    elif edit == "add":
        items.append(data.draw(st.sampled_from(BAD_ENTRIES)))
    if edit == "plain":
        arr = np.ones((len(items), 4), dtype=data.draw(st.sampled_from(["int64", "float32"])))
    elif edit == "scalar":
        arr = np.array(3)
    else:
        arr = np.empty(len(items), dtype=object)
        for k, item in enumerate(items):
            arr[k] = item
    np.save(path, arr, allow_pickle=True)


def mutate_masks(data, path: Path) -> None:
    """Rewrite the mask file: other dtype, values 2 / NaN / 0.5, an emptied mask, or a row
    more or less."""
    with h5py.File(path, "r") as f:
        masks = f["data"][()]
    edit = data.draw(
        st.sampled_from(
            ["keep", "float", "two", "nan", "half", "empty", "extra", "fewer", "int16"]
        ),
        label="masks",
    )
    if edit in ("float", "nan", "half"):
        masks = masks.astype(np.float32)
        if len(masks) and edit != "float":
            masks[0][masks[0] > 0] = np.nan if edit == "nan" else 0.5
    elif edit == "two" and len(masks):
        masks[0] *= 2
    elif edit == "empty" and len(masks):
        masks[-1] = 0
    elif edit == "extra":
        masks = np.concatenate([masks, np.ones((1, *masks.shape[1:]), masks.dtype)])
    elif edit == "fewer":
        masks = masks[:-1]
    elif edit == "int16":
        masks = masks.astype(np.int16)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=masks)


@SETTINGS
@given(samples=cis680_samples(), data=st.data())
def test_mutated_cis680_files_give_samples_or_a_data_error(samples, data):
    via_build = data.draw(st.booleans(), label="build_datasets")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "solo"
        paths = D.write_cis680(prefix, samples)
        mutate_npy(data, paths["labels"], "labels")
        mutate_npy(data, paths["bboxes"], "bboxes")
        mutate_masks(data, paths["mask"])

        def make():
            if via_build:
                return D.build_datasets(prefix, size=CIS_SIZE, pad_to=PAD)
            return D.BuildDataset(prefix, size=CIS_SIZE, pad_to=PAD)

        read_everything(make, PAD)


# --------------------------------------------------------------------------------------------
# The generators make valid data: without edits every reader reads it
# --------------------------------------------------------------------------------------------


def test_unmutated_inputs_are_read():
    """A fixed example of each generator, unedited, is read (so the properties above test
    readers, not only their refusals)."""
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    rle = mask_utils.encode(np.asfortranarray((image[..., 0] % 2).astype(np.uint8)))
    tree = {
        "images": [{"id": 1, "file_name": "0.png", "height": 6, "width": 8}],
        "categories": [{"id": 0, "name": "_background_"}, {"id": 4, "name": "cat"}],
        "annotations": [
            {"id": 0, "image_id": 1, "category_id": 4, "iscrowd": 0,
             "segmentation": {"size": [6, 8], "counts": rle["counts"].decode("ascii")}},
            {"id": 1, "image_id": 1, "category_id": 4, "iscrowd": 0, "bbox": [1, 1, 4, 3],
             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
        ],
    }  # fmt: skip
    labelme = {
        "shapes": [
            {"label": "cat", "points": [[1, 1], [5, 4]], "shape_type": "rectangle"},
            {"label": "__ignore__", "points": [[4, 3], [6, 3]], "shape_type": "circle"},
        ],
        "imagePath": "0.png",
        "imageHeight": 6,
        "imageWidth": 8,
    }
    mask = np.zeros((1, 6, 8), np.uint8)
    mask[0, 1:4, 2:6] = 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "0.png").write_bytes(png_bytes(image))
        (folder / "ann.json").write_text(json.dumps(tree))
        assert read_everything(lambda: D.CocoDataset(folder / "ann.json", folder), PAD) == "read"
        (folder / "ann.json").rename(folder / "coco.txt")
        (folder / "0.json").write_text(json.dumps(labelme))
        assert read_everything(lambda: D.build_datasets(folder, pad_to=PAD), PAD) == "read"
        sample = (image.transpose(2, 0, 1).copy(), mask, np.array([2]), D.masks_to_boxes(mask))
        D.write_cis680(folder / "solo", [sample, sample])
        made = lambda: D.build_datasets(folder / "solo", size=CIS_SIZE, pad_to=PAD)  # noqa: E731
        assert read_everything(made, PAD) == "read"
