"""Tests of issue #19's bad files (cases 4, 5, 7 and 13): CIS680 .npy files that are only data,
16-bit images decoded to 8 bits, mask counts shifted between images, truncated .npy files.

Every bad file is built here in tmp_path, with an answer known in advance: the DataError
names the file and the problem, a pickle that would create a marker file leaves none, a
16-bit ramp 0 / 32768 / 65535 reads as 0 / 128 / 255. Run: python -m pytest -q
tests/test_bad_files.py (CPU, a few seconds). Shapes: N instances, h0 x w0 source image.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import pickletools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conventions
import dataset as D
import main_infer
import synthetic

H0, W0 = 60, 80  # CIS680 test image size (any size works when all images share it)
RAMP16 = np.array([[0, 32768, 65535], [65535, 32768, 0]], dtype=np.uint16)  # (2, 3)
RAMP8 = np.array([[0, 128, 255], [255, 128, 0]], dtype=np.uint8)  # round(v * 255 / 65535)


# One intra-op thread for every test here (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_samples(counts: list[int]) -> list[tuple]:
    """CIS680 samples of H0 x W0: image i has counts[i] disjoint rectangles, instance k at
    columns 4 + 18k + i .. 16 + 18k + i and rows 4 + 12k .. 12 + 12k (boxes = tight boxes)."""
    rng = np.random.default_rng(0)
    samples = []
    for i, n in enumerate(counts):
        image = rng.integers(0, 256, (3, H0, W0), dtype=np.uint8)
        rects = [(4 + 18 * k + i, 4 + 12 * k, 16 + 18 * k + i, 12 + 12 * k) for k in range(n)]
        masks = np.zeros((n, H0, W0), dtype=np.uint8)
        for k, (x1, y1, x2, y2) in enumerate(rects):
            masks[k, y1:y2, x1:x2] = 1
        labels = np.array([k % 3 + 1 for k in range(n)], dtype=np.int64)
        samples.append((image, masks, labels, np.array(rects, np.float32).reshape(-1, 4)))
    return samples


@pytest.fixture
def cis680(tmp_path):
    """A CIS680 set of 3 images with 2, 2, 1 instances: (prefix, paths, samples)."""
    samples = make_samples([2, 2, 1])
    prefix = tmp_path / "set" / "solo"
    paths = D.write_cis680(prefix, samples)
    return prefix, paths, samples


def save_object_npy(path: Path, items: list) -> None:
    """What the hand-out (and write_cis680) stores: a 1-D object array, pickled by np.save."""
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    np.save(path, arr, allow_pickle=True)


def pickle_globals(path: Path) -> set[str]:
    """The globals a .npy file's pickle refers to, read with pickletools (nothing is run):
    GLOBAL names them itself, STACK_GLOBAL takes the last two values pushed, which may come
    from the memo."""
    data = path.read_bytes()
    f = io.BytesIO(data)
    np.lib.format.read_magic(f)
    np.lib.format.read_array_header_1_0(f)
    names: set[str] = set()
    pushed: list = []  # values pushed, strings kept (a coarse model of the pickle's stack)
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(data[f.tell() :]):
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif op.name.endswith("PUT"):
            memo[arg] = pushed[-1]
        elif op.name.endswith("GET"):
            pushed.append(memo[arg])
        elif op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
            pushed.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(f"{pushed[-2]}.{pushed[-1]}")
        else:
            pushed.append(arg if isinstance(arg, str) else None)
    return names


class OpenFile:
    """Pickles as builtins.open(path, "w"): unpickling it creates the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


