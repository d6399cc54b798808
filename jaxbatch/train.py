"""Training: the story from data to a test accuracy, in one file.

    load data -> model -> loss -> train_step (one minibatch) -> run_chunk (jit,
    lax.scan over steps) -> evaluate -> train_and_evaluate (the epoch loop)

`run_chunk` and `evaluate` are jitted once, at module level. Everything that
varies between runs as a number (input scale, channel statistics, learning
rate, momentum, weight decay, schedule lengths, the divergence threshold) is
an argument, and what shapes the program (the model's apply, the loss
function, the optimiser's structure) is a static, hashable argument; so a
second run with the same shapes, or a sweep over seeds or learning rates,
reuses the compiled program.

Choices worth knowing:
- The dataset lives on the device as uint8 and is normalised inside the jitted
  step (x / 255 * input_scale, optionally per-channel standardised), so each
  step moves a quarter of the bytes and no float copy of the data exists.
- Each epoch draws its permutation with `jax.random` from (seed, epoch): the
  same seed gives the same numbers.
- Steps run inside `jax.lax.scan` over chunks of steps, so Python is out of the
  per-step path. The host never waits for the chunk it just launched: it
  reads the previous chunk's few summary numbers (divergence, loss and
  accuracy sums) while the next one runs, and the progress callback fires
  then, one chunk behind.
- The last, partial batch of an epoch is kept: it is padded to the batch size
  with weight-0 examples, so every example is seen once per epoch, that step's
  gradient is the mean over its real examples only, and the metrics count
  real examples only.
- A NaN, infinite or exploded (> max_loss) loss stops training with
  `Diverged` (one clear line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import backends, checkpoint, ghost, optim, privacy
from jaxbatch import data as data_lib
from jaxbatch.atomic import write_atomic
from jaxbatch.errors import JaxbatchError
from jaxbatch.losses import (batched_loss_and_outputs, clipped_grad_sum, cross_entropy, per_example_sq_norms,
                             vmap_loss_and_outputs)
from jaxbatch.models import get_model
from jaxbatch.precision import enable_x64, matmul_precision

# --loss: which batch loss the step differentiates (both return (L_B, outputs)).
LOSSES = {"vmap": vmap_loss_and_outputs, "batched": batched_loss_and_outputs}
LOSS_MODES = tuple(LOSSES)
REDUCTIONS = ("mean", "sum")
DTYPES = ("float32", "float64")


@dataclasses.dataclass
class TrainConfig:
    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    source: str = "auto"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    loss: str = "vmap"  # "vmap": one-example loss under jax.vmap; "batched": the whole batch at once
    loss_reduction: str = "mean"  # "sum" is text E's from-scratch loss (pair it with lr / batch_size)
    input_scale: float = 1.0  # inputs are x / 255 * input_scale
    standardize: bool = False  # per-channel (x - mean) / std, statistics of the training set
    seed: int = 0
    out: str | None = None  # folder for metrics.jsonl, params.msgpack, config.json
    max_steps: int | None = None  # stop after this many steps in all (None: run every epoch)
    steps_per_chunk: int | None = None  # steps per lax.scan call; None: see chunk_plan
    unroll: bool | None = None  # unroll each chunk's scan; None: see chunk_plan
    record_steps: int = 0  # keep loss and per-layer gradient norms of the first N steps (TrainResult.steps)
    devices: int | None = None  # data-parallel over the first N devices (None: every device there is)
    checkpoint_every: int | None = None  # with out: a checkpoint every N steps too, not only at epoch ends
    keep: int = 3  # checkpoints kept in out/checkpoints
    resume: bool = False  # continue from the newest checkpoint in out
    dtype: str = "float32"  # parameters and inputs; "float64" for checks that need more digits
    # Per-example clipping and DP-SGD (losses.clipped_grad_sum, privacy.py).
    dp_clip: float | None = None  # clip every example's gradient to this L2 norm C before averaging
    dp_noise: float | None = None  # noise multiplier sigma: add N(0, (sigma C)^2) to the clipped sum
    dp_delta: float = 1e-5  # the delta at which epsilon is reported
    dp_epsilon: float | None = None  # a privacy budget: refuse a run whose epsilon would exceed it
    dp_chunk: int | None = None  # clip this many examples at a time (memory); None: the whole batch
    log_noise_scale: bool = False  # the gradient noise scale B_simple, every epoch
    # Counted on every k-th step. Models made only of Dense layers get every ||g_i|| from
    # the step's own backward pass (ghost.grads_and_sq_norms), so measuring costs nothing;
    # other models (convolutions) take an extra pass on those steps.
    noise_scale_every: int = 4
    eval_batch_size: int = 1000
    # A step loss above this counts as divergence, like NaN or inf. Chance-level
    # cross-entropy is ln(10) = 2.3; a loss of 1e4 means logits 1e4 apart: the
    # updates overshot. (Text C's x255 run shows it: the loss jumps to ~1e12,
    # every ReLU dies, and the loss then sits at ln(10) without ever being NaN.)
    max_loss: float = 1e4


class TrainResult(NamedTuple):
    params: Any
    history: list  # one dict per epoch
    steps: list = []  # with config.record_steps: one dict per step (loss, grad_norm, zero_output_fraction)


class Diverged(JaxbatchError):
    """The training loss became NaN, infinite, or larger than config.max_loss."""

    def __init__(self, epoch: int, step: int, loss: float, last_finite_loss: float | None, config: TrainConfig):
        self.epoch, self.step, self.loss, self.last_finite_loss = epoch, step, loss, last_finite_loss
        self.steps: list = []  # with config.record_steps: the steps recorded up to here
        last = "none" if last_finite_loss is None else f"{last_finite_loss:.4g}"
        super().__init__(
            f"training diverged at epoch {epoch}, step {step}: the loss reached {loss:.4g} "
            f"(NaN, inf, or above --max-loss {config.max_loss:g}; last good loss {last}). "
            f"With inputs x/255*{config.input_scale:g} and lr {config.lr:g} the updates overshoot: "
            "lower --lr, scale inputs to [0, 1] (--input-scale 1) or --standardize them, "
            "or add --schedule warmup"
        )


class Interrupted(JaxbatchError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""

    def __init__(self, reason: str, epoch: int, step: int, checkpoint):
        self.reason, self.epoch, self.step, self.checkpoint = reason, epoch, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no output folder)"
        super().__init__(f"stopped by {reason} at epoch {epoch}, step {step}; {where}")


def validate(config: TrainConfig) -> None:
    """Reject nonsensical settings before any data is loaded or compiled."""
    if config.loss not in LOSS_MODES:
        raise JaxbatchError(f"unknown loss mode {config.loss!r}; choose one of: {', '.join(LOSS_MODES)}",
                            setting="loss")
    if config.loss_reduction not in REDUCTIONS:
        raise JaxbatchError(f"unknown loss reduction {config.loss_reduction!r}; choose mean or sum",
                            setting="loss_reduction")
    for field in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(config, field) < 1:
            raise JaxbatchError(f"{{setting}} must be 1 or more, got {getattr(config, field)}", setting=field)
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise JaxbatchError(f"learning rate {{setting}} must be a finite number greater than 0, got {config.lr}",
                            setting="lr")
    if not (config.input_scale > 0 and math.isfinite(config.input_scale)):
        raise JaxbatchError(f"{{setting}} must be a finite number greater than 0, got {config.input_scale}",
                            setting="input_scale")
    for field in ("momentum", "weight_decay", "warmup_steps", "record_steps"):
        if getattr(config, field) < 0:
            raise JaxbatchError(f"{{setting}} must be 0 or more, got {getattr(config, field)}", setting=field)
    if not config.max_loss > 0:
        raise JaxbatchError(f"{{setting}} must be greater than 0, got {config.max_loss}", setting="max_loss")
    if config.dtype not in DTYPES:
        raise JaxbatchError(f"unknown dtype {config.dtype!r}; choose one of: {', '.join(DTYPES)}", setting="dtype")
    if config.devices is not None and config.devices < 1:
        raise JaxbatchError(f"{{setting}} must be 1 or more, got {config.devices}", setting="devices")
    for field in ("max_steps", "checkpoint_every"):
        if getattr(config, field) is not None and getattr(config, field) < 1:
            raise JaxbatchError(f"{{setting}} must be 1 or more, got {getattr(config, field)}", setting=field)
    if config.keep < 1:
        raise JaxbatchError(f"{{setting}} must be 1 or more, got {config.keep}", setting="keep")
    if (config.resume or config.checkpoint_every) and not config.out:
        raise JaxbatchError("checkpoints live in the output folder: pass {setting} DIR", setting="out")
    privacy.check_settings(config.dp_clip, config.dp_noise, config.dp_delta, config.dp_epsilon)
    for field in ("dp_chunk", "noise_scale_every"):
        if getattr(config, field) is not None and getattr(config, field) < 1:
            raise JaxbatchError(f"{{setting}} must be 1 or more, got {getattr(config, field)}", setting=field)
    if config.dp_clip is not None:
        if config.loss == "batched":
            raise JaxbatchError("clipping needs every example's own gradient, which the batched loss never "
                                "forms; drop {setting} batched (the default, vmap, is per-example)", setting="loss")
        if config.loss_reduction == "sum":
            raise JaxbatchError("DP-SGD averages the clipped gradients over the batch; drop {setting} sum",
                                setting="loss_reduction")
        if config.log_noise_scale:
            raise JaxbatchError("the noise scale reads unclipped per-example gradients, which a private run "
                                "must not release; drop {setting} or the --dp- flags", setting="log_noise_scale")
    optim.check_schedule(config.schedule, config.warmup_steps)
    optim.build(*optimizer_settings(config, total_steps=1))  # unknown names, nesterov without momentum
    get_model(config.model)
    data_lib.get_spec(config.dataset)


def optimizer_settings(config: TrainConfig, total_steps: int):
    """(optim.Structure, numbers) of the run's optimiser and schedule."""
    return optim.split(config.optimizer, config.lr, config.momentum, config.nesterov, config.weight_decay,
                       config.schedule, config.warmup_steps, total_steps)


