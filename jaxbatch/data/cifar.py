"""CIFAR-10 in its two official layouts (https://www.cs.toronto.edu/~kriz/cifar.html).

Binary (`cifar-10-binary.tar.gz` -> `cifar-10-batches-bin/`): each record is
1 label byte then 3,072 pixel bytes, the 1,024 red values of the 32x32 image
row by row, then green, then blue. Python (`cifar-10-python.tar.gz` ->
`cifar-10-batches-py/`): each batch is a pickled dict with b"data", a
(10000, 3072) uint8 array in the same channel-planar order, and b"labels".
Training is data_batch_1..5, test is test_batch; 10,000 images per batch.

The tarballs are read into memory, never extracted (tarballs.py). The python
batches are pickles, and unpickling runs whatever a pickle names, so they go
through `_BatchUnpickler`, which knows only the few names an array needs and
builds the array itself.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

from jaxbatch.data import tarballs
from jaxbatch.data.catalog import one_line
from jaxbatch.errors import JaxbatchError

BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
RECORD = 1 + 32 * 32 * 3
TARBALLS = {"binary": "cifar-10-binary.tar.gz", "python": "cifar-10-python.tar.gz"}
FOLDERS = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}
MAX_BATCH_BYTES = 1 << 26  # an official batch is about 31 MB in either layout


def _member_name(layout: str, batch: str) -> str:
    return batch + ".bin" if layout == "binary" else batch


def cifar_source(folder: Path, split: str) -> tuple[str, Path] | None:
    """(layout, path) of the first CIFAR-10 copy in `folder`, or None.

    Looks for extracted batches (binary ones also loose in `folder`), then the
    official tarballs.
    """
    first = BATCHES[split][0]
    for layout, sub in FOLDERS.items():
        for where in (folder / sub, folder) if layout == "binary" else (folder / sub,):
            if (where / _member_name(layout, first)).is_file():
                return layout, where
    for layout, name in TARBALLS.items():
        if (folder / name).is_file():
            return layout, folder / name
    return None


def source_files(layout: str, path: Path, split: str) -> list[Path]:
    """The files a split is read from (for cache keys)."""
    if path.is_file():
        return [path]
    files = [path / _member_name(layout, batch) for batch in BATCHES[split]]
    return [file for file in files if file.is_file()]  # a missing batch is reported on reading


def load_cifar(layout: str, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 32, 32, 3) and int32 labels (N,) of one split."""
    batches = _read_tar(layout, path, split) if path.is_file() else _read_folder(layout, path, split)
    parse = parse_binary if layout == "binary" else parse_pickle
    parts = [parse(data, where) for where, data in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def _read_folder(layout: str, folder: Path, split: str) -> list[tuple[str, bytes]]:
    out = []
    for batch in BATCHES[split]:
        file = folder / _member_name(layout, batch)
        if not file.is_file():
            raise JaxbatchError(f"{file}: missing; CIFAR-10 {split} needs {', '.join(BATCHES[split])}")
        size = file.stat().st_size
        if size > MAX_BATCH_BYTES:  # checked before reading: as in a tarball, the size decides what is read
            raise JaxbatchError(f"{file}: {size} bytes, more than {MAX_BATCH_BYTES} for a CIFAR-10 batch; "
                                "the file is corrupt or not the official one")
        out.append((str(file), file.read_bytes()))
    return out


def _read_tar(layout: str, tarball: Path, split: str) -> list[tuple[str, bytes]]:
    wanted = {f"{FOLDERS[layout]}/{_member_name(layout, b)}": b for b in BATCHES[split]}
    found = {}
    for member, _, read in tarballs.members(tarball, "download it again"):
        if member.name in wanted and member.isfile():
            found[member.name] = read(MAX_BATCH_BYTES, "a CIFAR-10 batch")
    missing = [name for name in wanted if name not in found]
    if missing:
        raise JaxbatchError(f"{tarball}: has no member {missing[0]}; is it the official CIFAR-10 {layout} archive?")
    return [(f"{tarball}:{name}", found[name]) for name in wanted]


def planar_to_nhwc(flat: np.ndarray) -> np.ndarray:
    """(N, 3072) channel-planar rows -> (N, 32, 32, 3) channels-last."""
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def parse_binary(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % RECORD:
        raise JaxbatchError(
            f"{where}: {len(data)} bytes is not a whole number of {RECORD}-byte CIFAR records; "
            "the file is truncated or corrupt"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
    return np.ascontiguousarray(planar_to_nhwc(records[:, 1:])), records[:, 0].astype(np.int32)


# The python batches. Unpickling calls whatever global a pickle names, so a
# pickle can run code. The official batches (Python 2 cPickle, protocol 2)
# name only numpy's array machinery: a dict with bytes keys b"batch_label"
# (bytes), b"labels" (a list of ints), b"data" (a uint8 array pickled as
# numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b"b") then BUILD
# with (1, shape, numpy.dtype("u1", 0, 1), fortran flag, raw bytes)) and
# b"filenames" (a list of bytes). Those names, and Python 3's way of
# pickling bytes at protocol 2, resolve to the stand-ins below, never to
# numpy or Python callables: each takes only what such a batch holds, and the
# array is made here from raw bytes whose length matches its shape.


class _Global:
    """What an allowed global resolves to: calls `function` with the pickle's arguments.

    Refuses BUILD: on a plain function or class, BUILD would set attributes
    on an object shared by every later load.
    """

    __slots__ = ("name", "function")

    def __init__(self, name: str, function=None):
        self.name, self.function = name, function

    def __call__(self, *args):
        if self.function is None:
            raise pickle.UnpicklingError(f"refusing to call {self.name}")
        return self.function(*args)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing to change {self.name}")


_NDARRAY = _Global("numpy.ndarray")  # only _reconstruct's first argument; called, it makes arrays of any size
INTEGER_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}  # no object fields, no records


def _text(value) -> str:
    """Python 2 `str` arrives as bytes (encoding="bytes"); names and byte orders are ASCII."""
    return value.decode("latin1") if isinstance(value, bytes) else value


class _Dtype:
    """numpy.dtype(name, align, copy) for a plain integer type, and its BUILD state."""

    def __init__(self, name, align=False, copy=True):
        if _text(name) not in INTEGER_DTYPES:
            raise pickle.UnpicklingError(f"refusing numpy dtype {name!r}")
        self.dtype = np.dtype(_text(name))

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, ...): a plain type sets only its byte order.
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise pickle.UnpicklingError("refusing a structured or subarray numpy dtype")
        order = _text(state[1])
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"refusing numpy byte order {order!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """A pickled numpy array: empty from _reconstruct, filled by BUILD from raw bytes."""

    array = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, fortran, raw); old numpy wrote no version
        shape, dtype, fortran, raw = state if isinstance(state, tuple) and len(state) == 4 else (None,) * 4
        raw = raw.encode("latin1") if isinstance(raw, str) else raw  # pickled by Python 3 as text
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(dtype, _Dtype) and isinstance(raw, bytes)):
            raise pickle.UnpicklingError("refusing a numpy array state other than (shape, dtype, order, bytes)")
        size = math.prod(shape) * dtype.dtype.itemsize
        if size != len(raw):  # checked before any array exists: a shape claiming terabytes costs nothing
            raise pickle.UnpicklingError(f"array of shape {shape} needs {size} bytes, "
                                         f"the pickle holds {len(raw)}")
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or tuple(shape) != (0,) or _text(typecode) != "b":
        raise pickle.UnpicklingError("refusing numpy _reconstruct other than (ndarray, (0,), 'b')")
    return _Array()


def _latin1(text, encoding):
    """Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"): only that passes.

    _codecs.encode itself looks a codec up by name: that may import a module
    (encodings.*, or whatever a codec search function installed by another
    package imports), and codecs such as zlib, bz2 or base64 transform their
    input at will. Latin-1 of a str is a byte-for-byte copy of text already
    in the pickle.
    """
    if not isinstance(text, str) or _text(encoding) not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than (text, 'latin1')")
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain data and integer numpy arrays only: a tarball from the web must not run code."""

    GLOBALS = {
        ("_codecs", "encode"): _Global("_codecs.encode", _latin1),
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Global("numpy.dtype", _Dtype),
        ("numpy.core.multiarray", "_reconstruct"): _Global("numpy _reconstruct", _reconstruct),
        ("numpy._core.multiarray", "_reconstruct"): _Global("numpy _reconstruct", _reconstruct),  # numpy >= 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.GLOBALS[module, name]


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes before it is unpickled.

    CPython's unpickler (3.11) allocates what a length field claims before
    reading the bytes (a 20-byte pickle can claim 8 GB), and grows its memo
    to whatever index a PUT names. pickletools reads every argument from the
    bytes really there; memo indices must come in sequence, as picklers
    write them (from 0, or from 1 in Python 2's cPickle).
    """
    puts = 0
    for opcode, arg, pos in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not 0 <= arg <= puts + 1:
                raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} is out of sequence")
            puts += 1
        elif opcode.name == "MEMOIZE":
            puts += 1
        elif opcode.name == "FRAME" and arg > len(data) - pos:
            raise pickle.UnpicklingError(f"frame of {arg} bytes at byte {pos} runs past the end")


def _unpickle(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 3072) pixels and (N,) int64 labels of a batch pickle; any failure raises."""
    _check_opcodes(data)
    batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise TypeError(f"the pickle holds a {type(batch).__name__}, not a dict")
    flat, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(flat, _Array) or flat.array is None or flat.array.dtype != np.uint8:
        raise TypeError("b'data' is not a numpy uint8 array")
    # A list only of ints: np.asarray of nested lists sharing items could claim 2**30 entries.
    if isinstance(labels, _Array) and labels.array is not None:
        labels = labels.array
    elif not (isinstance(labels, list) and all(type(y) is int for y in labels)):
        raise TypeError("b'labels' is not a list of ints or an integer array")
    return flat.array, np.asarray(labels, np.int64)


def parse_pickle(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        flat, labels = _unpickle(data)
    except Exception as err:  # unpickling fails in many ways on bad bytes
        raise JaxbatchError(f"{where}: not a CIFAR-10 python batch ({type(err).__name__}: {one_line(err)}); "
                            "download the official cifar-10-python.tar.gz again")
    if flat.ndim != 2 or flat.shape[1] != 3072:
        raise JaxbatchError(f"{where}: data has shape {flat.shape}, expected (N, 3072)")
    if labels.ndim != 1:
        raise JaxbatchError(f"{where}: labels have shape {labels.shape}, expected (N,)")
    if len(flat) != len(labels):
        raise JaxbatchError(f"{where}: {len(flat)} images but {len(labels)} labels")
    return np.ascontiguousarray(planar_to_nhwc(flat)), labels  # int64: the range check sees 2**32 + 3, not 3
