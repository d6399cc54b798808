"""How fast the data layer reads the real datasets; prints measured seconds.

    python scripts/data_speed.py [DATA_DIR]      (default $JAXBATCH_DATA_DIR)

Targets on a 2-core machine: MNIST from gzipped IDX under 1 s; CIFAR-10 from
the decoded cache under 1 s; the first decode of the 60,000 CIFAR-10 JPEGs
under 60 s. The first decode uses a fresh, temporary cache folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jaxbatch.data as data
from jaxbatch.data import load


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_both(name, data_dir):
    for split in ("train", "test"):
        load(name, split, data_dir=data_dir, source="files")


def main() -> int:
    data_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("JAXBATCH_DATA_DIR")
    if not data_dir:
        sys.exit("usage: python scripts/data_speed.py DATA_DIR (or set JAXBATCH_DATA_DIR)")
    print(f"data folder {data_dir}, {os.cpu_count()} CPUs")
    for name in ("mnist", "fashion_mnist"):
        data._read.cache_clear()
        took = seconds(lambda: load(name, "train", data_dir=data_dir, source="files"))
        print(f"{name} train (60,000) from gzipped IDX: {took:.2f} s   (target < 1 s)")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["JAXBATCH_CACHE"] = cache
        data._read.cache_clear()
        took = seconds(lambda: load_both("cifar10", data_dir))
        print(f"cifar10 train+test (60,000 JPEGs), first decode: {took:.2f} s   (target < 60 s)")
        data._read.cache_clear()
        took = seconds(lambda: load_both("cifar10", data_dir))
        print(f"cifar10 train+test from the decoded cache: {took:.2f} s   (target < 1 s)")
        took = seconds(lambda: load_both("cifar10", data_dir))
        print(f"cifar10 train+test again in the same process: {took:.3f} s")
        data._read.cache_clear()  # the arrays in memory refer to nothing in `cache`, but be tidy
    return 0


if __name__ == "__main__":
    sys.exit(main())