# ---- the pieces of one step -------------------------------------------------


def input_numbers(input_scale: float, mean=None, std=None, dtype="float32") -> dict:
    """The numbers that turn uint8 pixels into model inputs (see `normalize`),
    as arrays a jitted step takes as an argument; their dtype is the inputs'."""
    numbers = {"scale": np.asarray(input_scale / 255.0, dtype)}
    if mean is not None:
        numbers.update(mean=np.asarray(mean, dtype), std=np.asarray(std, dtype))
    return numbers


def normalize(pixels, numbers: dict):
    """uint8 pixels -> float inputs, inside the jitted step:
    x = p / 255 * input_scale, then (x - mean) / std per channel if given."""
    x = pixels.astype(numbers["scale"].dtype) * numbers["scale"]
    if "mean" in numbers:
        x = (x - numbers["mean"]) / numbers["std"]
    return x


def channel_stats(images: np.ndarray, input_scale: float):
    """Per-channel mean and std of the normalised training images."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) * (input_scale / 255.0)
    return x.mean(0), x.std(0) + 1e-8


def layer_norms(grads) -> dict:
    """{"hidden/kernel": ||dL/dW||_2, ...} for every parameter array."""
    return {jax.tree_util.keystr(path, simple=True, separator="/").removeprefix("params/"): jnp.linalg.norm(g.ravel())
            for path, g in jax.tree_util.tree_leaves_with_path(grads)}


class Gradient(NamedTuple):
    """How a step gets its gradient; static, so each kind is its own program.

    Plain: the gradient of the batch loss (`--loss` says vmap or batched).
    clip: per-example gradients clipped to norm C, then averaged (DP-SGD's
    clipping); noise: plus N(0, (sigma C)^2) on the clipped sum (DP-SGD).
    noise_scale_every k: every k-th step also reads the per-example gradient
    norms, for the gradient noise scale (noise_scale_terms); a Dense-only
    model gets them from its own backward pass on every step (the gradient
    then comes from a batched forward pass, equal to `--loss vmap`'s to
    rounding)."""
    clip: bool = False
    noise: bool = False
    chunk: int | None = None
    noise_scale_every: int = 0
    mesh: Mesh | None = None  # several devices: per-example norms computed per device (losses.per_example_sq_norms)


def gradient_plan(config: TrainConfig, mesh: Mesh) -> Gradient:
    per_example = config.dp_clip is not None or config.log_noise_scale
    if per_example and config.dp_chunk is not None and mesh.size > 1:
        raise JaxbatchError(f"{{setting}} forms per-example gradients, which are computed on one device only; "
                            f"drop it (ghost norms work on all {mesh.size}) or pass --devices 1", setting="dp_chunk")
    return Gradient(clip=config.dp_clip is not None, noise=config.dp_noise is not None, chunk=config.dp_chunk,
                    noise_scale_every=config.noise_scale_every if config.log_noise_scale else 0,
                    mesh=mesh if per_example and mesh.size > 1 else None)


def dp_numbers(config: TrainConfig) -> dict:
    """Clip norm, noise multiplier and noise seed, as arguments of the step
    (a sweep over them compiles nothing new)."""
    return {"clip": np.asarray(config.dp_clip or 0.0, config.dtype),
            "noise": np.asarray(config.dp_noise or 0.0, config.dtype), "seed": np.uint32(config.seed)}


def train_step(state, batch, numbers, *, apply_fn, batch_loss, optimizer, reduction, gradient=Gradient(),
               record=False):
    """One optimiser step on one minibatch.

    state: (params, opt_state); batch: (uint8 images, int labels, weights,
    global step number), weights 1 for real examples and 0 for the padding of
    a last partial batch; numbers: {"inputs": input_numbers(...), "optimizer":
    optim numbers, "dp": dp_numbers(...)}. `gradient` says how the gradient is
    formed (see Gradient). Returns the new state and {"loss" (the mean),
    "correct", "count"}, the sums the gradient's kind adds (clipped examples,
    noise-scale terms), and, with `record`, the per-layer gradient norms and
    the fraction of examples whose outputs are all exactly 0 (text C's dead
    network).
    """
    params, opt_state = state
    pixels, labels, weights, step = batch
    x = normalize(pixels, numbers["inputs"])

    def plain(p):
        def objective(p):
            return batch_loss(apply_fn, p, x, labels, weights, reduction=reduction)

        (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(p)
        return grads, loss, logits, {}

    if gradient.clip:
        grads, loss, logits, extra = clipped_gradient(params, x, labels, weights, step, numbers["dp"],
                                                      apply_fn=apply_fn, gradient=gradient)
    elif gradient.noise_scale_every and ghost.covers_all(apply_fn, params, x, dense_only=True):
        # Every parameter in Dense layers: the step's own backward pass gives
        # every ||g_i|| too, so measuring costs nothing; every k-th step counts.
        grads, loss, logits, sq = ghost.grads_and_sq_norms(apply_fn, params, x, labels, weights, cross_entropy,
                                                           reduction)
        mean = grads if reduction == "mean" else jax.tree.map(lambda g: g / jnp.sum(weights), grads)
        counted = (step % gradient.noise_scale_every == 0).astype(loss.dtype)
        extra = {k: counted * v for k, v in noise_scale_estimates(sq, weights, mean).items()}
    elif gradient.noise_scale_every:
        grads, loss, logits, _ = plain(params)
        mean = grads if reduction == "mean" else jax.tree.map(lambda g: g / jnp.sum(weights), grads)
        extra = jax.lax.cond(
            step % gradient.noise_scale_every == 0,
            lambda: noise_scale_terms(params, x, labels, weights, mean, apply_fn=apply_fn, mesh=gradient.mesh),
            lambda: {k: jnp.zeros((), loss.dtype) for k in NOISE_SCALE_SUMS})
    else:
        grads, loss, logits, extra = plain(params)
    updates, opt_state = optim.build(optimizer, numbers["optimizer"]).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    n = jnp.sum(weights)
    stats = {"loss": loss / n if reduction == "sum" else loss,
             "correct": jnp.sum(weights * (jnp.argmax(logits, axis=-1) == labels)), "count": n, **extra}
    if record:
        stats["grad_norm"] = layer_norms(grads)
        stats["zero_output_fraction"] = jnp.sum(weights * jnp.all(logits == 0, axis=-1)) / n
    return (params, opt_state), stats


# Per-step sums a gradient kind adds to the stats (summed per epoch by Progress).
CLIP_SUMS = ("clipped", "norm_sum")
NOISE_SCALE_SUMS = ("ns_g2", "ns_trace", "ns_steps")


def clipped_gradient(params, x, labels, weights, step, dp, *, apply_fn, gradient):
    """DP-SGD's gradient: the clipped per-example gradients' sum (plus noise
    with gradient.noise; privacy.noisy_mean) over the batch's real examples."""
    total, per_example = clipped_grad_sum(apply_fn, params, x, labels, dp["clip"], weights, chunk=gradient.chunk,
                                          mesh=gradient.mesh)
    n = jnp.sum(weights)
    if gradient.noise:
        grads = privacy.noisy_mean(total, dp["clip"], dp["noise"], privacy.step_key(dp["seed"], step), n)
    else:
        grads = jax.tree.map(lambda t: t / n, total)
    norms = per_example["norms"]
    loss = jnp.sum(weights * per_example["losses"]) / n
    extra = {"clipped": jnp.sum(weights * (norms > dp["clip"])), "norm_sum": jnp.sum(weights * norms)}
    return grads, loss, per_example["outputs"], extra


