"""Five ways to get the mean gradient of a minibatch, all from jaxbatch.losses.

Every method returns the same pytree, the gradient of the mean loss

    g = (1/B) sum_i grad_theta l(theta; x_i, y_i),

and differs only in how the work is laid out:

    batched              grad of batched_loss: the model applied to the (B, ...) batch
    vmap                 grad of vmap_loss: the one-example loss under jax.vmap, then the mean
    per_example          jax.vmap(jax.grad(example_loss)): B gradients, then their mean
    per_example_chunked  the same B gradients, `chunk` examples at a time, summed as they
                         come, so only `chunk` of them are in memory at once
    loop                 a Python loop of jitted one-example gradients, summed: option (1)
                         of text A taken literally; small batches only

`make_step(method, apply_fn)` gives the jit-able function of (params, xs, ys)
of the first three; `make_chunked_step` and `make_loop_step` give Python
functions that call jitted pieces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbatch import losses
from jaxbatch.errors import JaxbatchError

METHODS = ("batched", "vmap", "per_example", "per_example_chunked", "loop")


def batched_grad(apply_fn, params, xs, ys):
    return jax.grad(lambda p: losses.batched_loss(apply_fn, p, xs, ys))(params)


def vmap_grad(apply_fn, params, xs, ys):
    return jax.grad(lambda p: losses.vmap_loss(apply_fn, p, xs, ys))(params)


def per_example_grad(apply_fn, params, xs, ys):
    return losses.mean_per_example_grads(apply_fn, params, xs, ys)


def example_grad(apply_fn, params, x, y):
    """grad_theta l(theta; x, y) for ONE example."""
    return jax.grad(lambda p: losses.example_loss(apply_fn, p, x, y))(params)


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
    chunk_sum = jax.jit(lambda p, xs, ys: jax.tree.map(
        lambda g: jnp.sum(g, axis=0), losses.per_example_grads(apply_fn, p, xs, ys)))
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    scale = jax.jit(lambda a, s: jax.tree.map(lambda t: t * s, a))

    def step(params, xs, ys):
        b = xs.shape[0]
        total = chunk_sum(params, xs[:chunk], ys[:chunk])
        for start in range(chunk, b, chunk):
            total = add(total, chunk_sum(params, xs[start:start + chunk], ys[start:start + chunk]))
        return scale(total, 1.0 / b)

    return step, chunk_sum


def make_loop_step(apply_fn):
    """One jitted one-example gradient per example, summed in a Python loop,
    then divided by B. Returns (step, one_grad): step(params, examples, ys)
    takes the examples as a list, as a data loader would hand them over."""
    one_grad = jax.jit(lambda p, x, y: example_grad(apply_fn, p, x, y))
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    scale = jax.jit(lambda a, s: jax.tree.map(lambda t: t * s, a))

    def step(params, examples, labels):
        total = one_grad(params, examples[0], labels[0])
        for x, y in zip(examples[1:], labels[1:]):
            total = add(total, one_grad(params, x, y))
        return scale(total, 1.0 / len(examples))

    return step, one_grad


def make_step(method: str, apply_fn):
    """The jit-able (params, xs, ys) -> mean gradient of batched, vmap or per_example."""
    steps = {
        "batched": lambda p, xs, ys: batched_grad(apply_fn, p, xs, ys),
        "vmap": lambda p, xs, ys: vmap_grad(apply_fn, p, xs, ys),
        "per_example": lambda p, xs, ys: per_example_grad(apply_fn, p, xs, ys),
    }
    if method not in steps:
        raise JaxbatchError(f"no single jit-able step for method {method!r}; choose from: {', '.join(steps)}")
    return steps[method]
