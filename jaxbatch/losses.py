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
gradient, whose mean is the batch gradient (option 1, done in parallel). The
batch gradient itself comes five ways, here and nowhere else:

    loop_grad               a Python loop of one-example gradients, averaged (option 1, literally)
    mean_per_example_grads  the mean of per_example_grads
    vmap_grad               jax.grad of vmap_loss
    batched_grad            jax.grad of batched_loss (option 2)
    data_parallel_grad      K devices, each the batched gradient of B/K examples, averaged (text D)

The loss of one output is a function passed in, `loss_fn(output, y)`:
`cross_entropy` (the default) or `mse` (text B), or any other of that shape.

Every function takes `apply_fn`, the model's `apply(params, x)`, first and is
a pure function of (params, batch). An optional per-example `weights` vector
(1 for a real example, 0 for padding) lets the last, partial batch of an
epoch run at the same shape: the mean is then sum_i w_i l_i / sum_i w_i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch import ghost
from jaxbatch.chunks import chunked_sum
from jaxbatch.devices import BY_EXAMPLE, SHARED, per_device


def cross_entropy(logits, label):
    """Softmax cross-entropy of one example with an integer label:
    l = logsumexp(z) - z_y."""
    return jax.nn.logsumexp(logits) - logits[label]


def mse(output, target):
    """Mean squared error of one example (text B's demonstration loss):
    l = (1/K) sum_k (o_k - t_k)^2."""
    return jnp.mean((output - target) ** 2)


def example_loss_and_output(apply_fn, params, x, y, loss_fn=cross_entropy):
    """(l(theta; x, y), model output) for ONE example: x has no batch axis;
    `loss_fn(output, y)` is the loss of one output (cross_entropy with an int
    label, mse with a target vector, or any function of the same shape)."""
    out = apply_fn(params, x)
    return loss_fn(out, y), out


def example_loss(apply_fn, params, x, y, loss_fn=cross_entropy):
    """The loss of ONE example, l(theta; x, y)."""
    return example_loss_and_output(apply_fn, params, x, y, loss_fn)[0]


def _reduce(losses, weights, reduction):
    """mean: sum_i w_i l_i / sum_i w_i;  sum: sum_i w_i l_i (w_i = 1 if None)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")
    if weights is None:
        return jnp.sum(losses) if reduction == "sum" else jnp.mean(losses)
    total = jnp.sum(weights * losses)
    return total if reduction == "sum" else total / jnp.maximum(jnp.sum(weights), 1.0)


# ---- per-example: the one-example loss under jax.vmap ----------------------


def vmap_loss_and_outputs(apply_fn, params, xs, ys, weights=None, loss_fn=cross_entropy, reduction="mean"):
    """(L_B, outputs) with every l_i computed by the one-example loss under jax.vmap."""
    losses, outs = jax.vmap(lambda x, y: example_loss_and_output(apply_fn, params, x, y, loss_fn))(xs, ys)
    return _reduce(losses, weights, reduction), outs


def vmap_loss(apply_fn, params, xs, ys, weights=None, loss_fn=cross_entropy, reduction="mean"):
    """L_B = (1/|B|) sum_i l(theta; x_i, y_i), each l_i computed by the
    one-example loss under jax.vmap."""
    return vmap_loss_and_outputs(apply_fn, params, xs, ys, weights, loss_fn, reduction)[0]


# ---- batched: the model applied to the whole (B, ...) batch ----------------


def batched_loss_and_outputs(apply_fn, params, xs, ys, weights=None, loss_fn=cross_entropy, reduction="mean"):
    """(L_B, outputs) from one forward pass over the whole batch."""
    out = apply_fn(params, xs)
    # The network ran once on the (B, ...) batch; scoring its B output rows is
    # elementwise work, so the one-output loss is mapped over them.
    return _reduce(jax.vmap(loss_fn)(out, ys), weights, reduction), out


def batched_loss(apply_fn, params, xs, ys, weights=None, loss_fn=cross_entropy, reduction="mean"):
    """The same L_B, the way frameworks compute it: one forward pass over the
    (B, ...) batch, then the mean of the B losses."""
    return batched_loss_and_outputs(apply_fn, params, xs, ys, weights, loss_fn, reduction)[0]


# ---- gradients: the batch gradient five ways --------------------------------


def per_example_grads(apply_fn, params, xs, ys, loss_fn=cross_entropy):
    """g_i = grad_theta l(theta; x_i, y_i) for every example: a params pytree
    whose leaves have a leading batch axis. jax.vmap(jax.grad(example_loss))."""
    grad_one = jax.grad(lambda p, x, y: example_loss(apply_fn, p, x, y, loss_fn))
    return jax.vmap(grad_one, in_axes=(None, 0, 0))(params, xs, ys)


def mean_per_example_grads(apply_fn, params, xs, ys, loss_fn=cross_entropy):
    """(1/|B|) sum_i g_i: equals grad of vmap_loss and of batched_loss."""
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example_grads(apply_fn, params, xs, ys, loss_fn))


def vmap_grad(apply_fn, params, xs, ys, loss_fn=cross_entropy):
    """grad L_B with L_B = vmap_loss: the mean of the vmapped one-example loss."""
    return jax.grad(lambda p: vmap_loss(apply_fn, p, xs, ys, loss_fn=loss_fn))(params)


def batched_grad(apply_fn, params, xs, ys, loss_fn=cross_entropy):
    """grad L_B with L_B = batched_loss: one forward and backward pass over the batch."""
    return jax.grad(lambda p: batched_loss(apply_fn, p, xs, ys, loss_fn=loss_fn))(params)


def loop_grad(grad_one, params, xs, ys):
    """Text A's option 1, literally: one example at a time, summed in order,
    then divided by |B|. `grad_one(params, x, y)` is the gradient of one
    example's loss (jit it once; see `example_grad_fn`). The running sum is kept
    in NumPy, in the gradient's own dtype, so the loop adds no compiled steps
    of its own. Small batches only: one dispatch per example."""
    total = None
    for x, y in zip(xs, ys):
        g = jax.tree.map(np.asarray, grad_one(params, x, y))
        total = g if total is None else jax.tree.map(np.add, total, g)
    return jax.tree.map(lambda t: t / t.dtype.type(len(ys)), total)


def example_grad_fn(apply_fn, loss_fn=cross_entropy):
    """(params, x, y) -> grad_theta l(theta; x, y) for ONE example, jitted."""
    return jax.jit(jax.grad(lambda p, x, y: example_loss(apply_fn, p, x, y, loss_fn)))


def data_parallel_grad(apply_fn, params, xs, ys, mesh, loss_fn=cross_entropy):
    """Text D's way, with K = mesh.size devices on a mesh axis named "data":
    device k computes the batched gradient of its own B/K examples B_k, then
    the K gradients are averaged across devices (`lax.pmean`, an all-reduce):

        (1/K) sum_k grad L_{B_k} = (1/K) sum_k (K/B) sum_{i in B_k} g_i = grad L_B.

    So K workers with B/K examples each compute the gradient of one batch of
    B. (Training does the same without saying so: `train.run_chunk` is jitted
    with the batch split along "data" and XLA inserts this all-reduce.)"""
    return data_parallel(lambda p, x, y: batched_grad(apply_fn, p, x, y, loss_fn), mesh)(params, xs, ys)


def data_parallel(grad_fn, mesh):
    """`grad_fn(params, xs, ys) -> mean gradient` on each device of `mesh` with
    its own share of the batch, the K means then averaged (`lax.pmean`, an
    all-reduce): with equal shares, the mean gradient of the whole batch.
    `data_parallel_grad` is this with the batched gradient; the benchmark's
    scaling runs it with every method's step (jaxbatch/bench/scaling.py)."""
    return per_device(lambda p, x, y: jax.lax.pmean(grad_fn(p, x, y), "data"), mesh, SHARED)


