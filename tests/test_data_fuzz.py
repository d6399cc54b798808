"""Damaged and hostile dataset files: one JaxbatchError line, or data that is really there.

Four parts:
  * a fuzzed corpus, made here from a seeded RNG: byte flips and cuts of IDX
    files (gzipped and not), CIFAR-10 binary and python batches (loose and
    in tarballs) and image-folder tarballs. Each case loads through
    `load(..., source="files")` and either fails with one JaxbatchError line
    or loads data the damaged bytes really hold: where a format can detect
    the damage (gzip's CRC, IDX sizes, label ranges), a damaged file that
    loads must load exactly the original;
  * headers claiming huge sizes: refused from the claim, before anything of
    that size is allocated (tracemalloc measures the peak);
  * pickles that try to run code: refused, and the marker file each would
    create is absent (the same bytes given to plain pickle.loads create it);
  * tarball members that leave the archive, links, devices and FIFOs:
    refused, and nothing is written anywhere.
Every case also checks that nothing is left next to the data, and nothing in
the cache unless the load succeeded.
"""

import collections
import dataclasses
import functools
import gzip
import io
import os
import pickle
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from data_fixtures import (
    cifar_binary_bytes,
    cifar_pickle_bytes,
    cifar_py2_pickle_bytes,
    idx_bytes,
    idx_header,
    image_bytes,
    image_folder_members,
    peak_bytes,
    random_split,
    write_tar,
)

from jaxbatch.data import load
from jaxbatch.data.cifar import RECORD, parse_pickle
from jaxbatch.data.idx import parse_idx
from jaxbatch.errors import JaxbatchError

