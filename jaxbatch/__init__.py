"""jaxbatch: how mini-batch training really works, in JAX.

The public API (what experiments, benchmarks, scripts and notebooks use):

    train, test = jaxbatch.load("digits", "train"), jaxbatch.load("digits", "test")
    model = jaxbatch.get_model("mlp")
    params = jaxbatch.init_params(model, jax.random.key(0), train.image_shape)
    g = jaxbatch.vmap_grad(model.apply, params, xs, ys)          # == batched_grad(...)
    result = jaxbatch.train_and_evaluate(jaxbatch.TrainConfig(epochs=3))

Layout (each file name says what lives in it):
  data/            datasets in: digits (bundled), IDX, CIFAR, image folders, TFDS,
                   downloads; inputs.py turns uint8 pixels into model inputs
  models/          the texts' networks, each written for ONE example
  losses.py        example_loss, vmap_loss, batched_loss, per_example_grads,
                   the batch gradient five ways, per-example clipping
  gradients.py     the gradient a training step uses, chosen once per run
  noise_scale.py   the gradient noise scale B_simple, measured while training
  privacy.py       DP-SGD's noise and its epsilon
  optim.py         Optax optimisers and learning-rate schedules
  config.py        TrainConfig: every training setting, declared once (settings.py)
  train.py         the training story: step, scan, evaluation, the epoch loop
  runlog.py        what a run writes (run folder, metrics, checkpoints) and reports
  devices.py       the device mesh, placement, per-device work, several hosts
  checkpoint.py    atomic checkpoints, exact resume
  recipes.py       presets that reproduce the texts' runs
  experiments/     demonstrations: gradient equality, variance vs batch size, ...
  bench/           per-example vs batched cost, against the hardware and PyTorch
  cli/             `jaxbatch ...`: parses arguments and calls the library
"""

__version__ = "0.1.0"

from jaxbatch.errors import JaxbatchError  # noqa: F401

# name -> module. Imported on first use, so that `import jaxbatch` (and the
# command line, which starts with it) does not load JAX before it must.
_API = {
    "load": "jaxbatch.data", "prepare_data": "jaxbatch.data", "Dataset": "jaxbatch.data",
    "input_numbers": "jaxbatch.data.inputs", "normalize": "jaxbatch.data.inputs",
    "get_model": "jaxbatch.models", "init_params": "jaxbatch.models", "Model": "jaxbatch.models",
    "TrainConfig": "jaxbatch.config", "train_and_evaluate": "jaxbatch.train", "TrainResult": "jaxbatch.train",
    "Interrupted": "jaxbatch.train", "init_key": "jaxbatch.train", "Diverged": "jaxbatch.runlog", "data_mesh": "jaxbatch.devices",
    **{name: "jaxbatch.losses" for name in (
        "cross_entropy", "mse", "example_loss", "vmap_loss", "batched_loss", "per_example_grads",
        "mean_per_example_grads", "vmap_grad", "batched_grad", "loop_grad", "example_grad_fn",
        "data_parallel_grad", "per_example_norms", "clipped_grad_sum", "clipped_mean_grad")},
}
__all__ = ["JaxbatchError", "__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'jaxbatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