class RunShell:
    """Pickles as os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def assert_names(excinfo, path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


def png_rgb16(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, bit depth 16) of uint16 (h, w, 3), written by hand:
    PIL cannot write one."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------------
# Case 4: labels / bboxes .npy files are data, never code
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["open", "system"])
def test_case_04_npy_whose_pickle_runs_code_is_refused(cis680, tmp_path, kind):
    prefix, paths, samples = cis680
    marker = tmp_path / "MARKER"
    evil = OpenFile(marker) if kind == "open" else RunShell(f"touch {marker}")
    labels = [s[2] for s in samples]
    save_object_npy(paths["labels"], [evil, *labels[1:]])
    target = (
        f"{builtins.open.__module__}.open" if kind == "open" else f"{os.system.__module__}.system"
    )
    assert target in pickle_globals(paths["labels"])  # the file really carries the call
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, paths["labels"], target, "refused")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # nothing else was created


def test_case_04_handout_files_load_as_written(cis680):
    prefix, paths, samples = cis680
    assert pickle_globals(paths["labels"]) <= {
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
    }
    ds = D.BuildDataset(prefix)
    for i, (_, _, labels, boxes) in enumerate(samples):
        assert ds.labels[i].dtype == np.int64 and ds.labels[i].tolist() == labels.tolist()
        np.testing.assert_array_equal(ds.boxes[i], boxes)


def test_case_04_numpy1_protocol2_files_load(cis680):
    """numpy < 1.17 wrote protocol 2 (bytes as _codecs.encode, empty bytes as bytes()) under
    the module name numpy.core: the hand-out's files may be such."""
    prefix, paths, samples = cis680
    for key, column in (("labels", 2), ("bboxes", 3)):
        arr = np.empty(len(samples), dtype=object)
        for i, sample in enumerate(samples):
            arr[i] = sample[column]
        arr[2] = arr[2][:0] if key == "labels" else arr[2]  # an empty entry: bytes()
        with open(paths[key], "wb") as f:
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
            pickle.dump(arr, f, protocol=2)
        data = paths[key].read_bytes()
        paths[key].write_bytes(
            data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        )
        assert "numpy.core.multiarray._reconstruct" in pickle_globals(paths[key])
    items = D._load_object_npy(paths["labels"], "labels")
    assert [x.tolist() for x in items] == [[1, 2], [1, 2], []]
    boxes = D._load_object_npy(paths["bboxes"], "bboxes")
    for item, sample in zip(boxes, samples, strict=True):
        np.testing.assert_array_equal(item, sample[3])
        assert item.dtype == np.float32


def test_case_04_plain_numeric_npy_files_still_load(tmp_path):
    """Images with one instance each: labels (N, 1) int and boxes (N, 1, 4) float arrays saved
    without pickle (the rows are the per-image entries)."""
    samples = make_samples([1, 1, 1])
    prefix = tmp_path / "solo"
    paths = D.write_cis680(prefix, samples)
    np.save(paths["labels"], np.stack([s[2] for s in samples]), allow_pickle=False)  # (3, 1)
    np.save(paths["bboxes"], np.stack([s[3] for s in samples]), allow_pickle=False)  # (3, 1, 4)
    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    np.save(tmp_path / "f.npy", fortran)
    np.testing.assert_array_equal(D.read_npy(tmp_path / "f.npy", "x"), fortran)
    ds = D.BuildDataset(prefix)
    assert [lab.tolist() for lab in ds.labels] == [[1], [1], [1]]
    np.testing.assert_array_equal(ds.boxes[2], samples[2][3])


def test_case_04_entries_that_are_not_numeric_arrays_are_refused(cis680):
    prefix, paths, samples = cis680
    labels = [s[2] for s in samples]
    save_object_npy(paths["labels"], [labels[0], np.array(["cat"]), labels[2]])
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, paths["labels"], "'U3'", "numeric")
    save_object_npy(paths["labels"], [labels[0], [1, 2], labels[2]])  # a list, not an array
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, paths["labels"], "list")


def test_case_04_pickle_with_a_huge_memo_index_is_refused_at_once(cis680):
    """LONG_BINPUT 2**31 - 1 would make CPython's unpickler allocate a 16 GiB memo."""
    prefix, paths, _ = cis680
    with open(paths["labels"], "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": (3,)}
        )
        f.write(b"\x80\x04N" + b"r" + struct.pack("<I", 2**31 - 1) + b".")
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, paths["labels"], "memo index 2147483647")


# --------------------------------------------------------------------------------------------
# Case 13: truncated and garbage .npy files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["labels", "bboxes"])
def test_case_13_truncated_object_npy_names_the_file(cis680, key):
    prefix, paths, _ = cis680
    data = paths[key].read_bytes()
    paths[key].write_bytes(data[: len(data) - 30])  # header intact, pickle cut
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, paths[key], "could not be read: truncated")
    assert not isinstance(excinfo.value, pickle.UnpicklingError)


