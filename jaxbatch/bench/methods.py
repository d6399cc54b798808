"""Six ways to get the mean gradient of a minibatch, all from jaxbatch.losses.

Every method returns the same pytree, the gradient of the mean loss (for
clipped, at a clip norm no example reaches)

    g = (1/B) sum_i grad_theta l(theta; x_i, y_i),

and differs only in how the work is laid out:

    batched              grad of batched_loss: the model applied to the (B, ...) batch
    vmap                 grad of vmap_loss: the one-example loss under jax.vmap, then the mean
    per_example          jax.vmap(jax.grad(example_loss)): B gradients, then their mean
    per_example_chunked  the same B gradients, `chunk` examples at a time, summed as they
                         come, so only `chunk` of them are in memory at once
    loop                 a Python loop of jitted one-example gradients, summed: option (1)
                         of text A taken literally; small batches only
    clipped              DP-SGD's clipped mean (1/B) sum_i g_i min(1, C / ||g_i||)
                         (losses.clipped_mean_grad: ghost norms and the clipped sum in one pass)

`make_step(method, apply_fn)` gives the jitted function of (params, xs, ys)
of the first three, which are `losses.batched_grad`, `losses.vmap_grad` and
`losses.mean_per_example_grads`; `make_chunked_step` and `make_loop_step`,
what only a benchmark needs, give Python functions that call jitted pieces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbatch import losses
from jaxbatch.errors import JaxbatchError

METHODS = ("batched", "vmap", "per_example", "clipped", "per_example_chunked", "loop")
# The benchmark's clip norm: so large that no example is clipped. The step does
# all of clipping's work (every ||g_i||, every factor, the clipped sum),
# and its gradient must then equal the batched one, which the run checks.
CLIP_NORM = 1e6


def clipped_grad(apply_fn, params, xs, ys):
    """The clipped mean gradient at CLIP_NORM (its norms are dropped)."""
    return losses.clipped_mean_grad(apply_fn, params, xs, ys, CLIP_NORM)[0]


# The three methods XLA compiles whole: the batch gradient as jaxbatch.losses
# computes it. Jitted here, with the model's apply static, so a step is compiled
# once per model, shapes and precision, however many cases and checks call it.
STEPS = {
    "batched": jax.jit(losses.batched_grad, static_argnums=0),
    "vmap": jax.jit(losses.vmap_grad, static_argnums=0),
    "per_example": jax.jit(losses.mean_per_example_grads, static_argnums=0),
    "clipped": jax.jit(clipped_grad, static_argnums=0),
}


@functools.partial(jax.jit, static_argnums=0)
def _chunk_sum(apply_fn, params, xs, ys):
    """sum_i g_i over one chunk of examples."""
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), losses.per_example_grads(apply_fn, params, xs, ys))


# The one-example gradient of the loop, one per model (its shape does not depend on B).
_example_grad = functools.cache(losses.example_grad_fn)

# Tree arithmetic for the steps driven from Python.
_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
_scale = jax.jit(lambda a, s: jax.tree.map(lambda t: t * s, a))


def make_step(method: str, apply_fn):
    """The jitted (params, xs, ys) -> mean gradient of batched, vmap or per_example."""
    if method not in STEPS:
        raise JaxbatchError(f"no single jit-able step for method {method!r}; choose from: {', '.join(STEPS)}")
    return functools.partial(STEPS[method], apply_fn)


def make_chunked_step(apply_fn, chunk: int):
    """Per-example gradients `chunk` examples at a time, summed as they come,
    so memory holds `chunk` gradients and one running sum, never B of them:
    gradient accumulation over per-example gradients. Returns (step,
    chunk_sum); chunk_sum(params, xs, ys) = sum_i g_i over one chunk (jitted).

    The chunks are dispatched from Python, not looped inside XLA with
    jax.lax.map(..., batch_size=chunk) / lax.scan: on XLA's CPU backend (jax
    0.10) the convolutions and matrix products inside a while loop's body miss
    the YNNPACK kernels: the cnn's chunked per-example gradients ran 13-24x
    slower than the same code unrolled (docs/bench.md)."""
    chunk_sum = functools.partial(_chunk_sum, apply_fn)

    def step(params, xs, ys):
        b = xs.shape[0]
        total = chunk_sum(params, xs[:chunk], ys[:chunk])
        for start in range(chunk, b, chunk):
            total = _add(total, chunk_sum(params, xs[start:start + chunk], ys[start:start + chunk]))
        return _scale(total, 1.0 / b)

    return step, chunk_sum


def make_loop_step(apply_fn):
    """One jitted one-example gradient per example, summed in a Python loop,
    then divided by B. Returns (step, one_grad): step(params, examples, ys)
    takes the examples as a list, as a data loader would hand them over.

    Unlike `losses.loop_grad`, which sums on the host in NumPy (a check wants
    the order of the additions plain), the running sum stays on the device:
    a benchmark on an accelerator would otherwise time B transfers to the host."""
    one_grad = _example_grad(apply_fn)

    def step(params, examples, labels):
        total = one_grad(params, examples[0], labels[0])
        for x, y in zip(examples[1:], labels[1:]):
            total = _add(total, one_grad(params, x, y))
        return _scale(total, 1.0 / len(examples))

    return step, one_grad