def noise_scale_terms(params, x, labels, weights, mean_grad, *, apply_fn, mesh=None):
    """The two unbiased estimates of McCandlish et al. 2018 (appendix A.1)
    with B_small = 1 and B_big = B, the batch, from the per-example gradient
    norms (ghost norms where the model allows: losses.per_example_sq_norms)
    and the step's own mean gradient:

        |G_1|^2 = mean_i ||g_i||^2,   |G_B|^2 = ||mean_i g_i||^2
        |G|^2   ~ (B |G_B|^2 - |G_1|^2) / (B - 1)
        tr(S)   ~ (|G_1|^2 - |G_B|^2) / (1 - 1/B)

    The noise scale B_simple = tr(S) / |G|^2 is taken per epoch from the sums
    of numerator and denominator (smoothed separately, as the paper advises:
    one step's |G|^2 estimate can be negative)."""
    sq, _, _ = per_example_sq_norms(apply_fn, params, x, labels, mesh=mesh)
    return noise_scale_estimates(sq, weights, mean_grad)


def noise_scale_estimates(sq, weights, mean_grad) -> dict:
    """One step's |G|^2 and tr(S) estimates from the ||g_i||^2 and the mean gradient."""
    n = jnp.sum(weights)
    small = jnp.sum(weights * sq) / n
    big = sum(jnp.sum(t**2) for t in jax.tree.leaves(mean_grad))
    return {"ns_g2": (n * big - small) / (n - 1), "ns_trace": (small - big) * n / (n - 1),
            "ns_steps": jnp.ones((), small.dtype)}