SEED = 2024
DIGITS = [str(i) for i in range(10)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """This test's own cache folder, so it can be checked for leftovers."""
    monkeypatch.setenv("JAXBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def files_under(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()} if root.exists() else set()


def outcome(call, case: str = ""):
    """What `call()` returns, or the message of the JaxbatchError it raises; any other exception fails."""
    try:
        return call()
    except JaxbatchError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, f"{case}: {message!r}"
        return message
    except Exception as err:
        raise AssertionError(f"{case}: {type(err).__name__} instead of JaxbatchError: {err}") from err


def one_line_error(call, case: str = "") -> str:
    """The one-line message of the JaxbatchError `call()` must raise."""
    result = outcome(call, case)
    assert isinstance(result, str), f"{case}: loaded {result!r} instead of failing"
    return result


# --- The fuzzed corpus ---------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    """One dataset laid out as the loader expects, and the file in it the cases damage."""

    name: str  # dataset
    split: str
    files: dict  # path under <data_dir>/<name>/ -> bytes
    target: str  # the file damaged
    flips: int  # cases of 1-3 random bytes changed
    cuts: int  # cases of the file cut short
    # (damaged bytes, changed offsets or None for a cut, outcome, reference Dataset) -> category
    check: Callable
    fixed_offsets: tuple = ()  # offsets also flipped alone, one case each (headers)

    def cases(self, rng):
        data = self.files[self.target]
        for offset in self.fixed_offsets:
            yield _flip(data, [offset], rng)
        for _ in range(self.flips):
            yield _flip(data, rng.choice(len(data), int(rng.integers(1, 4)), replace=False), rng)
        cuts = {0, 1, len(data) - 1, *rng.integers(2, len(data) - 1, self.cuts - 3).tolist()}
        for cut in sorted(cuts):
            yield data[:cut], None, f"cut to {cut} of {len(data)} bytes"


def _flip(data: bytes, offsets, rng):
    damaged = bytearray(data)
    for offset in offsets:
        damaged[offset] ^= int(rng.integers(1, 256))
    offsets = sorted(int(o) for o in offsets)
    return bytes(damaged), offsets, f"bytes {offsets} of {len(data)} changed"


def summary(result) -> str:
    return result if isinstance(result, str) else f"loaded {result.images.shape} images, labels {result.labels}"


def same(result, reference) -> bool:
    return (not isinstance(result, str) and np.array_equal(result.images, reference.images)
            and np.array_equal(result.labels, reference.labels))


def right_shape(result, reference) -> bool:
    return not isinstance(result, str) and result.images.shape == reference.images.shape \
        and result.labels.shape == reference.labels.shape


def detectable(damaged, offsets, result, reference) -> str:
    """Checksummed formats (gzip, tar headers): an error, or exactly the original data."""
    if isinstance(result, str):
        return "error"
    assert offsets is not None, "a cut file loaded"
    assert same(result, reference), "damage changed the data without an error"
    return "loads, same data"


def plain_tar(damaged, offsets, result, reference, data_ranges=()) -> str:
    """A .tar: headers are checksummed, image bytes only as far as PNG checks them."""
    if isinstance(result, str):
        return "error"
    if same(result, reference):
        return "loads, same data"
    assert offsets and all(any(a <= o < b for a, b in data_ranges) for o in offsets), "header damage loaded"
    assert right_shape(result, reference)
    return "loads, changed pixels"


def idx_images(damaged, offsets, result, reference) -> str:
    """Plain IDX images: every header byte is checked; pixel bytes are what they are."""
    if offsets is None or offsets[0] < 16:
        assert isinstance(result, str), "a cut or a damaged header loaded"
        return "error"
    assert not isinstance(result, str), result
    np.testing.assert_array_equal(result.images[..., 0], np.frombuffer(damaged[16:], np.uint8).reshape(-1, 28, 28))
    return "loads, changed pixels"


def idx_labels(damaged, offsets, result, reference) -> str:
    if offsets is None or offsets[0] < 8:
        assert isinstance(result, str), "a cut or a damaged header loaded"
        return "error"
    values = np.frombuffer(damaged[8:], np.uint8)
    if (values >= 10).any():
        i = int((values >= 10).argmax())
        assert f"label {values[i]} at index {i}" in result, result
        return "error"
    np.testing.assert_array_equal(result.labels, values)
    return "loads, changed labels"


def decode_records(data: bytes):
    """CIFAR-10 binary records decoded here, independently of the loader."""
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 0]


def cifar_records(damaged, offsets, result, reference) -> str:
    """No checksum and no count: any whole number of records with labels 0..9 is valid."""
    if len(damaged) == 0 or len(damaged) % RECORD:
        assert isinstance(result, str) and "whole number" in result, result
        return "error"
    images, labels = decode_records(damaged)
    if (labels >= 10).any():
        assert isinstance(result, str) and "outside 0..9" in result, result
        return "error"
    np.testing.assert_array_equal(result.images, images)
    np.testing.assert_array_equal(result.labels, labels)
    return "loads, same data" if same(result, reference) else "loads, changed records"


def cifar_pickle(damaged, offsets, result, reference, payload=None) -> str:
    """A pickle has no checksum: it may load, but only with the right shape.

    `payload` is the (start, stop) of the raw pixel string of a Python 2
    pickle: damage only there must load, with exactly those pixels changed.
    """
    if offsets is not None and payload and all(payload[0] <= o < payload[1] for o in offsets):
        assert not isinstance(result, str), "damage to pixels only was refused"
        planar = np.frombuffer(damaged[payload[0]:payload[1]], np.uint8).reshape(-1, 3, 32, 32)
        np.testing.assert_array_equal(result.images, planar.transpose(0, 2, 3, 1))
        return "loads, changed pixels"
    if isinstance(result, str):
        return "error"
    assert offsets is not None, "a cut pickle loaded"
    assert right_shape(result, reference)
    return "loads, same data" if same(result, reference) else "loads, changed pixels or labels"


def make_corpus(kind: str) -> Corpus:
    mnist_images, mnist_labels = random_split(12, (28, 28, 1), seed=1)
    cifar_images, cifar_labels = random_split(6, (32, 32, 3), seed=2)
    idx_files = {"train-images-idx3-ubyte": idx_bytes(mnist_images[..., 0]),
                 "train-labels-idx1-ubyte": idx_bytes(mnist_labels)}
    if kind == "idx-images-gz" or kind == "idx-labels-gz":
        files = {name + ".gz": gzip.compress(data, mtime=0) for name, data in idx_files.items()}
        target = "train-images-idx3-ubyte.gz" if kind == "idx-images-gz" else "train-labels-idx1-ubyte.gz"
        return Corpus("mnist", "train", files, target, 45, 15, detectable, fixed_offsets=tuple(range(10)))
    if kind == "idx-images":
        return Corpus("mnist", "train", idx_files, "train-images-idx3-ubyte", 20, 8, idx_images,
                      fixed_offsets=tuple(range(16)))
    if kind == "idx-labels":
        return Corpus("mnist", "train", idx_files, "train-labels-idx1-ubyte", 20, 6, idx_labels,
                      fixed_offsets=tuple(range(8)))
    batch = cifar_binary_bytes(cifar_images, cifar_labels)
    if kind == "cifar-binary":
        # Cuts at record boundaries load fewer records: the format holds no count.
        return Corpus("cifar10", "test", {"test_batch.bin": batch}, "test_batch.bin", 40, 12, cifar_records,
                      fixed_offsets=tuple(range(0, len(batch), RECORD)))
    if kind == "cifar-binary-tar":
        tarball = _tar_bytes({"cifar-10-batches-bin/test_batch.bin": batch})
        return Corpus("cifar10", "test", {"cifar-10-binary.tar.gz": tarball}, "cifar-10-binary.tar.gz",
                      30, 12, detectable, fixed_offsets=tuple(range(10)))
    if kind == "cifar-python-py2":
        data = cifar_py2_pickle_bytes(cifar_images, cifar_labels)
        start = data.index(cifar_binary_bytes(cifar_images, cifar_labels)[1:1 + 64])  # the pixel string
        stop = start + cifar_images.size
        check = lambda *args: cifar_pickle(*args, payload=(start, stop))  # noqa: E731
        # Random flips land mostly in the pixels: every other byte of the opcodes around them, too.
        return Corpus("cifar10", "test", {"cifar-10-batches-py/test_batch": data}, "cifar-10-batches-py/test_batch",
                      30, 15, check, fixed_offsets=(*range(0, start, 2), *range(stop, len(data), 2)))
    if kind == "cifar-python-py3":
        data = cifar_pickle_bytes(cifar_images, cifar_labels)
        return Corpus("cifar10", "test", {"cifar-10-batches-py/test_batch": data}, "cifar-10-batches-py/test_batch",
                      40, 10, cifar_pickle)
    members = image_folder_members("test", mnist_images[:10], np.arange(10), DIGITS)
    if kind == "imagefolder-tgz":
        return Corpus("mnist", "test", {"test.tar.gz": _tar_bytes(members)}, "test.tar.gz", 45, 15, detectable,
                      fixed_offsets=tuple(range(10)))
    tarball = _tar_bytes(members, "w")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        ranges = [(m.offset_data, m.offset_data + m.size) for m in tar if m.isfile()]
    check = lambda *args: plain_tar(*args, data_ranges=ranges)  # noqa: E731
    return Corpus("mnist", "test", {"test.tar": tarball}, "test.tar", 30, 10, check)


def _tar_bytes(members: dict, mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


CORPORA = ["idx-images-gz", "idx-labels-gz", "idx-images", "idx-labels", "cifar-binary", "cifar-binary-tar",
           "cifar-python-py2", "cifar-python-py3", "imagefolder-tgz", "imagefolder-tar"]


def run_corpus(kind: str, tmp_path: Path, cache: Path) -> collections.Counter:
    """Load every damaged copy; return how many cases ended in each category."""
    corpus = make_corpus(kind)
    data_dir = tmp_path / "data"
    reference = _load_case(corpus, corpus.files[corpus.target], data_dir, cache, 0, "reference")
    assert not isinstance(reference, str), reference
    tally = collections.Counter()
    rng = np.random.default_rng([SEED, CORPORA.index(kind)])
    for i, (damaged, offsets, description) in enumerate(corpus.cases(rng), start=1):
        case = f"{kind} case {i}: {description}"
        result = _load_case(corpus, damaged, data_dir, cache, i, case)
        try:
            tally[corpus.check(damaged, offsets, result, reference)] += 1
        except AssertionError as err:
            raise AssertionError(f"{case}: {err} (outcome: {summary(result)})") from err
    # Nothing anywhere but the corpus's own files: the cache was emptied after each load.
    assert files_under(tmp_path) == {f"data/{corpus.name}/{name}" for name in corpus.files}
    return tally


def _load_case(corpus: Corpus, damaged: bytes, data_dir: Path, cache: Path, i: int, case: str):
    """Load the corpus with `damaged` as its target file, written with modification time `i` ns.

    Every case uses the same folder; its own modification time keys load()'s
    in-memory and on-disk caches apart (the same size and time would serve
    the previous case's arrays).
    """
    folder = data_dir / corpus.name
    for name, data in corpus.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(damaged if name == corpus.target else data)
    os.utime(folder / corpus.target, ns=(i, i))
    made = files_under(data_dir)
    result = outcome(lambda: load(corpus.name, corpus.split, data_dir=data_dir, source="files"), case)
    assert files_under(data_dir) == made, f"{case}: files appeared next to the data"
    cached = files_under(cache)
    if isinstance(result, str):
        assert not cached, f"{case}: a failed load left {sorted(cached)} in the cache"
    else:
        assert all(name.endswith(".npz") and not name.startswith(".") for name in cached), cached
        for name in cached:
            (cache / name).unlink()
    return result


@pytest.mark.parametrize("kind", CORPORA)
def test_fuzzed_files(kind, tmp_path, cache):
    tally = run_corpus(kind, tmp_path, cache)
    assert tally["error"] > 0 and sum(tally.values()) >= 30


# --- Headers claiming huge sizes -------------------------------------------------------------------


def write_mnist(tmp_path: Path, images: bytes, labels: bytes, gz: bool) -> Path:
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    suffix = ".gz" if gz else ""
    (folder / f"train-images-idx3-ubyte{suffix}").write_bytes(images)
    (folder / f"train-labels-idx1-ubyte{suffix}").write_bytes(labels)
    return tmp_path / "data"


HUGE = (2**31, 2**16, 2**16)  # 2**63 pixels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_header_claiming_2_to_the_63_bytes(tmp_path, cache, gz):
    """A 100-byte file claiming 2**31 images of 65536x65536: refused from its size, nothing allocated."""
    images = idx_header(*HUGE) + bytes(84)
    labels = idx_bytes(np.zeros(12, np.uint8))
    if gz:
        images, labels = gzip.compress(images), gzip.compress(labels)
    data_dir = write_mnist(tmp_path, images, labels, gz)
    message = one_line_error(lambda: load("mnist", "train", data_dir=data_dir, source="files"))
    assert f"IDX dimensions {HUGE} need {2**63 + 16} bytes" in message
    assert ("more than a gzip file of" if gz else "but the file has 100") in message
    assert peak_bytes(lambda: load("mnist", "train", data_dir=data_dir, source="files")) < 1 << 20
    assert not files_under(cache) and len(files_under(data_dir)) == 2


def test_idx_claim_is_checked_before_any_array_exists(monkeypatch):
    """parse_idx compares the claim with the bytes before numpy sees either."""

    def no_arrays(*args, **kwargs):
        raise MemoryError("an array was made before the size check")

    monkeypatch.setattr(np, "frombuffer", no_arrays)
    monkeypatch.setattr(np, "empty", no_arrays)
    message = one_line_error(lambda: parse_idx(idx_header(*HUGE) + bytes(84), 3, "huge"))
    assert f"need {2**63 + 16} bytes but the file has 100" in message
    # np.prod wraps around at 2**63: these dimensions multiply to 0 in int64, and to 2**64 really.
    message = one_line_error(lambda: parse_idx(idx_header(2**31, 2**31, 4), 3, "wraps"))
    assert f"need {2**64 + 16} bytes but the file has 16" in message
    message = one_line_error(lambda: parse_idx(idx_header(2**32 - 1) + bytes(3), 1, "labels"))
    assert f"need {2**32 - 1 + 8} bytes but the file has 11" in message


@functools.lru_cache(maxsize=None)
def zeros_member(size: int) -> bytes:
    """One gzip member of `size` zero bytes: about size/1000 bytes on disk."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [packer.compress(block[: size - start]) for start in range(0, size, len(block))]
    return b"".join(parts) + packer.flush()


def zeros_gzip(prefix: bytes, size: int) -> bytes:
    """A gzip file unpacking to `prefix` then `size` zeros: two members, as `cat a.gz b.gz` makes."""
    return gzip.compress(prefix) + zeros_member(size)


BOMB = 64 << 20  # 64 MiB of zeros, about 65 KB gzipped


@pytest.mark.parametrize("prefix,zeros,needle,most", [
    (idx_header(*HUGE), BOMB, "more than a gzip file of", 1 << 20),  # a claim beyond deflate's 1032:1
    (idx_header(12, 28, 28), BOMB, "holds more than the 9424 bytes", 1 << 20),  # a small claim, 64 MiB behind
    (b"", BOMB, "IDX magic number 0x00000000", 1 << 20),  # zeros from the first byte
    # A claim the file's size and the catalogue allow (60,000 images: 64 KB of noise make the file big
    # enough) with 4 MiB there: read into one buffer of the claimed 47,040,000 bytes, plus a chunk or two.
    (idx_header(60000, 28, 28) + np.random.default_rng(0).bytes(1 << 16), 4 << 20,
     "need 47040016 bytes but the file has 4259856", 47_040_000 + (4 << 20)),
], ids=["claim-2**63", "claim-9424-of-64MiB", "no-header", "claim-above-what-is-there"])
def test_gzip_bomb_is_unpacked_no_further_than_the_header_allows(tmp_path, cache, prefix, zeros, needle, most):
    bomb = zeros_gzip(prefix, zeros)
    assert len(bomb) < 100_000
    data_dir = write_mnist(tmp_path, bomb, gzip.compress(idx_bytes(np.zeros(12, np.uint8))), gz=True)
    message = one_line_error(lambda: load("mnist", "train", data_dir=data_dir, source="files"))
    assert needle in message and "train-images-idx3-ubyte.gz" in message
    peak = peak_bytes(lambda: load("mnist", "train", data_dir=data_dir, source="files"))
    assert peak < most, f"{peak} bytes held unpacking a bomb"  # 64 MiB, unpacked whole
    assert not files_under(cache)


def test_tar_member_claiming_more_than_an_image_is_not_read(tmp_path, cache):
    """A 17 MiB member of zeros (about 17 KB gzipped) is refused from its header, before it is read."""
    members = image_folder_members("train", *random_split(10, (28, 28, 1)), DIGITS)
    members["train/3/huge.png"] = bytes(17 << 20)
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    write_tar(tmp_path / "data" / "mnist" / "train.tar.gz", members)
    message = one_line_error(lambda: load("mnist", "train", data_dir=tmp_path / "data", source="files"))
    assert "train/3/huge.png: member of 17825792 bytes, more than 16777216" in message
    assert peak_bytes(lambda: load("mnist", "train", data_dir=tmp_path / "data", source="files")) < 8 << 20
    assert not files_under(cache)


def test_png_header_claiming_a_large_image_is_not_decoded(tmp_path, cache):
    """An 8000x8000 PNG of a few hundred bytes: its size is checked from the header, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (8000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(8001) * 10)) \
        + chunk(b"IEND", b"")
    members = image_folder_members("train", *random_split(10, (28, 28, 1)), DIGITS)
    members["train/3/wide.png"] = png
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    write_tar(tmp_path / "data" / "mnist" / "train.tar.gz", members)
    message = one_line_error(lambda: load("mnist", "train", data_dir=tmp_path / "data", source="files"))
    assert "wide.png: image is 8000x8000 pixels, expected 28x28" in message
    assert peak_bytes(lambda: load("mnist", "train", data_dir=tmp_path / "data", source="files")) < 8 << 20


def write_pickle_batch(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(data)
    return tmp_path / "data"


def array_pickle(shape, payload: bytes, dtype: str = "u1") -> bytes:
    """{b"data": array, b"labels": []} with the array's BUILD state written by hand (protocol 2)."""
    dims = b"".join(b"\x8a" + bytes([8]) + n.to_bytes(8, "little") for n in shape)  # LONG1
    state = (b"(K\x01(" + dims + b"tcnumpy\ndtype\nX" + len(dtype).to_bytes(4, "little") + dtype.encode()
             + b"\x89\x88\x87R(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89C"
             + bytes([len(payload)]) + payload + b"tb")
    return (b"\x80\x02}(C\x04datacnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            + state + b"C\x06labels]u.")


@pytest.mark.parametrize("data,needle", [
    # BINBYTES8 claiming 8 GiB in 20 bytes: CPython's unpickler would allocate it before reading.
    (b"\x80\x04\x8e" + (8 << 30).to_bytes(8, "little") + b"abc.", "expected 8589934592 bytes"),
    # BINBYTES claiming 4 GiB.
    (b"\x80\x02B" + (2**32 - 1).to_bytes(4, "little") + b"abc.", "expected 4294967295 bytes"),
    # LONG_BINPUT to memo slot 2**31 - 1: the unpickler would grow its memo to 32 GiB.
    (b"\x80\x02Nr" + (2**31 - 1).to_bytes(4, "little") + b".", "memo index 2147483647"),
    # An array whose shape claims 2**40 x 3072 bytes, holding 10.
    (array_pickle((2**40, 3072), bytes(10)), "needs 3377699720527872 bytes, the pickle holds 10"),
    # An object array: numpy would allocate its shape, then fill it from a list.
    (array_pickle((2**20, 2**14), bytes(8), "O"), "refusing numpy dtype"),
], ids=["BINBYTES8-8GiB", "BINBYTES-4GiB", "LONG_BINPUT-2**31", "shape-2**40x3072", "object-dtype"])
def test_pickle_claiming_huge_sizes(tmp_path, cache, data, needle):
    data_dir = write_pickle_batch(tmp_path, data)
    message = one_line_error(lambda: load("cifar10", "test", data_dir=data_dir, source="files"))
    assert needle in message and "test_batch: not a CIFAR-10 python batch" in message
    assert peak_bytes(lambda: load("cifar10", "test", data_dir=data_dir, source="files")) < 1 << 20


def test_pickle_of_shared_nested_lists(tmp_path):
    """Labels as 31 levels of [x, x]: a small pickle, 2**31 entries once numpy flattens it."""
    nested = [0, 0]
    for _ in range(30):
        nested = [nested, nested]
    planar = np.zeros((4, 3072), np.uint8)
    data = pickle.dumps({b"data": planar, b"labels": nested}, protocol=2)
    assert len(data) < 20_000
    message = one_line_error(lambda: parse_pickle(data, "nested"))
    assert "b'labels' is not a list of ints" in message
    assert peak_bytes(lambda: parse_pickle(data, "nested")) < 1 << 20


# --- Pickles that try to run code --------------------------------------------------------------------


class Reduces:
    """Pickles as `function(*args)`: what a hostile batch would hold."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


HOSTILE = ["os.system (pickled as posix.system)", "os.system by name, protocol 0", "os.system by INST",
           "os.system by STACK_GLOBAL", "builtins.eval", "__builtin__.eval (Python 2 name)", "builtins.exec",
           "subprocess.check_call", "numpy.testing runstring (exec)", "numpy.save", "numpy.load of a hostile .npy"]


def hostile_pickles(marker: Path, scratch: Path) -> dict:
    """{name: pickle bytes}; unpickled by plain pickle.loads, each creates `marker`."""
    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    evil_npy = scratch / "evil.npy"  # an object array whose element runs `touch` when numpy.load unpickles it
    np.save(evil_npy, np.array([Reduces(os.system, touch), 0], dtype=object), allow_pickle=True)
    batch = lambda payload: {b"data": payload, b"labels": [0]}  # noqa: E731
    return {
        "os.system (pickled as posix.system)": pickle.dumps(batch(Reduces(os.system, touch)), protocol=2),
        "os.system by name, protocol 0": b"cos\nsystem\n(S'" + touch.encode() + b"'\ntR.",
        "os.system by INST": b"(S'" + touch.encode() + b"'\nios\nsystem\n.",
        "os.system by STACK_GLOBAL": pickle.dumps(batch(Reduces(os.system, touch)), protocol=4),
        "builtins.eval": pickle.dumps(batch(Reduces(eval, code)), protocol=4),
        "__builtin__.eval (Python 2 name)": pickle.dumps(batch(Reduces(eval, code)), protocol=2),
        "builtins.exec": pickle.dumps(batch(Reduces(exec, code)), protocol=3),
        "subprocess.check_call": pickle.dumps(batch(Reduces(subprocess.check_call, ["touch", str(marker)])), 2),
        "numpy.testing runstring (exec)": (b"\x80\x02cnumpy.testing._private.utils\nrunstring\nX"
                                           + len(code).to_bytes(4, "little") + code.encode() + b"}\x86R."),
        "numpy.save": pickle.dumps(batch(Reduces(np.save, str(marker), np.zeros(1))), protocol=2),
        "numpy.load of a hostile .npy": pickle.dumps(batch(Reduces(np.load, str(evil_npy), None, True)), 2),
    }


@pytest.fixture(scope="module")
def live_payloads(tmp_path_factory):
    """Proof the payloads work: plain pickle.loads of each creates its marker."""
    scratch = tmp_path_factory.mktemp("live")
    marker = scratch / "marker.npy"
    payloads = hostile_pickles(marker, scratch)
    assert list(payloads) == HOSTILE
    for name, data in payloads.items():
        marker.unlink(missing_ok=True)
        try:
            pickle.loads(data, encoding="bytes")
        except Exception:
            pass  # the payload ran, then the rest of the pickle did not make sense
        assert marker.exists(), f"{name}: the payload does not run, so refusing it proves nothing"
    return True


@pytest.mark.parametrize("name", HOSTILE)
def test_pickle_that_runs_code_is_refused(name, tmp_path, cache, live_payloads):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    marker = tmp_path / "marker.npy"  # .npy: numpy.save adds it otherwise
    data_dir = write_pickle_batch(tmp_path, hostile_pickles(marker, scratch)[name])
    message = one_line_error(lambda: load("cifar10", "test", data_dir=data_dir, source="files"), name)
    assert "test_batch: not a CIFAR-10 python batch (UnpicklingError: refusing to load" in message, message
    assert not marker.exists()
    assert files_under(tmp_path) == {"data/cifar10/cifar-10-batches-py/test_batch", "scratch/evil.npy"}


@pytest.mark.parametrize("data,needle", [
    # _codecs.encode looks the codec up by name (importing encodings.* or whatever a registered
    # search function imports) and zlib, bz2 or base64 codecs transform at will: only latin1 passes.
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x0a\x00\x00\x00zlib_codec\x86R.", "_codecs.encode other than"),
    (b"\x80\x02c_codecs\nencode\nC\x01xX\x06\x00\x00\x00latin1\x86R.", "_codecs.encode other than"),
    # numpy.ndarray is only _reconstruct's first argument: called, it would make any size of array.
    (b"\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85\x85R.", "refusing to call numpy.ndarray"),
    # _reconstruct of anything but numpy's own (ndarray, (0,), b"b").
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x05\x85C\x01b\x87R.", "_reconstruct other"),
    # BUILD on an allowed global would set attributes on an object every later load shares.
    (b"\x80\x02cnumpy\ndtype\n}X\x03\x00\x00\x00__x]sb.", "refusing to change numpy.dtype"),
    # A record dtype with an object field set through BUILD: raw bytes read as object pointers.
    (array_pickle((1,), bytes(8)).replace(b"|NNN", b"|NX\x01\x00\x00\x00a\x85}"), "structured"),
], ids=["encode-zlib", "encode-bytes", "ndarray-called", "reconstruct-shape-5", "BUILD-on-dtype", "record-dtype"])
def test_pickle_misusing_the_allowed_names(tmp_path, data, needle):
    data_dir = write_pickle_batch(tmp_path, data)
    message = one_line_error(lambda: load("cifar10", "test", data_dir=data_dir, source="files"))
    assert needle in message and "not a CIFAR-10 python batch" in message


def test_label_beyond_int32_is_not_wrapped_into_range(tmp_path):
    """2**32 + 3 cast to int32 is 3: the range is checked on the value the pickle holds."""
    images, _ = random_split(4, (32, 32, 3))
    planar = images.transpose(0, 3, 1, 2).reshape(4, -1)
    data = pickle.dumps({b"data": planar, b"labels": [2**32 + 3, 0, 0, 0]}, protocol=2)
    data_dir = write_pickle_batch(tmp_path, data)
    message = one_line_error(lambda: load("cifar10", "test", data_dir=data_dir, source="files"))
    assert "label 4294967299 at index 0 is outside 0..9" in message


def test_official_layout_of_python_batches(tmp_path):
    """What the unpickler admits: the official (Python 2) batches, and Python 3's protocols 2 to 4.

    Protocol 5 pickles arrays through numpy's _frombuffer, which is refused.
    """
    images, labels = random_split(8, (32, 32, 3), seed=4)
    planar = images.transpose(0, 3, 1, 2).reshape(8, -1)
    for data in [cifar_py2_pickle_bytes(images, labels), cifar_pickle_bytes(images, labels),
                 *(pickle.dumps({b"data": planar, b"labels": labels.tolist()}, protocol=p) for p in (3, 4))]:
        got_images, got_labels = parse_pickle(data, "batch")
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    protocol_5 = pickle.dumps({b"data": planar, b"labels": labels.tolist()}, protocol=5)
    assert "refusing to load numpy._core.numeric._frombuffer" in one_line_error(lambda: parse_pickle(protocol_5, "5"))


# --- Tarball members that leave the archive, links, devices --------------------------------------------


def special(kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo()
    info.type, info.linkname = kind, linkname
    return info


UNSAFE = {
    "../x.png": ("../x.png", None, "through '..'"),
    "train/../../x.png": ("train/../../x.png", None, "through '..'"),
    "train/3/../../../x.png": ("train/3/../../../x.png", None, "through '..'"),
    "..": ("..", "dir", "through '..'"),
    "/etc/x.png": ("/etc/x.png", None, "absolute path"),
    "symlink": ("train/3/link.png", special(tarfile.SYMTYPE, "/etc/passwd"), "symbolic link (to '/etc/passwd')"),
    "hidden symlink": ("train/3/.link.png", special(tarfile.SYMTYPE, "../../x"), "symbolic link"),
    "symlink folder": ("train/9", special(tarfile.SYMTYPE, "/"), "symbolic link"),
    "hardlink": ("train/3/hard.png", special(tarfile.LNKTYPE, "train/3/00000.png"), "hard link"),
    "character device": ("train/3/tty.png", special(tarfile.CHRTYPE), "character device"),
    "block device": ("train/3/sda.png", special(tarfile.BLKTYPE), "block device"),
    "FIFO": ("train/3/pipe.png", special(tarfile.FIFOTYPE), "FIFO"),
}


@pytest.mark.parametrize("kind", list(UNSAFE))
@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_unsafe_tar_members_are_refused(kind, mode, tmp_path, cache):
    """Refused with one line naming the member; nothing written anywhere (nothing is ever extracted)."""
    name, entry, needle = UNSAFE[kind]
    members = image_folder_members("train", *random_split(10, (28, 28, 1)), DIGITS)
    members[name] = image_bytes(np.zeros((28, 28, 1), np.uint8), "PNG") if entry is None else \
        None if entry == "dir" else entry
    data_dir = tmp_path / "a" / "b"  # '..' members would land in tmp_path, if anything extracted them
    (data_dir / "mnist").mkdir(parents=True)
    tarball = data_dir / "mnist" / ("train.tar.gz" if mode == "w:gz" else "train.tar")
    write_tar(tarball, members, mode)
    message = one_line_error(lambda: load("mnist", "train", data_dir=data_dir, source="files"), kind)
    assert f"{tarball}:{name}: member" in message and needle in message and "repack the archive" in message
    assert files_under(tmp_path) == {f"a/b/mnist/{tarball.name}"}


def test_unsafe_member_in_a_cifar_tarball(tmp_path, cache):
    """The CIFAR-10 archives follow the same rule, even for a member the loader would not read."""
    images, labels = random_split(4, (32, 32, 3))
    (tmp_path / "cifar10").mkdir()
    write_tar(tmp_path / "cifar10" / "cifar-10-binary.tar.gz", {
        "cifar-10-batches-bin/test_batch.bin": cifar_binary_bytes(images, labels),
        "cifar-10-batches-bin/readme.html": special(tarfile.SYMTYPE, "/etc/passwd"),
    })
    message = one_line_error(lambda: load("cifar10", "test", data_dir=tmp_path, source="files"))
    assert "readme.html: member is a symbolic link" in message
    assert files_under(tmp_path) == {"cifar10/cifar-10-binary.tar.gz"}


def test_a_good_tarball_writes_only_the_cache(tmp_path, cache):
    members = image_folder_members("train", *random_split(10, (28, 28, 1)), DIGITS)
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    write_tar(tmp_path / "data" / "mnist" / "train.tar.gz", members)
    assert len(load("mnist", "train", data_dir=tmp_path / "data", source="files")) == 10
    written = files_under(tmp_path)
    assert "data/mnist/train.tar.gz" in written
    assert all(name.startswith("cache/mnist-train-") and name.endswith(".npz") for name in written - {
        "data/mnist/train.tar.gz"}) and len(written) == 2


def test_member_names_that_are_not_printable_stay_on_one_line(tmp_path):
    members = image_folder_members("train", *random_split(10, (28, 28, 1)), DIGITS)
    members["train/3/a\nb.txt"] = b"not an image"
    (tmp_path / "mnist").mkdir()
    write_tar(tmp_path / "mnist" / "train.tar.gz", members)
    message = one_line_error(lambda: load("mnist", "train", data_dir=tmp_path, source="files"))
    assert "'train/3/a\\nb.txt'" in message and "not a PNG or JPEG" in message
