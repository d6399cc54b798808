"""Five ways to get the mean gradient of a minibatch, all from jaxbatch.losses.

Every method returns the same pytree, the gradient of the mean loss

    g = (1/B) sum_i grad_theta l(theta; x_i, y_i),

and differs only in how the work is laid out:

    batched              grad of batched_loss: the model applied to the (B, ...) batch
    vmap                 grad of vmap_loss: the one-example loss under jax.vmap, then the mean
    per_example          jax.vmap(jax.grad(example_loss)): B gradients, then their mean
    per_example_chunked  the same B gradients, `chunk` examples at a time in a lax.scan
                         (jax.lax.map's batch_size idea, with the sum carried), so only
                         `chunk` of them are in memory at once
    loop                 a Python loop of jitted one-example gradients, summed: option (1)
                         of text A taken literally; small batches only

`make_step(method, apply_fn, chunk)` gives a function of (params, xs, ys)
(for "loop", a Python function that calls jitted pieces).
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


def per_example_chunked_grad(apply_fn, params, xs, ys, chunk: int):
    """The B per-example gradients `chunk` at a time, summed as they come:
    a lax.scan over ceil(B / chunk) chunks, each a vmap(grad) of `chunk`
    examples, so memory holds `chunk` gradients and one running sum, never B
    of them. The last chunk is padded with weight-0 examples. Sum / B is the
    batch gradient."""
    b = xs.shape[0]
    chunk = min(chunk, b)
    n = -(-b // chunk)
    pad = n * chunk - b
    weights = jnp.concatenate([jnp.ones(b, jnp.float32), jnp.zeros(pad, jnp.float32)]).reshape(n, chunk)
    xs = jnp.pad(xs, [(0, pad)] + [(0, 0)] * (xs.ndim - 1)).reshape(n, chunk, *xs.shape[1:])
    ys = jnp.pad(ys, [(0, pad)] + [(0, 0)] * (ys.ndim - 1)).reshape(n, chunk, *ys.shape[1:])

    def add_chunk(total, chunk_xyw):
        x, y, w = chunk_xyw
        grads = jax.vmap(example_grad, in_axes=(None, None, 0, 0))(apply_fn, params, x, y)
        return jax.tree.map(lambda t, g: t + jnp.tensordot(w, g, axes=1), total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(add_chunk, zeros, (xs, ys, weights))
    return jax.tree.map(lambda t: t / b, total)


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


def make_step(method: str, apply_fn, chunk: int = 32):
    """The jit-able (params, xs, ys) -> mean gradient of `method` (not "loop")."""
    steps = {
        "batched": lambda p, xs, ys: batched_grad(apply_fn, p, xs, ys),
        "vmap": lambda p, xs, ys: vmap_grad(apply_fn, p, xs, ys),
        "per_example": lambda p, xs, ys: per_example_grad(apply_fn, p, xs, ys),
        "per_example_chunked": lambda p, xs, ys: per_example_chunked_grad(apply_fn, p, xs, ys, chunk),
    }
    if method not in steps:
        raise JaxbatchError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
    return steps[method]
