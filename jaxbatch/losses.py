"""Losses and gradients: one example at a time, under `jax.vmap`, and batched.

Text A asks whether a network trains on a mini-batch (1) one example at a
time, averaging the gradients after the batch, or (2) on the whole batch at
once. Both give the same gradient, because differentiation is linear: for the
mean loss over a batch B,

    L_B(theta) = (1/|B|) sum_{i in B} l(theta; x_i, y_i)
    grad L_B   = (1/|B|) sum_{i in B} grad l(theta; x_i, y_i).

This module writes the loss for ONE example, `example_loss`, and gets the
batch loss two ways that compute the same number:

    vmap_loss     mean over jax.vmap(example_loss)        (per-example, vectorised)
    batched_loss  the model applied to the whole batch    (what frameworks do)

`per_example_grads` is jax.vmap(jax.grad(example_loss)): every example's own
gradient, whose mean is the batch gradient (option 1, done in parallel).

Every function takes `apply_fn`, the model's `apply(params, x)`, first and is
a pure function of (params, batch). An optional per-example `weights` vector
(1 for a real example, 0 for padding) lets the last, partial batch of an
epoch run at the same shape: the mean is then sum_i w_i l_i / sum_i w_i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_KINDS = ("xent", "mse")


def cross_entropy(logits, label):
    """Softmax cross-entropy of one example with an integer label:
    l = logsumexp(z) - z_y."""
    return jax.nn.logsumexp(logits) - logits[label]


def mse(output, target):
    """Mean squared error of one example (text B's demonstration loss):
    l = (1/K) sum_k (o_k - t_k)^2."""
    return jnp.mean((output - target) ** 2)


def _loss_of_output(out, y, kind):
    return cross_entropy(out, y) if kind == "xent" else mse(out, y)


def example_loss_and_output(apply_fn, params, x, y, kind: str = "xent"):
    """(l(theta; x, y), model output) for ONE example: x has no batch axis, y is
    an int label (kind="xent") or a target vector (kind="mse")."""
    out = apply_fn(params, x)
    return _loss_of_output(out, y, kind), out


def example_loss(apply_fn, params, x, y, kind: str = "xent"):
    """The loss of ONE example, l(theta; x, y)."""
    return example_loss_and_output(apply_fn, params, x, y, kind)[0]


def _reduce(losses, weights, reduction):
    """mean: sum_i w_i l_i / sum_i w_i;  sum: sum_i w_i l_i (w_i = 1 if None)."""
    if weights is None:
        return jnp.sum(losses) if reduction == "sum" else jnp.mean(losses)
    total = jnp.sum(weights * losses)
    return total if reduction == "sum" else total / jnp.maximum(jnp.sum(weights), 1.0)


# ---- per-example: the one-example loss under jax.vmap ----------------------


def vmap_loss_and_outputs(apply_fn, params, xs, ys, weights=None, kind="xent", reduction="mean"):
    """(L_B, outputs) with every l_i computed by the one-example loss under jax.vmap."""
    losses, outs = jax.vmap(lambda x, y: example_loss_and_output(apply_fn, params, x, y, kind))(xs, ys)
    return _reduce(losses, weights, reduction), outs


def vmap_loss(apply_fn, params, xs, ys, weights=None, kind: str = "xent", reduction: str = "mean"):
    """L_B = (1/|B|) sum_i l(theta; x_i, y_i), each l_i computed by the
    one-example loss under jax.vmap."""
    return vmap_loss_and_outputs(apply_fn, params, xs, ys, weights, kind, reduction)[0]


# ---- batched: the model applied to the whole (B, ...) batch ----------------


def batched_loss_and_outputs(apply_fn, params, xs, ys, weights=None, kind="xent", reduction="mean"):
    """(L_B, outputs) from one forward pass over the whole batch."""
    out = apply_fn(params, xs)
    if kind == "xent":
        losses = jax.nn.logsumexp(out, axis=-1) - jnp.take_along_axis(out, ys[:, None], axis=-1)[:, 0]
    else:
        losses = jnp.mean((out - ys) ** 2, axis=-1)
    return _reduce(losses, weights, reduction), out


def batched_loss(apply_fn, params, xs, ys, weights=None, kind: str = "xent", reduction: str = "mean"):
    """The same L_B, the way frameworks compute it: one forward pass over the
    (B, ...) batch, then the mean of the B losses."""
    return batched_loss_and_outputs(apply_fn, params, xs, ys, weights, kind, reduction)[0]


BATCH_LOSSES = {"vmap": vmap_loss, "batched": batched_loss}
BATCH_LOSSES_AND_OUTPUTS = {"vmap": vmap_loss_and_outputs, "batched": batched_loss_and_outputs}


def per_example_grads(apply_fn, params, xs, ys, kind: str = "xent"):
    """g_i = grad_theta l(theta; x_i, y_i) for every example: a params pytree
    whose leaves have a leading batch axis. jax.vmap(jax.grad(example_loss))."""
    grad_one = jax.grad(lambda p, x, y: example_loss(apply_fn, p, x, y, kind))
    return jax.vmap(grad_one, in_axes=(None, 0, 0))(params, xs, ys)


def mean_per_example_grads(apply_fn, params, xs, ys, kind: str = "xent"):
    """(1/|B|) sum_i g_i: equals grad of vmap_loss and of batched_loss."""
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example_grads(apply_fn, params, xs, ys, kind))
