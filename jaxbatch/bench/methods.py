"""Six ways to get the mean gradient of a minibatch, all from jaxbatch.losses.

Every method returns the same pytree, the gradient of the mean loss (for
clipped, at a clip norm no example reaches)

    g = (1/B) sum_i grad_theta l(theta; x_i, y_i),

and differs only in how the work is laid out:

    batched              grad of batched_loss: the model applied to the (B, ...) batch
    vmap                 grad of vmap_loss: the one-example loss under jax.vmap, then the mean
    per_example          jax.vmap(jax.grad(example_loss)): B gradients, then their mean
    clipped              DP-SGD's clipped mean (1/B) sum_i g_i min(1, C / ||g_i||)
                         (losses.clipped_mean_grad: ghost norms and the clipped sum in one pass)
    per_example_chunked  the same B gradients, `chunk` examples at a time, summed as they
                         come, so only `chunk` of them are in memory at once
    loop                 a Python loop of jitted one-example gradients, summed: option (1)
                         of text A taken literally; small batches only

`make_step(method, apply_fn)` gives the jitted (params, xs, ys) -> gradient of
the first four (STEPS); `make_chunked_step` and `make_loop_step` give the
other two, which only a benchmark needs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbatch import backends, losses
from jaxbatch.errors import JaxbatchError

METHODS = ("batched", "vmap", "per_example", "clipped", "per_example_chunked", "loop")
# So large that no example is clipped: the step does all of clipping's work (every
# ||g_i||, every factor, the clipped sum) and must still give the batched gradient.
CLIP_NORM = 1e6


def clipped_grad(apply_fn, params, xs, ys):
    """The clipped mean gradient at CLIP_NORM (its norms are dropped)."""
    return losses.clipped_mean_grad(apply_fn, params, xs, ys, CLIP_NORM)[0]


# The four methods XLA compiles whole, jitted here with the model's apply static,
# so a step compiles once per model, shapes and precision, however many cases call it.
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


@functools.partial(jax.jit, static_argnums=0)
def _chunk_sum(apply_fn, params, xs, ys):
    """sum_i g_i over one chunk of examples."""
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), losses.per_example_grads(apply_fn, params, xs, ys))


# The one-example gradient of the loop, one per model (its shape does not depend on B).
_example_grad = functools.cache(losses.example_grad_fn)
_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
_scale = jax.jit(lambda a, s: jax.tree.map(lambda t: t * s, a))


def chunks_from_python() -> bool:
    """Whether per_example_chunked dispatches its chunks from Python. On XLA:CPU
    (jax 0.10) the convolutions and products inside a loop body (lax.scan,
    lax.map) miss the fast kernels: the cnn's chunked per-example gradients
    ran 13-24x slower in a scan than unrolled (docs/bench.md). backends.py
    holds that choice: a backend whose loop bodies are slow unrolls scans."""
    return backends.choices().unrolled_conv_steps is not None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scanned_chunks(apply_fn, chunk, params, xs, ys):
    """sum_i g_i / B with one lax.scan over the whole chunks, then the last partial one."""
    b, whole = xs.shape[0], xs.shape[0] // chunk * chunk
    chunks = (xs[:whole].reshape(-1, chunk, *xs.shape[1:]), ys[:whole].reshape(-1, chunk))

    def add(total, batch):
        return _add(total, _chunk_sum(apply_fn, params, *batch)), None

    total, _ = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), chunks)
    if whole < b:
        total = _add(total, _chunk_sum(apply_fn, params, xs[whole:], ys[whole:]))
    return _scale(total, 1.0 / b)


def make_chunked_step(apply_fn, chunk: int):
    """Per-example gradients `chunk` examples at a time, summed as they come,
    so memory holds `chunk` gradients and one running sum, never B of them:
    gradient accumulation over per-example gradients. Returns (step, chunk
    sum of this model); the step is a Python loop over jitted chunks where
    chunks_from_python(), else one jitted scan."""
    one_chunk = functools.partial(_chunk_sum, apply_fn)
    if not chunks_from_python():
        return functools.partial(_scanned_chunks, apply_fn, chunk), one_chunk

    def step(params, xs, ys):
        total = one_chunk(params, xs[:chunk], ys[:chunk])
        for start in range(chunk, xs.shape[0], chunk):
            total = _add(total, one_chunk(params, xs[start:start + chunk], ys[start:start + chunk]))
        return _scale(total, 1.0 / xs.shape[0])

    return step, one_chunk


def make_loop_step(apply_fn):
    """One jitted one-example gradient per example, summed in a Python loop,
    then divided by B. Returns (step, one-example gradient); step(params,
    examples, labels) takes lists, as a data loader would hand them over.
    Unlike `losses.loop_grad` (which sums in NumPy, for a check), the sum
    stays on the device: on an accelerator B transfers would be timed."""
    one_grad = _example_grad(apply_fn)

    def step(params, examples, labels):
        total = one_grad(params, examples[0], labels[0])
        for x, y in zip(examples[1:], labels[1:]):
            total = _add(total, one_grad(params, x, y))
        return _scale(total, 1.0 / len(examples))

    return step, one_grad
