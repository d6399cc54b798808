"""The gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training"), measured during training.

    B_simple = tr(S) / |G|^2

tr(S) is the summed variance of one example's gradient, |G|^2 the squared
norm of the true gradient: batches much smaller than B_simple are dominated
by noise, much larger ones waste examples. Both come from the per-example
gradient norms ||g_i|| and the step's own mean gradient (`estimates`).

`NoiseScale` wraps a step's gradient function (gradients.BatchGrad) and adds
these terms to its epoch sums on every k-th step. A model made only of Dense
layers gets every ||g_i|| from the step's own backward pass
(ghost.grads_and_sq_norms), so measuring costs nothing; any other model
takes an extra pass (ghost norms where it can) on the steps that count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxbatch import ghost
from jaxbatch.gradients import BatchGrad, mean_loss
from jaxbatch.losses import cross_entropy, per_example_sq_norms

SUMS = ("ns_g2", "ns_trace", "ns_steps")  # the epoch sums NoiseScale adds


class NoiseScale(NamedTuple):
    """`inner`'s gradient, plus `estimates` on every `every`-th step."""
    inner: BatchGrad
    every: int = 4
    mesh: Mesh | None = None  # several devices: each takes its own examples' norms

    def __call__(self, params, x, labels, weights, step, numbers):
        apply_fn, reduction = self.inner.apply_fn, self.inner.reduction
        counted = step % self.every == 0
        if ghost.covers_all(apply_fn, params, x, dense_only=True):
            # The gradient from a batched forward pass through the tapped layers,
            # equal to the inner (vmap or batched) loss's gradient to rounding.
            grads, loss, outputs, sq = ghost.grads_and_sq_norms(apply_fn, params, x, labels, weights,
                                                                cross_entropy, reduction)
            mean = _mean_grad(grads, weights, reduction)
            sums = {k: counted.astype(loss.dtype) * v for k, v in estimates(sq, weights, mean).items()}
            return grads, mean_loss(loss, weights, reduction), outputs, sums
        grads, loss, outputs, _ = self.inner(params, x, labels, weights, step, numbers)
        mean = _mean_grad(grads, weights, reduction)
        sums = jax.lax.cond(counted, lambda: terms(params, x, labels, weights, mean, apply_fn=apply_fn,
                                                    mesh=self.mesh),
                            lambda: {k: jnp.zeros((), loss.dtype) for k in SUMS})
        return grads, loss, outputs, sums


def _mean_grad(grads, weights, reduction):
    return grads if reduction == "mean" else jax.tree.map(lambda g: g / jnp.sum(weights), grads)


def terms(params, x, labels, weights, mean_grad, *, apply_fn, mesh=None):
    """`estimates` from the per-example gradient norms (ghost norms where the
    model allows: losses.per_example_sq_norms) and the step's mean gradient."""
    sq, _, _ = per_example_sq_norms(apply_fn, params, x, labels, mesh=mesh)
    return estimates(sq, weights, mean_grad)


def estimates(sq, weights, mean_grad) -> dict:
    """One step's unbiased estimates (McCandlish et al. 2018, appendix A.1,
    with B_small = 1 and B_big = B, the batch's real examples):

        |G_1|^2 = mean_i ||g_i||^2,   |G_B|^2 = ||mean_i g_i||^2
        |G|^2   ~ (B |G_B|^2 - |G_1|^2) / (B - 1)
        tr(S)   ~ (|G_1|^2 - |G_B|^2) / (1 - 1/B)

    B_simple is taken per epoch from the sums of numerator and denominator
    (smoothed separately, as the paper advises: one step's |G|^2 estimate
    can be negative). A step with one real example (a last batch of one)
    has no variance to estimate and adds nothing: its terms would be 0/0."""
    n = jnp.sum(weights)
    usable = n > 1
    m = jnp.maximum(n, 2)  # the divisions on the unused side stay finite, so 0 * them is 0
    small = jnp.sum(weights * sq) / jnp.maximum(n, 1)
    big = sum(jnp.sum(t**2) for t in jax.tree.leaves(mean_grad))
    keep = usable.astype(small.dtype)
    return {"ns_g2": keep * (m * big - small) / (m - 1), "ns_trace": keep * (small - big) * m / (m - 1),
            "ns_steps": keep}


def epoch_figures(sums: dict) -> dict:
    """An epoch's noise-scale keys from its sums (empty if no step counted)."""
    k = sums.get("ns_steps")
    if not k:
        return {}
    return {"noise_scale": sums["ns_trace"] / sums["ns_g2"], "noise_scale_trace": sums["ns_trace"] / k,
            "noise_scale_g2": sums["ns_g2"] / k, "noise_scale_steps": int(k)}
