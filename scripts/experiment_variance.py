#!/usr/bin/env python
"""Text D: minibatch gradient variance E||g_B - g||^2 against the batch size B (slope -1),
and the gradient noise scale B_noise.

The same as `jaxbatch experiment variance`; try --quick (seconds, offline) and --help.
"""
import sys

from jaxbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "variance", *sys.argv[1:]]))
