"""Choices that depend on the XLA backend, in one place, with the measurements
that justify each.

jaxbatch's code is the same on every backend. Two XLA:CPU behaviours were
slow enough to be worth a workaround there, and only there:

1. `mask_max_pool`: the gradient of `flax.linen.max_pool` is XLA's
   `select_and_scatter_add`, which XLA:CPU runs as a scalar loop: 60 ms for
   the cnn's first pool alone at batch 256. Written as a mask
   (`models/conv.py`: same values, same gradient, ties included) a cnn Adam
   step took 75 ms instead of 149 ms at batch 256, 9.9 ms instead of 15.2 ms
   at batch 50; LeNet-5's 38 ms instead of 69 ms (2-core AMD EPYC, jax 0.10).
2. `unrolled_conv_steps`: inside a loop body (lax.scan, lax.map, while)
   XLA:CPU leaves the convolutions that autodiff derives in layouts its fast
   kernels do not take, and runs them as plain loops: a cnn Adam step at
   batch 50 took 152 ms inside a rolled scan against 8 ms alone. A model with
   a convolution therefore trains 8 steps per scan call, fully unrolled:
   a `cnn-mnist` epoch took 9 s instead of 277 s, same numbers. A loop over
   chunks of examples inside one step (jaxbatch/chunks.py) unrolls when its
   body has a convolution, for the same reason, where speed is its purpose
   (the benchmark's per_example_chunked): per-example gradients of the cnn in
   chunks of 32 took 538 ms at B = 64 rolled, 21 ms unrolled. Chunks taken to
   bound memory (--dp-chunk, --dp-physical-batch) stay rolled: unrolled, their
   buffers were not reused. Dense models are not affected and scan rolled,
   like every model elsewhere.

GPUs and TPUs take the plain path (`flax.linen.max_pool`; rolled scans over
about a tenth of an epoch) until a measurement there says otherwise. Each
choice has a test that both paths compute the same numbers
(tests/test_models.py, tests/test_train.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class Choices(NamedTuple):
    mask_max_pool: bool  # max pool with a mask gradient instead of select_and_scatter_add
    unrolled_conv_steps: int | None  # steps per unrolled scan call for models with a convolution


PLAIN = Choices(mask_max_pool=False, unrolled_conv_steps=None)
CHOICES = {
    "cpu": Choices(mask_max_pool=True, unrolled_conv_steps=8),
}


def choices(backend: str | None = None) -> Choices:
    """The choices for `backend` (default: JAX's default backend)."""
    return CHOICES.get(backend or jax.default_backend(), PLAIN)


def unroll_loop(body, *args) -> bool:
    """Whether a loop whose body is `body(*args)` should be unrolled here: on
    a backend with `unrolled_conv_steps`, when the body has a convolution."""
    return choices().unrolled_conv_steps is not None and has_convolution(body, *args)


def has_convolution(fn, *args) -> bool:
    """Whether `fn(*args)` computes a convolution: its traced program holds a
    `conv_general_dilated`, at any depth. Asked of the program, so no model
    needs to declare it."""
    return _jaxpr_has(jax.make_jaxpr(fn)(*args).jaxpr, "conv_general_dilated")


def _jaxpr_has(jaxpr, primitive: str) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns") and _jaxpr_has(inner, primitive):
                    return True
    return False