# ---- where the ways part: per-example clipping (DP-SGD) ---------------------
#
# Everything above is linear in the g_i, so the mean of per-example gradients
# is the batch gradient. Clipping is not: differentially private SGD (Abadi et
# al. 2016, "Deep Learning with Differential Privacy") bounds every example's
# influence by scaling its gradient to norm at most C before averaging,
#
#     g_bar = (1/B) sum_i g_i * min(1, C / ||g_i||),
#
# and clip(mean) != mean(clip) unless C is above every ||g_i||. So here one
# example at a time is required, and vmap makes it cheap.


def per_example_values_and_grads(apply_fn, params, xs, ys, loss_fn=cross_entropy):
    """((l_i, outputs_i), g_i) for every example, from one vmapped value_and_grad."""
    one = jax.value_and_grad(lambda p, x, y: example_loss_and_output(apply_fn, p, x, y, loss_fn), has_aux=True)
    return jax.vmap(one, in_axes=(None, 0, 0))(params, xs, ys)


def per_example_norms(grads):
    """||g_i||: the L2 norm of each example's whole gradient (all parameter
    arrays together), from per-example gradients with a leading batch axis."""
    squares = [jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in jax.tree.leaves(grads)]
    return jnp.sqrt(sum(squares))


def clip_factors(norms, clip):
    """min(1, C / ||g_i||); 1 for a zero gradient."""
    return jnp.minimum(1.0, clip / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))


def _clipped_sum_one_chunk(apply_fn, params, xs, ys, weights, clip, loss_fn):
    (losses, outputs), grads = per_example_values_and_grads(apply_fn, params, xs, ys, loss_fn)
    norms = per_example_norms(grads)
    scale = weights * clip_factors(norms, clip)
    total = jax.tree.map(lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), grads)
    return total, {"norms": norms, "losses": losses, "outputs": outputs}


