"""The decoded-array cache: entries read back are checked like fresh decodes, the key carries
the format number, and temporaries of killed writers are removed."""

import io
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from data_fixtures import count_decodes, image_folder_members, random_split, write_tar

import jaxbatch.data as data_module
from jaxbatch.data import cache, load

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def decodes(monkeypatch):
    """How many times the image folder was decoded (not served from the cache)."""
    return count_decodes(monkeypatch)


def mnist_tarball(tmp_path, n=20):
    """An mnist training split as `train.tar.gz`; returns the data folder."""
    images, labels = random_split(n, (28, 28, 1), seed=7)
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    write_tar(tmp_path / "data" / "mnist" / "train.tar.gz", image_folder_members("train", images, labels, DIGITS))
    return tmp_path / "data"


def load_fresh(data_dir):
    """load(), past the in-memory copy: the disk cache or the source must serve it."""
    data_module._read.cache_clear()
    return load("mnist", "train", data_dir=data_dir, source="files")


def npz_bytes(**arrays) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def big_header_npz(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A well-formed .npz whose images header claims 100,000 images (78 MB) over the bytes of a few:
    numpy would allocate the claim before finding the data missing."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (100_000, 28, 28, 1)})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + images.tobytes())
        archive.writestr("labels.npy", npz_member(labels))
    return out.getvalue()


def garbled_header_npz(images: np.ndarray, labels: np.ndarray) -> bytes:
    """An .npz whose images header reads `'shape': (1099511627776,, }`: numpy's parser raises
    tokenize.TokenError on it, which the old cache did not catch (a traceback)."""
    shape = str(images.shape).encode()
    member = npz_member(images).replace(shape, b"(1099511627776,"[:len(shape)].ljust(len(shape)), 1)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("images.npy", member)
        archive.writestr("labels.npy", npz_member(labels))
    return out.getvalue()


def npz_member(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array)
    return out.getvalue()


def bad_entries(images, labels):
    """{case: bytes of a cache entry that must not be used}: each was used as is by the old cache."""
    n = len(labels)
    bad_label = labels.copy()
    bad_label[3] = 77
    return {
        "label 77": npz_bytes(images=images, labels=bad_label),
        "8x8 images": npz_bytes(images=np.zeros((n, 8, 8, 1), np.uint8), labels=labels),
        "float pixels 1e9": npz_bytes(images=np.full(images.shape, 1e9), labels=labels),
        "3 labels for 50 images": npz_bytes(images=np.zeros((50, 28, 28, 1), np.uint8), labels=labels[:3]),
        "float labels": npz_bytes(images=images, labels=labels.astype(np.float32)),
        "labels (N, 2)": npz_bytes(images=images, labels=np.stack([labels, labels], 1)),
        "no examples": npz_bytes(images=images[:0], labels=labels[:0]),
        "no labels member": npz_bytes(images=images),
        "header claiming 100,000 images": big_header_npz(images, labels),
        "garbled header": garbled_header_npz(images, labels),
        "cut short": npz_bytes(images=images, labels=labels)[:5000],
        "not a zip file": b"hello",
    }


CASES = ["label 77", "8x8 images", "float pixels 1e9", "3 labels for 50 images", "float labels", "labels (N, 2)",
         "no examples", "no labels member", "header claiming 100,000 images", "garbled header", "cut short",
         "not a zip file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_entry_is_removed_and_rebuilt_from_the_source(tmp_path, own_cache, decodes, case):
    data_dir = mnist_tarball(tmp_path)
    first = load_fresh(data_dir)
    (entry,) = own_cache.glob("*.npz")
    assert len(decodes) == 1 and len(load_fresh(data_dir)) == 20 and len(decodes) == 1  # a hit, as it should be
    entry.write_bytes(bad_entries(np.asarray(first.images), np.asarray(first.labels))[case])
    tracemalloc.start()
    try:
        again = load_fresh(data_dir)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(decodes) == 2, "the bad entry was used"
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert peak < 16 << 20, f"{peak} bytes held reading a {case} entry"
    # The bad entry was replaced by a good one, which the next load uses.
    assert [p.name for p in own_cache.iterdir()] == [entry.name]
    with np.load(entry) as rebuilt:
        np.testing.assert_array_equal(rebuilt["labels"], first.labels)
    load_fresh(data_dir)
    assert len(decodes) == 2


def test_format_number_is_in_the_key(tmp_path, own_cache, decodes, monkeypatch):
    """A new format never reads an old entry (even a good one), and the old entry goes."""
    data_dir = mnist_tarball(tmp_path)
    load_fresh(data_dir)
    (old,) = own_cache.glob("*.npz")
    assert f"-f{cache.FORMAT}-" in old.name
    monkeypatch.setattr(cache, "FORMAT", cache.FORMAT + 1)
    load_fresh(data_dir)
    (new,) = own_cache.glob("*.npz")
    assert len(decodes) == 2 and new != old and f"-f{cache.FORMAT}-" in new.name


def test_entry_named_before_format_numbers_is_never_read(tmp_path, own_cache, decodes):
    """Entries of the first layout were named <name>-<split>-<source>-<state>.npz: a miss, then removed."""
    data_dir = mnist_tarball(tmp_path)
    first = load_fresh(data_dir)
    (entry,) = own_cache.glob("*.npz")
    # The format mark is the last "f<FORMAT>-" in the name: the state digest after it has no dash,
    # while the source digest before it is random hex that may itself end in "f<FORMAT>".
    head, mark, state = entry.name.rpartition(f"-f{cache.FORMAT}-")
    unnumbered = entry.with_name(f"{head}-{state}")
    assert mark and unnumbered.name.count("-") == 3
    entry.rename(unnumbered)
    load_fresh(data_dir)
    assert len(decodes) == 2 and sorted(own_cache.iterdir()) == [entry]
    assert len(first) == 20


def dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def test_temporaries_of_dead_writers_are_removed(tmp_path, own_cache):
    own_cache.mkdir()
    dead, alive = dead_pid(), os.getppid()
    names = {
        f".mnist-train-x.npz.{dead}.tmp": False,  # a cache write killed midway: removed
        f".mnist-train-x.npz.{alive}.tmp": True,  # another process writing now: kept
        f".mnist-train-x.npz.{os.getpid()}.tmp": True,  # this process
        f".notes.txt.{dead}.tmp": True,  # not a cache entry
        ".mnist-train-x.npz.12ab.tmp": True,  # not named by atomic.py
    }
    for name in names:
        (own_cache / name).write_bytes(b"partial")
    load_fresh(mnist_tarball(tmp_path))
    left = {p.name for p in own_cache.iterdir() if p.name.endswith(".tmp")}
    assert left == {name for name, kept in names.items() if kept}


WRITER = """
import sys, time
import numpy as np
from pathlib import Path
from jaxbatch.data import cache

def stuck_savez(f, **arrays):  # np.savez, killed part-way through
    f.write(b"PK partial entry")
    f.flush()
    time.sleep(60)

np.savez = stuck_savez
images, labels = np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1, np.int32)
cache.cached_arrays("mnist", "train", Path(sys.argv[1]), (), lambda: (images, labels), lambda *a: None)
"""


def test_temporary_of_a_killed_cache_write_is_removed_by_the_next_run(tmp_path, own_cache, decodes):
    data_dir = mnist_tarball(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir / "mnist" / "train.tar.gz")])
    try:
        end = time.monotonic() + 60
        while not list(own_cache.glob(f".*.npz.{child.pid}.tmp")):
            assert time.monotonic() < end and child.poll() is None, "the writer never started its entry"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(timeout=30)
    (temporary,) = own_cache.glob(".*.tmp")
    assert temporary.name.endswith(f".npz.{child.pid}.tmp")
    assert len(load_fresh(data_dir)) == 20
    assert not temporary.exists() and [p.name.endswith(".npz") for p in own_cache.iterdir()] == [True]
