"""How a training step gets its gradient, chosen once per run, before jit.

Each is a small hashable callable, so the jitted step takes it as a static
argument (a second run with the same choice compiles nothing):

    grad_fn(params, x, labels, weights, step, numbers) -> (grads, loss, outputs, sums)

`grads` is the gradient the optimiser sees, `loss` the batch's mean loss,
`sums` the per-step numbers an epoch adds up (clipped examples, noise-scale
terms; jaxbatch/runlog.py). They compose instead of being flagged:

    BatchGrad(apply_fn, vmap_loss_and_outputs)      the gradient of the batch loss
    ClippedGrad(apply_fn)                           each example's gradient clipped to C,
                                                    then averaged (DP-SGD's clipping)
    NoiseScale(BatchGrad(...), every=4)             the same gradient, plus the gradient
                                                    noise scale's terms (noise_scale.py)

DP-SGD's noise is not a gradient function: it is an Optax-style
transformation before the optimiser (privacy.AddNoise), so the clipped
gradient stays the same function with or without it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxbatch.chunks import chunked_sum, front_sum
from jaxbatch.losses import clipped_grad_sum


class BatchGrad(NamedTuple):
    """jax.value_and_grad of a batch loss: `batch_loss(apply_fn, params, x,
    labels, weights, reduction=...)` -> (L_B, outputs), e.g.
    losses.vmap_loss_and_outputs or losses.batched_loss_and_outputs."""
    apply_fn: Callable
    batch_loss: Callable
    reduction: str = "mean"

    def __call__(self, params, x, labels, weights, step, numbers):
        def objective(p):
            return self.batch_loss(self.apply_fn, p, x, labels, weights, reduction=self.reduction)

        (loss, outputs), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, mean_loss(loss, weights, self.reduction), outputs, {}


def mean_loss(loss, weights, reduction: str):
    """The batch's mean loss, whichever reduction the step differentiates."""
    return loss / jnp.sum(weights) if reduction == "sum" else loss


class ClippedGrad(NamedTuple):
    """DP-SGD's clipped mean, in the manner of jax_privacy's
    `clipped_grad(loss_fn, l2_clip_norm)`:

        g_bar = (1/B) sum_i w_i g_i min(1, C / ||g_i||)

    over the batch's real examples (w_i = 1), C = numbers["dp"]["clip"]
    (traced: a sweep over C compiles nothing new). Each example's influence
    on g_bar is at most C / B: the sensitivity the noise is scaled to
    (privacy.AddNoise). losses.clipped_grad_sum does the work (ghost norms
    where the model allows; `chunk` examples at a time with chunk; each
    device its own examples on a `mesh` of several). Adds the epoch sums
    "clipped" (examples whose gradient was clipped) and "norm_sum" (their
    norms before clipping)."""
    apply_fn: Callable
    chunk: int | None = None
    mesh: Mesh | None = None
    expected: bool = False  # divide by the expected batch size numbers["dp"]["batch"] (Poisson batches)
    physical: int | None = None  # microbatches of at most this many examples (jaxbatch/chunks.py)
    front: tuple[int, ...] = ()  # Poisson batches: (base, block), computed only as far as they reach (chunks.front_sum)

    def __call__(self, params, x, labels, weights, step, numbers):
        clip = numbers["dp"]["clip"]

        def clipped_sum(arrays, w):
            return clipped_grad_sum(self.apply_fn, params, *arrays, clip, w, chunk=self.chunk, mesh=self.mesh)

        def batch_sum(arrays, w):
            # A logical batch in physical microbatches: the clipped sum is a sum over
            # examples, so adding the microbatches' sums is the whole batch's.
            return chunked_sum(clipped_sum, self.physical or len(w), arrays, w,
                               unroll=False)  # microbatches are for memory: rolled, buffers reused

        # With `front` (Poisson batches), the joined examples come first and the
        # padding after them is skipped, a block of slots at a time.
        total, per_example = front_sum(batch_sum, self.front, (x, labels), weights)
        n = jnp.sum(weights)
        norms = per_example["norms"]
        sums = {"clipped": jnp.sum(weights * (norms > clip)), "norm_sum": jnp.sum(weights * norms)}
        # Poisson batches vary in size; the noise is calibrated for the sum, so
        # both are divided by the expected size B (Opacus, jax_privacy).
        denominator = numbers["dp"]["batch"] if self.expected else n
        grads = jax.tree.map(lambda t: t / denominator.astype(t.dtype), total)
        return grads, jnp.sum(weights * per_example["losses"]) / n, per_example["outputs"], sums


def clip_figures(sums: dict, seen: float) -> dict:
    """An epoch's clipping keys from ClippedGrad's sums over `seen` examples."""
    return {"clipped_fraction": sums["clipped"] / seen,  # examples whose gradient was clipped
            "mean_grad_norm": sums["norm_sum"] / seen}  # mean ||g_i|| before clipping


def layer_norms(grads) -> dict[str, Any]:
    """{"hidden/kernel": ||dL/dW||_2, ...} for every parameter array."""
    return {jax.tree_util.keystr(path, simple=True, separator="/").removeprefix("params/"): jnp.linalg.norm(g.ravel())
            for path, g in jax.tree_util.tree_leaves_with_path(grads)}
