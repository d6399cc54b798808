#!/usr/bin/env python
"""Text C: fc_nobias on CIFAR-10 with inputs in [0, 1], x255, x255 with lr/255, with
initial weights/255, with lr/255^2, and standardised.

The same as `jaxbatch experiment input-scale`; try --quick (seconds, offline) and --help.
"""
import sys

from jaxbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "input-scale", *sys.argv[1:]]))
