#!/usr/bin/env python
"""Per-example clipping (DP-SGD): mean of clipped gradients against the clipped mean on one batch,
the per-example gradient norms, and SGD, clipping-only and DP-SGD trained at equal steps.

The same as `jaxbatch experiment clipping`; try --quick (seconds, offline) and --help.
"""
import sys

from jaxbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "clipping", *sys.argv[1:]]))
