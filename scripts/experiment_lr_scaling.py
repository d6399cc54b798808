#!/usr/bin/env python
"""Text D: constant, linear and square-root learning-rate rules across batch sizes,
with and without warm-up, for a fixed number of epochs and of steps.

The same as `jaxbatch experiment lr-scaling`; try --quick (seconds, offline) and --help.
"""
import sys

from jaxbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "lr-scaling", *sys.argv[1:]]))
