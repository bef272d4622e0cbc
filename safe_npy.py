"""Read a .npy file as data only: numpy arrays, never code (no `np.load(allow_pickle=True)`).

The CIS680 hand-out stores each image's labels and boxes as an object array of numeric
arrays, which `np.save` pickles, and a pickle can call any function while it loads. `read_npy`
parses the .npy header itself; a numeric array is read as raw bytes, and an object array's
pickle is first scanned (`pickletools.genops`, which only parses) for opcodes such arrays never
need, then unpickled by a restricted unpickler whose globals are inert stand-ins, the way
`torch.load(weights_only=True)` reads checkpoints. The stand-ins are checked and turned into
numeric arrays with `np.frombuffer`: no numpy code runs on what the file says. Any problem,
a crafted, truncated or foreign file among them, is one `errors.DataError` naming the file.

    labels = read_npy(Path("solo_labels_comp_zlib.npy"), "labels")  # (N,) object array
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import reprlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from errors import DataError
from errors import data_error as _fail

# A ragged object array of numeric arrays, as np.save pickles it, refers to these globals only
# (`pickletools.dis` of such a file; numpy 1.x spells the module numpy.core, 2.x numpy._core;
# protocol 2, numpy < 1.17, writes bytes as _codecs.encode(text, "latin1") or bytes()). Each
# maps to an inert stand-in below: no numpy code ever runs on what the file says, since
# mutated pickles can crash numpy's own __setstate__ (a fuzz test met a segmentation fault).
NPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
    ("__builtin__", "bytes"): "bytes",
    ("builtins", "bytes"): "bytes",
}
NPY_EXPECTED = "a .npy array: numeric, or an object array of numeric arrays (one per image)"
_NPY_DTYPES = tuple(f"{kind}{size}" for kind in "biuf" for size in (1, 2, 4, 8, 16)) + ("O8",)
# Pickle opcodes such a file may hold (protocols 0-4: numbers, strings, bytes, tuples, lists,
# the memo, globals, REDUCE and BUILD). Checked by `pickletools.genops`, which only parses,
# before anything is unpickled: no dicts, sets, EXT codes, INST/OBJ/NEWOBJ or protocol 5's
# out-of-band buffers, and no memo index past the data's length (CPython's unpickler grows
# its memo to the index, so LONG_BINPUT 10**9 alone takes gigabytes and minutes).
_NPY_PICKLE_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 "
    "LONG LONG1 LONG4 FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE "
    "SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8 EMPTY_TUPLE TUPLE TUPLE1 "
    "TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS GLOBAL STACK_GLOBAL REDUCE BUILD PUT BINPUT "
    "LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET".split()
)


class _PickledNdarray:
    """Stands in for numpy.ndarray: the class argument of `_pickled_reconstruct`."""


class _PickledArray:
    """An ndarray as a pickle describes it (`__setstate__` gets numpy's state tuple)."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _PickledDtype:
    """A numpy.dtype as a pickle describes it: np.dtype(spec, align, copy), then its state."""

    state: Any = None

    def __init__(self, spec: Any, align: Any = False, copy: Any = False):
        self.spec = spec

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _pickled_reconstruct(cls: Any, shape: Any, typecode: Any) -> _PickledArray:
    if cls is not _PickledNdarray:
        raise ValueError(f"_reconstruct of {type(cls).__name__}, not of numpy.ndarray")
    return _PickledArray()


def _pickled_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise ValueError("_codecs.encode of something other than latin-1 text")
    return text.encode("latin1")


def _pickled_bytes(*args: Any) -> bytes:
    if args:
        raise ValueError("bytes() with arguments")
    return b""


_NPY_STAND_INS = {
    "reconstruct": _pickled_reconstruct,
    "ndarray": _PickledNdarray,
    "dtype": _PickledDtype,
    "encode": _pickled_encode,
    "bytes": _pickled_bytes,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the description of numpy arrays and nothing else, the way
    `torch.load(weights_only=True)` does: a global outside NPY_PICKLE_GLOBALS (a function that
    would run code, open a file, ...) is refused before it is looked up, so a crafted .npy file
    cannot execute anything; the allowed ones are inert stand-ins (`_array_from_pickle`)."""

    def __init__(self, file: io.BufferedReader, path: Path, field: str):
        super().__init__(file, encoding="latin1")  # numpy's choice for Python 2 pickles
        self.path, self.field = path, field

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NPY_PICKLE_GLOBALS:
            raise _fail(
                self.path,
                self.field,
                f"holds a pickle that loads {module}.{name}, which is refused (a pickle can "
                "run code; only numpy arrays are allowed)",
                NPY_EXPECTED,
            )
        return _NPY_STAND_INS[NPY_PICKLE_GLOBALS[(module, name)]]

    def persistent_load(self, pid: Any) -> Any:
        raise _fail(self.path, self.field, "holds a pickle with external references", NPY_EXPECTED)


def _dtype_from_pickle(desc: Any) -> np.dtype:
    """A `_PickledDtype` -> np.dtype: a plain bool / int / uint / float or object dtype."""
    if not isinstance(desc, _PickledDtype) or desc.spec not in _NPY_DTYPES:
        spec = desc.spec if isinstance(desc, _PickledDtype) else type(desc).__name__
        raise ValueError(f"dtype {reprlib.repr(spec)} is not a plain numeric or object dtype")
    state = desc.state
    if not (isinstance(state, tuple) and len(state) >= 4 and state[1] in ("<", ">", "|", "=")):
        raise ValueError(f"dtype {desc.spec} has the state {reprlib.repr(state)}")
    if state[2] is not None or state[3] is not None:
        raise ValueError(f"dtype {desc.spec} has sub-arrays or fields")
    dtype = np.dtype(desc.spec)
    return dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype


class _PickleBudget:
    """Bytes an array may still take: an honest pickle holds every byte of its arrays, so the
    arrays it describes never take more than the file's size (memo references could repeat
    one bytes object a million times)."""

    def __init__(self, size: int):
        self.left = size

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise ValueError("its arrays would take more bytes than the file holds")


def _array_from_pickle(
    desc: Any, budget: _PickleBudget, built: dict[int, np.ndarray], numeric_only: bool
) -> np.ndarray:
    """Check a `_PickledArray` and build its ndarray: numeric data from exactly as many bytes
    as its shape needs; an object array (only when not numeric_only) of numeric arrays.
    `built` maps id(desc) -> array, so an array the pickle holds twice is built once."""
    if id(desc) in built:
        return built[id(desc)]
    if not isinstance(desc, _PickledArray):
        raise ValueError(f"it holds a {type(desc).__name__} where an array belongs")
    state = desc.state
    if isinstance(state, tuple) and len(state) == 4:  # numpy < 1.0 left the version out
        state = (1, *state)
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise ValueError(f"an array has the state {reprlib.repr(state)}")
    _, shape, dtype_desc, fortran_order, data = state
    if not (
        isinstance(shape, tuple)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ValueError(f"an array has the shape {reprlib.repr(shape)}")
    dtype = _dtype_from_pickle(dtype_desc)
    count = math.prod(shape)
    order = "F" if fortran_order else "C"
    if dtype.hasobject:
        if numeric_only:
            raise ValueError("an entry is itself an object array")
        if not isinstance(data, list) or len(data) != count:
            raise ValueError(f"an object array of shape {shape} does not list {count} entries")
        budget.take(8 * count)
        array = np.empty(count, dtype=object)
        for i, item in enumerate(data):
            array[i] = _array_from_pickle(item, budget, built, numeric_only=True)
        array = array.reshape(shape, order=order)
    else:
        if isinstance(data, str):  # a Python 2 pickle's bytes, decoded as latin-1
            data = data.encode("latin1")
        if not isinstance(data, bytes) or len(data) != count * dtype.itemsize:
            size = len(data) if isinstance(data, (bytes, str)) else type(data).__name__
            raise ValueError(f"a {dtype} array of shape {shape} has {size} bytes of data")
        budget.take(len(data))
        array = np.frombuffer(data, dtype).reshape(shape, order=order).copy()
    built[id(desc)] = array
    return array


def read_npy(path: Path, field: str) -> np.ndarray:
    """A .npy file -> ndarray, without `np.load(allow_pickle=True)`.

    The header is parsed here; a numeric array is read as raw data, an object array (the
    hand-out's ragged labels and boxes) is unpickled by `_ArrayUnpickler` into inert stand-ins
    that `_array_from_pickle` checks and turns into numeric arrays. A missing, truncated,
    non-.npy or code-carrying file raises DataError naming it.
    """
    fmt = np.lib.format
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's note on headers written by Python 2
            try:
                version = fmt.read_magic(f)
                if version == (1, 0):
                    shape, fortran_order, dtype = fmt.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran_order, dtype = fmt.read_array_header_2_0(f)
                else:
                    raise ValueError(f"format version {version} (this reader knows 1.0 and 2.0)")
                if any(d < 0 for d in shape):
                    raise ValueError(f"the header's shape {shape} has a negative size")
            except Exception as exc:  # ValueError, or SyntaxError / TokenError from a cut header
                raise _fail(
                    path,
                    field,
                    f"could not be read: truncated or not a .npy file ({exc})",
                    NPY_EXPECTED,
                ) from exc
            if dtype.hasobject:
                return _read_npy_pickle(f, path, field, shape, dtype)
            if dtype.kind not in "biuf":
                raise _fail(path, field, f"has dtype {dtype}", NPY_EXPECTED)
            size = math.prod(shape) * dtype.itemsize
            held = os.fstat(f.fileno()).st_size - f.tell()
            if held < size:  # checked before reading: a cut file, or a header that lies
                raise _fail(
                    path,
                    field,
                    f"could not be read: truncated (its header promises {size} bytes of data, "
                    f"the file holds {held})",
                    NPY_EXPECTED,
                )
            data = f.read(size)
    except OSError as exc:
        raise _fail(path, field, f"could not be read ({exc})", NPY_EXPECTED) from exc
    order = "F" if fortran_order else "C"
    return np.frombuffer(data, dtype).reshape(shape, order=order).copy()


def _read_npy_pickle(
    f: io.BufferedReader, path: Path, field: str, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """The pickled payload of an object .npy file (f positioned after its header)."""
    if dtype != np.dtype(object):
        raise _fail(path, field, f"has dtype {dtype}", NPY_EXPECTED)
    data = f.read()
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name not in _NPY_PICKLE_OPCODES:
                raise _fail(
                    path,
                    field,
                    f"holds a pickle with the opcode {opcode.name}, which numpy arrays never need",
                    NPY_EXPECTED,
                )
            if opcode.name.endswith("PUT") and not 0 <= arg < len(data):
                raise ValueError(f"memo index {arg} of a {len(data)}-byte pickle")
        desc = _ArrayUnpickler(io.BytesIO(data), path, field).load()
    except DataError:
        raise
    except Exception as exc:  # pickle raises assorted types on cut or garbled data
        raise _fail(
            path,
            field,
            f"could not be read: truncated or corrupt pickle data ({type(exc).__name__}: {exc})",
            NPY_EXPECTED,
        ) from exc
    try:
        budget = _PickleBudget(path.stat().st_size)
        arr = _array_from_pickle(desc, budget, {}, numeric_only=False)
    except ValueError as exc:
        raise _fail(path, field, f"is not an array of numeric arrays: {exc}", NPY_EXPECTED) from exc
    if arr.dtype != object or arr.shape != tuple(shape):
        raise _fail(
            path,
            field,
            f"holds a pickled {arr.dtype} {arr.shape} array, not the object {shape} its header "
            "says",
            NPY_EXPECTED,
        )
    return arr
