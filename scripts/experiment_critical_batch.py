#!/usr/bin/env python
"""Text D: steps and epochs to a target accuracy against the batch size, the critical
batch size B_crit fitted to them, and the gradient noise scale B_simple beside it.

The same as `jaxbatch experiment critical-batch`; try --quick (about a minute, offline) and --help.
"""
import sys

from jaxbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "critical-batch", *sys.argv[1:]]))