def test_case_13_truncated_numeric_npy_names_the_file(tmp_path):
    samples = make_samples([1, 1, 1])
    paths = D.write_cis680(tmp_path / "solo", samples)
    np.save(paths["bboxes"], np.stack([s[3] for s in samples]), allow_pickle=False)
    data = paths["bboxes"].read_bytes()
    paths["bboxes"].write_bytes(data[:-8])
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(tmp_path / "solo")
    assert_names(excinfo, paths["bboxes"], "truncated", "promises 48 bytes", "holds 40")


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(200), b"\x93NUMPY\x01\x00", b"\x93NUMPY\x01\x00\x20\x00{'descr': '|O'"],
    ids=["empty", "random", "magic-only", "cut-header"],
)
def test_case_13_garbage_npy_names_the_file(cis680, content):
    prefix, paths, _ = cis680
    paths["labels"].write_bytes(content)
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    assert_names(excinfo, paths["labels"], "could not be read")


# --------------------------------------------------------------------------------------------
# Case 5: 16-bit images become 8-bit images, not white ones
# --------------------------------------------------------------------------------------------


def write_gray16(path: Path) -> None:
    Image.fromarray(RAMP16).save(path)  # a 16-bit grayscale PNG (PIL mode I;16)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        assert np.asarray(im.convert("RGB"))[0, 1, 0] == 255  # what PIL alone makes of 32768


def test_case_05_16bit_png_through_coco_labelme_and_image_files(tmp_path):
    write_gray16(tmp_path / "ramp.png")
    coco = {
        "images": [{"id": 1, "file_name": "ramp.png", "height": 2, "width": 3}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [[0, 0, 3, 0, 3, 2, 0, 2]],
                "area": 6.0,
                "bbox": [0, 0, 3, 2],
                "iscrowd": 0,
            }
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    coco_image = D.CocoDataset(tmp_path / "ann.json", tmp_path).raw(0)[0]
    labelme = tmp_path / "labelme"
    labelme.mkdir()
    (labelme / "ramp.png").write_bytes((tmp_path / "ramp.png").read_bytes())
    shape = {"label": "thing", "points": [[0, 0], [3, 0], [3, 2]], "shape_type": "polygon"}
    content = {"shapes": [shape], "imagePath": "ramp.png", "imageHeight": 2, "imageWidth": 3}
    (labelme / "ramp.json").write_text(json.dumps(content))
    labelme_image = D.LabelMeDataset(labelme).raw(0)[0]
    files_image = main_infer.ImageFiles([tmp_path / "ramp.png"], (800, 1333), 32).load(0).numpy()
    for image in (coco_image, labelme_image, files_image):
        assert image.dtype == np.uint8 and image.shape == (3, 2, 3)
        for channel in image:
            np.testing.assert_array_equal(channel, RAMP8)


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16B", RAMP16, RAMP8),
        ("I", RAMP16.astype(np.int32), RAMP8),
        ("F", RAMP16.astype(np.float32) / 65535, RAMP8),  # [0, 1]
        ("F", np.array([[0, 127.6, 255]], np.float32), np.array([[0, 128, 255]])),  # [0, 255]
        ("L", RAMP8, RAMP8),  # 8-bit modes as before
    ],
)
def test_case_05_modes_scaled_to_8_bits(mode, values, expected):
    h, w = values.shape
    raw = values.astype(">u2").tobytes() if mode == "I;16B" else values.tobytes()
    image = Image.frombytes(mode, (w, h), raw)
    out = D.image_to_rgb8(image, "x.tif")
    assert out.dtype == np.uint8 and out.shape == (3, h, w)
    for channel in out:
        np.testing.assert_array_equal(channel, expected)


def test_case_05_16bit_rgb_png_is_not_white(tmp_path):
    rgb = np.zeros((1, 3, 3), dtype=np.uint16)
    rgb[0, :, 0] = RAMP16[0]
    rgb[0, :, 1] = 65535 - RAMP16[0]
    (tmp_path / "rgb16.png").write_bytes(png_rgb16(rgb))
    with Image.open(tmp_path / "rgb16.png") as im:
        out = D.image_to_rgb8(im, tmp_path / "rgb16.png")
    np.testing.assert_array_equal(out[0, 0], [0, 128, 255])
    np.testing.assert_array_equal(out[1, 0], [255, 127, 0])  # PIL keeps the high byte
    np.testing.assert_array_equal(out[2, 0], [0, 0, 0])


