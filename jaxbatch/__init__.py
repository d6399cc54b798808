"""jaxbatch: how mini-batch training really works, in JAX.

Layout (each file name says what lives in it):
  data/            datasets in: digits (bundled), IDX, CIFAR, image folders, TFDS, downloads
  models/          the five texts' networks, each written for ONE example
  losses.py        example_loss, vmap_loss, batched_loss, per_example_grads
  optim.py         Optax optimisers and learning-rate schedules
  train.py         the jitted, scanned training loop and evaluation
  recipes.py       presets that reproduce the texts' runs
  experiments/     demonstrations: gradient equality, variance vs batch size, ...
  bench/           per-example vs batched cost, against the hardware and PyTorch
  cli/             `jaxbatch ...`: parses arguments and calls the library
"""

__version__ = "0.1.0"

from jaxbatch.errors import JaxbatchError  # noqa: F401