@partial(jax.jit, donate_argnums=0,
         static_argnames=("apply_fn", "batch_loss", "optimizer", "reduction", "gradient", "unroll", "record"))
def run_chunk(state, data, idx, weights, steps, numbers, *, apply_fn, batch_loss, optimizer, reduction,
              gradient=Gradient(), unroll=1, record=False):
    """`len(idx)` steps under lax.scan; idx (k, B) indexes the on-device data
    (images, labels), steps (k,) are the steps' global numbers. Returns the
    new state, `summarize`'s few numbers, and the per-step stats when
    `record` (else None)."""
    images, labels = data

    def body(state, iws):
        i, w, step = iws
        return train_step(state, (images[i], labels[i], w, step), numbers, apply_fn=apply_fn,
                          batch_loss=batch_loss, optimizer=optimizer, reduction=reduction, gradient=gradient,
                          record=record)

    state, stats = jax.lax.scan(body, state, (idx, weights, steps), unroll=unroll)
    return state, summarize(stats, numbers["max_loss"]), (stats if record else None)


def summarize(stats, max_loss):
    """A chunk's per-step losses reduced on the device to what the host needs:
    the index of the first bad step (-1 if none; bad = NaN, inf or above
    max_loss), its loss and the one before it, the last loss, and the sums
    for the epoch's metrics."""
    losses = stats["loss"]
    bad = ~(jnp.abs(losses) <= max_loss)  # NaN compares False
    first = jnp.argmax(bad)
    return {"first_bad": jnp.where(bad[first], first, -1), "bad_loss": losses[first],
            "before_bad": losses[jnp.maximum(first - 1, 0)], "last_loss": losses[-1],
            "loss_sum": jnp.sum(losses * stats["count"]), "correct": jnp.sum(stats["correct"]),
            "count": jnp.sum(stats["count"]),
            "extra": {k: jnp.sum(stats[k]) for k in CLIP_SUMS + NOISE_SCALE_SUMS if k in stats}}