@pytest.mark.parametrize(
    "mode, values, words",
    [
        ("I", np.array([[0, 70000]], np.int32), "0..70000"),
        ("I", np.array([[-1, 5]], np.int32), "-1..5"),
        ("F", np.array([[0, 300.5]], np.float32), "0..300.5"),
        ("F", np.array([[0, np.nan]], np.float32), "NaN"),
    ],
)
def test_case_05_values_outside_the_range_are_refused(mode, values, words):
    image = Image.frombytes(mode, values.shape[::-1], values.tobytes())
    with pytest.raises(D.DataError) as excinfo:
        D.image_to_rgb8(image, Path("odd.tif"))
    assert_names(excinfo, Path("odd.tif"), f"mode {mode}", words)


# --------------------------------------------------------------------------------------------
# Case 7: per-image mask counts shifted, totals equal
# --------------------------------------------------------------------------------------------


def shift_counts(paths: dict, samples: list) -> None:
    """Image 0 claims one instance more (a copy of its last), image 1 one fewer (its last):
    the totals still match the mask file, but image 0 now owns image 1's first mask."""
    labels = [s[2] for s in samples]
    boxes = [s[3] for s in samples]
    labels[0], boxes[0] = np.append(labels[0], labels[0][-1]), np.vstack([boxes[0], boxes[0][-1:]])
    labels[1], boxes[1] = labels[1][:-1], boxes[1][:-1]
    save_object_npy(paths["labels"], labels)
    save_object_npy(paths["bboxes"], boxes)


def test_case_07_shifted_mask_counts_are_refused_at_construction(cis680):
    prefix, paths, samples = cis680
    shift_counts(paths, samples)
    with pytest.raises(D.DataError) as excinfo:
        D.BuildDataset(prefix)
    # mask row 2 is image 1's first rectangle (5, 4, 17, 12); image 0 stores its own
    # second rectangle (22, 16, 34, 24) as instance 2
    assert_names(
        excinfo,
        paths["mask"],
        "mask 2 (instance 2 of image 0)",
        "[5, 4, 17, 12]",
        "[22, 16, 34, 24]",
        str(paths["labels"]),
        "may be shifted",
    )


def test_case_07_shifted_mask_counts_are_refused_lazily(cis680):
    prefix, paths, samples = cis680
    shift_counts(paths, samples)
    ds = D.BuildDataset(prefix, size=(64, 96), check_masks=False)
    ds[2]  # image 2 is untouched
    for i, words in ((0, "instance 2 of image 0"), (1, "instance 0 of image 1")):
        with pytest.raises(D.DataError) as excinfo:
            ds.raw(i)
        assert_names(excinfo, paths["mask"], words, "may be shifted")


def test_case_07_no_false_alarm_on_builtin_data(tmp_path):
    prefix = synthetic.ensure_builtin_dataset(tmp_path, num_images=12, seed=3, workers=1)
    ds = D.BuildDataset(prefix, size=(150, 200))
    assert ds.offsets[-1] > 0
    lazy = D.BuildDataset(prefix, size=(150, 200), check_masks=False)
    for i in range(len(lazy)):
        lazy.raw(i)


def test_case_07_projection_boxes_match_masks_to_boxes():
    rng = np.random.default_rng(7)
    masks = rng.random((40, 9, 13)) < rng.random((40, 1, 1)) * 0.2  # (40, 9, 13), some empty
    masks[0] = False
    masks[1] = False
    masks[1, 4, 6] = True
    expected = D.masks_to_boxes(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(expected[:2], [[0, 0, 0, 0], [6, 4, 7, 5]])
    np.testing.assert_array_equal(conventions._projection_boxes(masks), expected)


def test_a_stored_box_outside_the_image_within_the_tolerance_is_refused(tmp_path):
    # Found by tests/test_readers_property.py: clipped to the 8-wide image, [8.5, 1, 8.9, 3]
    # had no width left and became the box [8, 1, 8, 3].
    masks = np.zeros((1, 6, 8), np.uint8)
    masks[0, 1:3, 6:8] = 1
    image = np.zeros((3, 6, 8), np.uint8)
    sample = (image, masks, np.array([1]), np.array([[8.5, 1, 8.9, 3]], np.float32))
    D.write_cis680(tmp_path / "s", [sample])
    with pytest.raises(D.DataError, match=r"bboxes_comp_zlib\.npy: box 0 of image 0 is \[8\.5"):
        D.BuildDataset(tmp_path / "s", size=(6, 8))
