"""The texts' demonstrations, one module each:

    equality      text A: the batch gradient five ways (the fifth, text D's
                  data parallelism, once per device count), equal to rounding
    variance      text D: minibatch gradient variance against B, and B_noise
    input-scale   text C: inputs x255 and what SGD makes of them
    lr-scaling    text D: constant, linear and square-root learning-rate rules
    activations   text E: ReLU, sigmoid, tanh and their derivatives; two
                  linear layers are one
    clipping      DP-SGD: clipping is where per-example and batched part;
                  per-example norms, and SGD vs clipped vs private training
    critical-batch  text D: steps and epochs to a target accuracy against B,
                  the critical batch size, and whether B_simple predicts it

Each module has a `Config` dataclass whose defaults are the full run on the
real datasets, every field declared once with its help text and valid values
(jaxbatch/settings.py: `jaxbatch experiment NAME`'s flags and `validate`
follow from them), `QUICK` (the fields a small offline run on `digits`
changes), `validate(config)` (`settings.check`, then the rules that need
code), `run(config, on_progress) -> result` (a JSON-able dict),
`summary(result)` (the printed table) and `figures(result)` ({name:
matplotlib Figure}). `run_experiment` adds the matmul precision the run used
to the result. A `run` that takes `out` gets the output folder, to keep
what it has finished there (critical-batch: a rerun skips it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import ModuleType

from jaxbatch.config import SEEDS
from jaxbatch.errors import JaxbatchError
from jaxbatch.experiments.report import check_out_dir, write_results
from jaxbatch.precision import matmul_precision

# The help texts of settings that every experiment has.
DATA_DIR = "folder holding <dataset>/ files (default $JAXBATCH_DATA_DIR or ~/.jaxbatch/data)"
SEED = f"seed of the initialisation and of every random draw, 0 .. {SEEDS - 1}"

EXPERIMENTS = {
    "equality": "equality",
    "variance": "variance",
    "input-scale": "input_scale",
    "lr-scaling": "lr_scaling",
    "activations": "activations",
    "clipping": "clipping",
    "critical-batch": "critical_batch",
}


def get_experiment(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise JaxbatchError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"jaxbatch.experiments.{EXPERIMENTS[name]}")


def make_config(name: str, quick: bool = False, **overrides):
    """The experiment's Config: its full defaults, or QUICK's with `quick`,
    then `overrides` (None values are ignored)."""
    module = get_experiment(name)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = set(overrides) - fields
    if unknown:
        raise JaxbatchError(f"experiment {name} has no setting {sorted(unknown)[0]!r}; "
                            f"its settings: {', '.join(sorted(fields))}")
    values = dict(module.QUICK) if quick else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return module.Config(**values)


def run_experiment(name: str, config, out, on_progress=None):
    """Run one experiment and write result.json and its plots to `out`.
    The folder is checked before any work, and written only at the end.
    Returns (result, paths written); the result records the float32 matmul
    precision it ran at (`precision.matmul_precision()`): on a GPU or TPU
    the default one is not float32, and the numbers depend on it."""
    module = get_experiment(name)
    check_out_dir(out)
    keeps = "out" in inspect.signature(module.run).parameters
    result = {**module.run(config, on_progress, **({"out": out} if keeps else {})), "precision": matmul_precision()}
    return result, write_results(out, result, module.figures(result))
