#!/usr/bin/env python
"""Text A: the batch gradient four ways (a Python loop of one-example gradients, vmap(grad),
grad of the vmapped mean, grad of the batched loss), equal to rounding in float32 and float64.

The same as `jaxbatch experiment equality`; try --quick (seconds, offline) and --help.
"""
import sys

from jaxbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "equality", *sys.argv[1:]]))