def as_batches(order, batch_size: int):
    """Example indices in `order` as (steps, B) indices and weights; the last
    batch is padded with weight-0 copies of example 0."""
    n = order.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    idx = jnp.concatenate([order, jnp.zeros(pad, order.dtype)]).reshape(steps, batch_size)
    weights = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(steps, batch_size)
    return idx, weights


def chunk_plan(config: TrainConfig, steps_per_epoch: int, has_convolution: bool,
               backend: str | None = None) -> tuple[int, bool]:
    """(steps per lax.scan call, whether to unroll it).

    About a tenth of an epoch per call, rolled: few host round trips, small
    programs. Where the backend runs convolutions badly inside loop bodies
    (XLA:CPU; jaxbatch/backends.py has the measurements), a model with a
    convolution scans a few steps at a time, fully unrolled instead: still no
    Python between steps, and a compile time that stays small.
    """
    unrolled_steps = backends.choices(backend).unrolled_conv_steps if has_convolution else None
    unroll = config.unroll if config.unroll is not None else unrolled_steps is not None
    chunk = config.steps_per_chunk or (unrolled_steps if unroll and unrolled_steps else -(-steps_per_epoch // 10))
    return max(1, min(chunk, steps_per_epoch)), bool(unroll)


def epoch_key(seed: int, epoch: int):
    """The key of an epoch's permutation, from (seed, epoch) alone: the same
    seed gives the same batches, whoever draws them."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


@partial(jax.jit, static_argnums=(1, 2))
def epoch_batches(key, n: int, batch_size: int):
    """A fresh random permutation of the n examples, as batches."""
    return as_batches(jax.random.permutation(key, n), batch_size)


def evaluate(params, images, labels, inputs: dict, *, apply_fn, batch_size: int, mesh=None):
    """Mean cross-entropy and accuracy over a whole split (batched forward
    passes), each batch shared among the mesh's devices."""
    n = labels.shape[0]
    devices = 1 if mesh is None else mesh.size
    batch_size = -(-min(batch_size, n) // devices) * devices  # padded to share evenly
    idx, weights = (np.asarray(a) for a in as_batches(jnp.arange(n), batch_size))
    if mesh is not None:
        idx, weights = place((idx, weights), by_example(mesh))
    loss_sum, correct = fetch(_evaluate(params, images, labels, idx, weights, inputs, apply_fn=apply_fn))
    return float(loss_sum) / n, float(correct) / n


@partial(jax.jit, static_argnames=("apply_fn",))
def _evaluate(params, images, labels, idx, weights, inputs, *, apply_fn):
    def body(carry, iw):
        i, w = iw
        y = labels[i]
        loss_sum, logits = batched_loss_and_outputs(apply_fn, params, normalize(images[i], inputs), y, w,
                                                    reduction="sum")
        return (carry[0] + loss_sum, carry[1] + jnp.sum(w * (jnp.argmax(logits, -1) == y))), None

    (loss_sum, correct), _ = jax.lax.scan(body, (0.0, 0.0), (idx, weights))
    return loss_sum, correct


# ---- devices: one program, the batch shared along a "data" mesh axis ----------


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh ("data") over the first `devices` devices (default:
    all, across every process). Parameters are replicated on it and each
    step's batch is split along it; XLA inserts the all-reduce that averages
    the gradient, so the step's code is the same for 1 device or 256."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if n > len(available):
        raise JaxbatchError(f"{{setting}} {n} asks for more devices than the {len(available)} "
                            f"{available[0].platform} devices here", setting="devices")
    # Auto axes: XLA propagates the shardings (Explicit is jax.make_mesh's default).
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=available[:n])


def check_divides(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise JaxbatchError(f"batch size {batch_size} does not split evenly over {mesh.size} devices; pass a "
                            f"{{setting}} that is a multiple of {mesh.size}, or fewer --devices", setting="batch_size")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def by_example(mesh: Mesh) -> NamedSharding:
    """(steps, B) index and weight arrays: each device gets B / K columns."""
    return NamedSharding(mesh, P(None, "data"))


def place(tree, sharding):
    """Host values -> global arrays laid out by `sharding`. Each process
    supplies only the pieces its own devices hold, so with several processes
    each one feeds its own slice of every global batch."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def fetch(tree):
    """Replicated global arrays -> host numpy, read from this process's first
    copy (with several processes the whole array is not addressable here)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


# ---- the whole run ----------------------------------------------------------


class RunFiles:
    """metrics.jsonl (one line per epoch, appended as it ends), config.json,
    params.msgpack and checkpoints/. With several processes only process 0
    writes."""

    def __init__(self, out: str | None, config: TrainConfig, environment: dict):
        self.out = Path(out) if out else None
        self.dir = self.out if jax.process_index() == 0 else None
        self.config = config
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise JaxbatchError(f"output folder {self.out} is a file; pass --out a folder path")
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.dir / "metrics.jsonl"
        checkpoint.remove_partial(self.dir)
        if not config.resume:
            # A new run starts a new log, and a previous run's parameters and
            # checkpoints must not sit beside this run's config.json as if they
            # were its own.
            self.metrics.unlink(missing_ok=True)
            (self.dir / "params.msgpack").unlink(missing_ok=True)
            checkpoint.clear(self.dir)
        record = {**dataclasses.asdict(config), "environment": environment}
        self._write_atomic("config.json", json.dumps(record, indent=2).encode())

    def _write_atomic(self, name: str, payload: bytes) -> None:
        write_atomic(self.dir / name, lambda tmp: tmp.write_bytes(payload))

    def history(self, epochs_done: int) -> list:
        """On resume: the metrics of the epochs the checkpoint has done. Lines
        of later epochs (written after the checkpoint, before the run was
        killed) are dropped, so the resumed run writes each epoch once."""
        if self.out is None or not (self.out / "metrics.jsonl").exists():
            return []
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        kept = [r for r in records if r["epoch"] <= epochs_done]
        if self.dir is not None and len(kept) != len(records):
            self._write_atomic("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def epoch(self, record: dict) -> None:
        if self.dir is not None:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(self, position: dict, epoch_sums: dict, state) -> Path | None:
        host_state = fetch(state)  # every process waits here; process 0 writes
        if self.dir is None:
            return None
        return checkpoint.save(self.dir, position, epoch_sums, self.config, host_state, self.config.keep)

    def params(self, params) -> None:
        if self.dir is not None:
            self._write_atomic("params.msgpack", serialization.to_bytes(params))


def environment(mesh: Mesh) -> dict:
    """What the run ran on: JAX, the devices and processes, and the float32
    matrix-product precision in force (TF32 on NVIDIA GPUs and bfloat16 passes
    on TPUs by default; see jaxbatch/precision.py)."""
    device = mesh.devices.flat[0]
    return {"jax": jax.__version__, "devices": mesh.size, "device_kind": device.device_kind,
            "processes": jax.process_count(), **matmul_precision()}


def prepare_data(config: TrainConfig, train_ds=None, test_ds=None):
    """Load (or take) the two splits and check the model can take the images."""
    if train_ds is None:
        train_ds = data_lib.load(config.dataset, "train", config.data_dir, config.source)
    if test_ds is None:
        test_ds = data_lib.load(config.dataset, "test", config.data_dir, config.source)
    get_model(config.model).check_image_shape(train_ds.image_shape)
    data_lib.check_batch_size(config.batch_size, train_ds)
    return train_ds, test_ds


def init_params(config: TrainConfig, image_shape):
    """The model's initial parameters for `config.seed`. Run eagerly, not
    jitted: under jit XLA fuses the initialisers' arithmetic differently, which
    changes last bits of the weights, and the recipes' published figures come
    from these exact weights."""
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    return get_model(config.model).init(init_key, jnp.zeros(image_shape, jnp.float32))


class Progress:
    """Reads each chunk's summary on the host one chunk late, so the device is
    never idle while Python looks: `push` a chunk just launched and get the
    previous one read. Raises Diverged at the exact step that went bad."""

    def __init__(self, config: TrainConfig, notify):
        self.config, self.notify = config, notify
        self.pending = None
        self.last_finite = None
        self.steps: list = []  # with config.record_steps

    def start_epoch(self, epoch: int, steps: int, sums: dict | None = None):
        """Start an epoch's sums at 0, or where a checkpoint left them."""
        self.epoch, self.epoch_steps = epoch, steps
        sums = sums or {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "last_finite": self.last_finite}
        self.loss_sum, self.correct, self.seen = sums["loss_sum"], sums["correct"], sums["seen"]
        self.last_finite = sums["last_finite"]
        self.extra = dict(sums.get("extra", {}))  # the gradient kind's own sums (Gradient)
        self.notify({"kind": "epoch_start", "epoch": epoch, "steps": steps})

    def sums(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "last_finite": self.last_finite, "extra": dict(self.extra)}

    def push(self, start: int, stop: int, summary, trace):
        self.flush()
        self.pending = (start, stop, summary, trace)

    def flush(self):
        """Wait for the chunk launched last and account for it."""
        if self.pending is None:
            return
        start, stop, summary, trace = self.pending
        self.pending = None
        s = fetch(summary)  # the one place the host waits for the device
        if trace is not None:
            self._record(fetch(trace))
        first = int(s["first_bad"])
        if first >= 0:
            last_good = float(s["before_bad"]) if first > 0 else self.last_finite
            err = Diverged(self.epoch, start + first + 1, float(s["bad_loss"]), last_good, self.config)
            err.steps = self.steps
            raise err
        self.last_finite = float(s["last_loss"])
        self.loss_sum += float(s["loss_sum"])
        self.correct += float(s["correct"])
        self.seen += float(s["count"])
        for k, v in s["extra"].items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)
        self.notify({"kind": "chunk", "epoch": self.epoch, "step": stop, "steps": self.epoch_steps,
                     "loss": self.last_finite})

    def _record(self, trace):
        for i, loss in enumerate(trace["loss"]):
            if len(self.steps) < self.config.record_steps:
                finite = bool(np.isfinite(loss))
                self.steps.append({
                    "loss": float(loss) if finite else None,
                    "zero_output_fraction": float(trace["zero_output_fraction"][i]) if finite else None,
                    "grad_norm": {k: float(v[i]) if finite else None for k, v in trace["grad_norm"].items()}})


def gradient_metrics(config: TrainConfig, progress: Progress, sampling_rate: float, steps_done: int) -> dict:
    """What an epoch line adds for clipping, DP-SGD and the noise scale."""
    extra, record = progress.extra, {}
    if config.dp_clip is not None:
        record["clipped_fraction"] = extra["clipped"] / progress.seen  # examples whose gradient was clipped
        record["mean_grad_norm"] = extra["norm_sum"] / progress.seen  # mean ||g_i|| before clipping
    if config.dp_noise is not None:
        record["epsilon"] = privacy.epsilon(sampling_rate, config.dp_noise, steps_done, config.dp_delta)
        record["delta"] = config.dp_delta
    if config.log_noise_scale and extra.get("ns_steps"):
        k = extra["ns_steps"]
        record["noise_scale"] = extra["ns_trace"] / extra["ns_g2"]  # B_simple = tr(S) / |G|^2, epoch means
        record["noise_scale_trace"], record["noise_scale_g2"] = extra["ns_trace"] / k, extra["ns_g2"] / k
        record["noise_scale_steps"] = int(k)
    return record


def train_and_evaluate(config: TrainConfig, params=None, train_ds=None, test_ds=None,
                       on_progress: Callable[[dict], None] | None = None,
                       stop_requested: Callable[[], str | None] | None = None) -> TrainResult:
    """Train `config.model` on `config.dataset` and evaluate on the test split
    after every epoch. `params`, if given, replaces the model's initialisation.

    `on_progress(event)` receives {"kind": "start", ...} once, then per epoch
    {"kind": "epoch_start", "epoch", "steps"}, {"kind": "chunk", "epoch",
    "step", "steps", "loss"} as each chunk of steps is accounted for, and
    {"kind": "epoch", **metrics}. With several processes only process 0 is
    told, and only it writes files.

    `stop_requested()` is asked after every chunk of steps; when it returns a
    reason (e.g. "SIGINT"), the run saves a checkpoint there and raises
    `Interrupted`. With `config.resume` the run continues from the newest
    checkpoint in `config.out`, exactly as if it had never stopped.
    """
    validate(config)
    mesh = data_mesh(config.devices)
    check_divides(config.batch_size, mesh)
    train_ds, test_ds = prepare_data(config, train_ds, test_ds)
    # float64 needs JAX's x64 mode while the run is traced and run.
    with enable_x64() if config.dtype == "float64" else contextlib.nullcontext():
        return _train(config, mesh, params, train_ds, test_ds, on_progress or (lambda event: None),
                      stop_requested or (lambda: None))


def _train(config, mesh, params, train_ds, test_ds, on_progress, stop_requested) -> TrainResult:
    env = environment(mesh)
    notify = on_progress if jax.process_index() == 0 else (lambda event: None)
    ckpt = checkpoint.latest(config.out, config) if config.resume else None
    n = len(train_ds)
    steps_per_epoch = -(-n // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    # DP-SGD: q = B / N per step; the epsilon the whole run will reach, known
    # (and checked against a budget) before anything is written or compiled.
    sampling_rate = config.batch_size / n
    final_epsilon = None
    if config.dp_noise is not None:
        final_epsilon = (privacy.check_budget(sampling_rate, config.dp_noise, total_steps, config.dp_delta,
                                              config.dp_epsilon) if config.dp_epsilon is not None
                         else privacy.epsilon(sampling_rate, config.dp_noise, total_steps, config.dp_delta))

    files = RunFiles(config.out, config, env)
    model = get_model(config.model)

    if params is None:
        params = init_params(config, train_ds.image_shape)
    params = jax.tree.map(lambda p: np.asarray(p, config.dtype), params)
    example = np.zeros(train_ds.image_shape, config.dtype)
    chunk, unroll = chunk_plan(config, steps_per_epoch, backends.has_convolution(model.apply, params, example))

    stats = channel_stats(train_ds.images, config.input_scale) if config.standardize else (None, None)
    structure, optimizer_numbers = optimizer_settings(config, total_steps)
    numbers = {"inputs": input_numbers(config.input_scale, *stats, dtype=config.dtype),
               "optimizer": optimizer_numbers, "max_loss": np.float32(config.max_loss), "dp": dp_numbers(config)}
    state = (params, optim.build(structure, optimizer_numbers).init(params))
    position = {"step": 0, "epoch": 1, "epoch_step": 0, "epochs_done": 0}
    if ckpt is not None:
        state, position = checkpoint.restore(ckpt, state), ckpt["position"]
    # Everything but the batches is replicated: parameters, optimiser state,
    # the numbers, and the uint8 dataset, which goes to every device once
    # (60,000 MNIST images are 47 MB; CIFAR-10's 50,000 are 154 MB). Each step
    # then gathers only its own B/K examples from its own copy: no device
    # builds more of a batch than its share, and no pixels cross devices.
    state, numbers = place((state, numbers), replicated(mesh))
    train_data = place((train_ds.images, train_ds.labels), replicated(mesh))
    test_x, test_y = place((test_ds.images, test_ds.labels), replicated(mesh))
    chunk_fn = partial(run_chunk, apply_fn=model.apply, batch_loss=LOSSES[config.loss], optimizer=structure,
                       reduction=config.loss_reduction, gradient=gradient_plan(config, mesh), unroll=unroll,
                       record=config.record_steps > 0)

    notify({"kind": "start", "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "train_size": n, "test_size": len(test_ds), "devices": env["devices"],
            "device_kind": env["device_kind"], "processes": env["processes"],
            "resumed_from": None if ckpt is None else {**position, "path": str(ckpt["path"])},
            "final_epsilon": final_epsilon})
    progress = Progress(config, notify)
    history = files.history(position["epochs_done"]) if ckpt is not None else []
    done = position["step"] - position["epoch_step"]  # steps before this epoch
    for epoch in range(position["epoch"], config.epochs + 1):
        if done >= total_steps:
            break
        t0 = time.perf_counter()
        epoch_steps = min(steps_per_epoch, total_steps - done)
        resumed = ckpt is not None and epoch == position["epoch"] and position["epoch_step"] > 0
        progress.start_epoch(epoch, epoch_steps, ckpt["epoch_sums"] if resumed else None)
        # Every process draws the same permutation from (seed, epoch).
        idx, weights = (np.asarray(a) for a in epoch_batches(epoch_key(config.seed, epoch), n, config.batch_size))
        first = position["epoch_step"] if resumed else 0  # a chunk boundary: the chunks stay the same
        for start in range(first, epoch_steps, chunk):
            stop = min(start + chunk, epoch_steps)
            batches = place((idx[start:stop], weights[start:stop]), by_example(mesh))
            steps = place(np.arange(done + start, done + stop, dtype=np.int32), replicated(mesh))
            state, summary, trace = chunk_fn(state, train_data, *batches, steps, numbers)
            progress.push(start, stop, summary, trace)
            reason = stop_requested()
            every = config.checkpoint_every
            due = every and (done + stop) // every > (done + start) // every and stop < epoch_steps
            if (reason or due) and config.out:
                progress.flush()  # a checkpoint holds only steps known not to have diverged
                path = files.checkpoint({"step": done + stop, "epoch": epoch, "epoch_step": stop,
                                         "epochs_done": epoch - 1}, progress.sums(), state)
            if reason:
                raise Interrupted(reason, epoch, stop, path if config.out else None)
        progress.flush()
        done += epoch_steps
        jax.block_until_ready(state)
        train_time = time.perf_counter() - t0
        test_loss, test_acc = evaluate(state[0], test_x, test_y, numbers["inputs"], apply_fn=model.apply,
                                       batch_size=config.eval_batch_size, mesh=mesh)
        record = {
            "epoch": epoch, "steps": done, "examples_seen": int(progress.seen),
            "train_loss": progress.loss_sum / progress.seen, "train_accuracy": progress.correct / progress.seen,
            "test_loss": test_loss, "test_accuracy": test_acc,
            "epoch_time_s": train_time,
            "lr_end": float(optim.make_schedule(config.schedule, config.lr, config.warmup_steps, total_steps)(done)),
            "devices": env["devices"], "device_kind": env["device_kind"],
            **gradient_metrics(config, progress, sampling_rate, done),
        }
        history.append(record)
        files.epoch(record)
        notify({"kind": "epoch", **record})
        if config.out:
            files.checkpoint({"step": done, "epoch": epoch + 1, "epoch_step": 0, "epochs_done": epoch},
                             progress.sums(), state)
    final = jax.tree.map(jnp.asarray, fetch(state[0]))
    files.params(final)
    return TrainResult(final, history, progress.steps)
