"""Six ways to get the mean gradient of a minibatch, all from jaxbatch.losses.

Each returns the same pytree, the gradient of the mean loss (for clipped, at a
clip norm no example reaches); they differ only in how the work is laid out
(the table in docs/bench.md). `make_step` gives the four that XLA compiles
whole (STEPS); `make_chunked_step` and `make_loop_step` the other two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbatch import losses
from jaxbatch.chunks import chunked_sum
from jaxbatch.errors import JaxbatchError

METHODS = ("batched", "vmap", "per_example", "clipped", "per_example_chunked", "loop")
# So large that no example is clipped: the step does all of clipping's work (every
# ||g_i||, every factor, the clipped sum) and must still give the batched gradient.
CLIP_NORM = 1e6


def clipped_grad(apply_fn, params, xs, ys):
    """The clipped mean gradient at CLIP_NORM (its norms are dropped)."""
    return losses.clipped_mean_grad(apply_fn, params, xs, ys, CLIP_NORM)[0]


# Jitted here with the model's apply static, so a step compiles once per model, shapes
# and precision, however many cases call it.
STEPS = {
    "batched": jax.jit(losses.batched_grad, static_argnums=0),
    "vmap": jax.jit(losses.vmap_grad, static_argnums=0),
    "per_example": jax.jit(losses.mean_per_example_grads, static_argnums=0),
    "clipped": jax.jit(clipped_grad, static_argnums=0),
}


def make_step(method: str, apply_fn):
    """The jitted (params, xs, ys) -> mean gradient of one of STEPS."""
    if method not in STEPS:
        raise JaxbatchError(f"no single jit-able step for method {method!r}; choose from: {', '.join(STEPS)}")
    return functools.partial(STEPS[method], apply_fn)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunked_grad(apply_fn, chunk, params, xs, ys):
    # One scan over the chunks (jaxbatch/chunks.py), unrolled where backends.py says loop bodies are slow.
    def chunk_sum(arrays, w):
        grads = losses.per_example_grads(apply_fn, params, *arrays)
        return jax.tree.map(lambda g: jnp.tensordot(w.astype(g.dtype), g, axes=1), grads), None

    b = xs.shape[0]
    total, _ = chunked_sum(chunk_sum, chunk, (xs, ys), jnp.ones((b,), jnp.float32))
    return jax.tree.map(lambda t: t / b, total)


def make_chunked_step(apply_fn, chunk: int):
    """The jitted (params, xs, ys) -> mean gradient from per-example gradients
    `chunk` at a time, summed as they come: memory for `chunk` gradients and
    one running sum, never B of them."""
    return functools.partial(_chunked_grad, apply_fn, chunk)


# The loop's one-example gradient, one per model (its shape does not depend on B).
_example_grad = functools.cache(losses.example_grad_fn)
_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
_scale = jax.jit(lambda a, s: jax.tree.map(lambda t: t * s, a))


def make_loop_step(apply_fn):
    """(step, one-example gradient): step(params, examples, labels) takes lists, as a data
    loader would hand them over, and sums jitted one-example gradients in a Python loop.
    Unlike `losses.loop_grad` (which sums in NumPy, for a check) the sum stays on the
    device: on an accelerator, B transfers would be timed."""
    one_grad = _example_grad(apply_fn)

    def step(params, examples, labels):
        total = one_grad(params, examples[0], labels[0])
        for x, y in zip(examples[1:], labels[1:]):
            total = _add(total, one_grad(params, x, y))
        return _scale(total, 1.0 / len(examples))

    return step, one_grad
