#!/usr/bin/env python
"""Text E: ReLU, sigmoid and tanh with their derivatives by jax.vmap(jax.grad(f));
two linear layers without an activation equal one.

The same as `jaxbatch experiment activations`; try --quick (seconds, offline) and --help.
"""
import sys

from jaxbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "activations", *sys.argv[1:]]))