def per_example_sq_norms(apply_fn, params, xs, ys, loss_fn=cross_entropy, method="auto", mesh=None):
    """(||g_i||^2 for every example, per-example losses, outputs), without
    forming the g_i where the model allows: method "auto" takes ghost norms
    (jaxbatch/ghost.py) for flax Dense and Conv layers applied to a batch,
    vmapped gradients for any other parameter; "vmap" always forms
    per_example_grads. Both give the same norms
    (tests/test_privacy.py checks them against each other and a loop).

    With a `mesh` of several devices (the batch split along "data"), each
    device computes the norms of its own examples under shard_map. Left to
    jit's sharding propagation, XLA (jax 0.10.2, CPU) computed wrong
    per-example gradients of convolutions for the second device's examples."""
    if mesh is not None and mesh.size > 1:
        def own(p, x, y):
            return per_example_sq_norms(apply_fn, p, x, y, loss_fn, method)

        return per_device(own, mesh, (BY_EXAMPLE,) * 3)(params, xs, ys)
    taken = ghost.layers(apply_fn, params, xs) if method == "auto" else None
    if taken:
        return ghost.per_example_sq_norms(apply_fn, params, xs, ys, loss_fn, taken)
    (losses, outputs), grads = per_example_values_and_grads(apply_fn, params, xs, ys, loss_fn)
    return per_example_norms(grads) ** 2, losses, outputs


def _clipped_sum_one_pass(apply_fn, params, xs, ys, clip, weights, loss_fn, mesh):
    """clipped_grad_sum for a model ghost.covers_all takes; with a mesh of
    several devices, each device its own examples, the sums added up (psum)."""
    def local(p, x, y, w):
        total, sq, losses, outputs = ghost.weighted_grad_sum(
            apply_fn, p, x, y, loss_fn, ghost.layers(apply_fn, p, x),
            lambda sq, losses: (w * clip_factors(jnp.sqrt(sq), clip)).astype(losses.dtype))
        return total, {"norms": jnp.sqrt(sq), "losses": losses, "outputs": outputs}

    if mesh is None or mesh.size == 1:
        return local(params, xs, ys, weights)

    def own(p, x, y, w):
        total, per_example = local(p, x, y, w)
        return jax.lax.psum(total, "data"), per_example

    return per_device(own, mesh, (SHARED, BY_EXAMPLE))(params, xs, ys, weights)


def clipped_grad_sum(apply_fn, params, xs, ys, clip, weights=None, loss_fn=cross_entropy, chunk=None,
                     method="auto", mesh=None):
    """sum_i w_i * min(1, C / ||g_i||) * g_i, and per example {"norms": ||g_i||
    (before clipping), "losses": l_i, "outputs"}. Weights (1 real, 0 padding)
    drop padded examples.

    method "auto": when every parameter sits in a flax Dense or Conv layer,
    ONE forward and backward pass gives the norms and the clipped sum
    (jaxbatch/ghost.py). Otherwise the norms from `per_example_sq_norms`
    (ghost norms where the model allows), then the clipped sum as one more
    batched backward pass of sum_i c_i l_i with the factors c_i held
    constant. Either way no g_i is ever formed.
    method "vmap": the definition, every g_i formed (jax.vmap(jax.grad)),
    scaled and summed; with `chunk`, `chunk` examples at a time
    (jaxbatch/chunks.py), so only chunk x (number of parameters) gradient entries exist at
    once, not B x. All give the same sum, added in other orders (equal to
    rounding)."""
    b = xs.shape[0]
    weights = jnp.ones((b,), xs.dtype if jnp.issubdtype(xs.dtype, jnp.floating) else jnp.float32) \
        if weights is None else weights
    if method == "auto" and chunk is None and ghost.covers_all(apply_fn, params, xs):
        return _clipped_sum_one_pass(apply_fn, params, xs, ys, clip, weights, loss_fn, mesh)
    if method == "auto" and chunk is None:
        sq, losses, outputs = per_example_sq_norms(apply_fn, params, xs, ys, loss_fn, mesh=mesh)
        norms = jnp.sqrt(sq)
        scale = jax.lax.stop_gradient(weights * clip_factors(norms, clip)).astype(losses.dtype)
        total = jax.grad(lambda p: jnp.sum(scale * jax.vmap(loss_fn)(apply_fn(p, xs), ys)))(params)
        return total, {"norms": norms, "losses": losses, "outputs": outputs}
    def one_chunk(arrays, w):
        return _clipped_sum_one_chunk(apply_fn, params, *arrays, w, clip, loss_fn)

    return chunked_sum(one_chunk, chunk or b, (xs, ys), weights, unroll=False)  # chunks bound memory: rolled


def clipped_mean_grad(apply_fn, params, xs, ys, clip, loss_fn=cross_entropy, chunk=None, method="auto"):
    """(1/B) sum_i g_i * min(1, C / ||g_i||): DP-SGD's clipped mean gradient,
    before its noise (jaxbatch/privacy.py adds that). Returns (gradient, ||g_i||)."""
    total, per_example = clipped_grad_sum(apply_fn, params, xs, ys, clip, loss_fn=loss_fn, chunk=chunk,
                                          method=method)
    return jax.tree.map(lambda t: t / xs.shape[0], total), per_example["norms"]
