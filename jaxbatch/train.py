"""Training: the story from data to a test accuracy, in one file.

    load data -> model -> loss -> train_step (one minibatch) -> run_chunk (jit,
    lax.scan over steps) -> evaluate -> train_and_evaluate (the epoch loop)

Choices worth knowing:
- The dataset lives on the device as uint8 and is normalised inside the jitted
  step (x / 255 * input_scale, optionally per-channel standardised), so each
  step moves a quarter of the bytes and no float copy of the data exists.
- Each epoch draws its permutation with `jax.random` from (seed, epoch): the
  same seed gives the same numbers.
- Steps run inside `jax.lax.scan` over chunks of steps, so Python is out of the
  per-step path; the progress callback fires once per chunk.
- The last, partial batch of an epoch is kept: it is padded to the batch size
  with weight-0 examples, so every example is seen once per epoch, that step's
  gradient is the mean over its real examples only, and the metrics count
  real examples only.
- A NaN, infinite or exploded (> max_loss) loss stops training with
  `Diverged` (one clear line).
"""

from __future__ import annotations

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

from jaxbatch import data as data_lib
from jaxbatch.atomic import write_atomic
from jaxbatch.errors import JaxbatchError
from jaxbatch.losses import batched_loss_and_outputs, vmap_loss_and_outputs
from jaxbatch.models import get_model
from jaxbatch.optim import make_optimizer, make_schedule

BATCH_LOSSES_AND_OUTPUTS = {"vmap": vmap_loss_and_outputs, "batched": batched_loss_and_outputs}
LOSS_MODES = tuple(BATCH_LOSSES_AND_OUTPUTS)
REDUCTIONS = ("mean", "sum")


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
    eval_batch_size: int = 1000
    # A step loss above this counts as divergence, like NaN or inf. Chance-level
    # cross-entropy is ln(10) = 2.3; a loss of 1e4 means logits 1e4 apart: the
    # updates overshot. (Text C's x255 run shows it: the loss jumps to ~1e12,
    # every ReLU dies, and the loss then sits at ln(10) without ever being NaN.)
    max_loss: float = 1e4


class TrainResult(NamedTuple):
    params: Any
    history: list  # one dict per epoch


class Diverged(JaxbatchError):
    """The training loss became NaN, infinite, or larger than config.max_loss."""

    def __init__(self, epoch: int, step: int, loss: float, last_finite_loss: float | None, config: TrainConfig):
        self.epoch, self.step, self.loss, self.last_finite_loss = epoch, step, loss, last_finite_loss
        last = "none" if last_finite_loss is None else f"{last_finite_loss:.4g}"
        super().__init__(
            f"training diverged at epoch {epoch}, step {step}: the loss reached {loss:.4g} "
            f"(NaN, inf, or above --max-loss {config.max_loss:g}; last good loss {last}). "
            f"With inputs x/255*{config.input_scale:g} and lr {config.lr:g} the updates overshoot: "
            "lower --lr, scale inputs to [0, 1] (--input-scale 1) or --standardize them, "
            "or add --schedule warmup"
        )


def validate(config: TrainConfig) -> None:
    """Reject nonsensical settings before any data is loaded or compiled."""
    if config.loss not in LOSS_MODES:
        raise JaxbatchError(f"unknown loss mode {config.loss!r}; choose one of: {', '.join(LOSS_MODES)}")
    if config.loss_reduction not in REDUCTIONS:
        raise JaxbatchError(f"unknown loss reduction {config.loss_reduction!r}; choose mean or sum")
    for field in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(config, field) < 1:
            raise JaxbatchError(f"{field.replace('_', '-')} must be 1 or more, got {getattr(config, field)}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise JaxbatchError(f"learning rate must be a finite number greater than 0, got {config.lr}")
    if not (config.input_scale > 0 and math.isfinite(config.input_scale)):
        raise JaxbatchError(f"input scale must be a finite number greater than 0, got {config.input_scale}")
    if config.momentum < 0 or config.weight_decay < 0 or config.warmup_steps < 0:
        raise JaxbatchError("momentum, weight decay and warm-up steps must be 0 or more")
    if not config.max_loss > 0:
        raise JaxbatchError(f"max-loss must be greater than 0, got {config.max_loss}")
    if config.max_steps is not None and config.max_steps < 1:
        raise JaxbatchError(f"max-steps must be 1 or more, got {config.max_steps}")
    get_model(config.model)
    data_lib.get_spec(config.dataset)


# ---- the pieces of one step -------------------------------------------------


def make_normalize(input_scale: float, mean=None, std=None) -> Callable:
    """uint8 pixels -> float32 inputs, inside the jitted step:
    x = p / 255 * input_scale, then (x - mean) / std per channel if given."""

    def normalize(pixels):
        x = pixels.astype(jnp.float32) * (input_scale / 255.0)
        if mean is not None:
            x = (x - mean) / std
        return x

    return normalize


def channel_stats(images: np.ndarray, input_scale: float):
    """Per-channel mean and std of the normalised training images."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) * (input_scale / 255.0)
    return jnp.asarray(x.mean(0), jnp.float32), jnp.asarray(x.std(0) + 1e-8, jnp.float32)


def train_step(state, batch, *, apply_fn, optimizer, loss_mode, reduction, normalize):
    """One optimiser step on one minibatch.

    state: (params, opt_state); batch: (uint8 images, int labels, weights),
    weights 1 for real examples and 0 for the padding of a last partial batch.
    Returns the new state and (mean loss, number correct, number of examples).
    """
    params, opt_state = state
    pixels, labels, weights = batch
    x = normalize(pixels)
    loss_and_outputs = BATCH_LOSSES_AND_OUTPUTS[loss_mode]

    def objective(p):
        return loss_and_outputs(apply_fn, p, x, labels, weights, reduction=reduction)

    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    n = jnp.sum(weights)
    mean_loss = loss / n if reduction == "sum" else loss
    correct = jnp.sum(weights * (jnp.argmax(logits, axis=-1) == labels))
    return (params, opt_state), (mean_loss, correct, n)


def run_chunk(state, images, labels, idx, weights, *, step_fn, unroll=1):
    """`len(idx)` steps under lax.scan; idx (k, B) indexes the on-device data."""

    def body(state, iw):
        i, w = iw
        return step_fn(state, (images[i], labels[i], w))

    return jax.lax.scan(body, state, (idx, weights), unroll=unroll)


def as_batches(order, batch_size: int):
    """Example indices in `order` as (steps, B) indices and weights; the last
    batch is padded with weight-0 copies of example 0."""
    n = order.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    idx = jnp.concatenate([order, jnp.zeros(pad, order.dtype)]).reshape(steps, batch_size)
    weights = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(steps, batch_size)
    return idx, weights


UNROLLED_CHUNK = 8


def chunk_plan(config: TrainConfig, steps_per_epoch: int, convolutional: bool) -> tuple[int, bool]:
    """(steps per lax.scan call, whether to unroll it).

    Default: about a tenth of an epoch per call, rolled. But XLA's CPU backend
    runs convolutions (and their gradients) inside a loop body without its
    fast convolution library, about 17x slower than the same step outside a
    loop (cnn-mnist: one epoch 277 s rolled, 8 s unrolled); so on CPU a
    convolutional model scans 8 steps at a time, fully unrolled: still no
    Python between steps, and a compile time that stays small.
    """
    unroll = config.unroll
    if unroll is None:
        unroll = convolutional and jax.default_backend() == "cpu"
    chunk = config.steps_per_chunk or (UNROLLED_CHUNK if unroll else -(-steps_per_epoch // 10))
    return max(1, min(chunk, steps_per_epoch)), bool(unroll)


def epoch_key(seed: int, epoch: int):
    """The key of an epoch's permutation, from (seed, epoch) alone: the same
    seed gives the same batches, whoever draws them."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


def epoch_batches(key, n: int, batch_size: int):
    """A fresh random permutation of the n examples, as batches."""
    return as_batches(jax.random.permutation(key, n), batch_size)


def evaluate(params, images, labels, *, apply_fn, normalize, batch_size: int):
    """Mean cross-entropy and accuracy over a whole split (batched forward passes)."""
    n = len(labels)
    idx, weights = as_batches(jnp.arange(n), min(batch_size, n))
    loss_sum, correct = _evaluate(params, images, labels, idx, weights, apply_fn=apply_fn, normalize=normalize)
    return float(loss_sum) / n, float(correct) / n


@partial(jax.jit, static_argnames=("apply_fn", "normalize"))
def _evaluate(params, images, labels, idx, weights, *, apply_fn, normalize):
    def body(carry, iw):
        i, w = iw
        y = labels[i]
        loss_sum, logits = batched_loss_and_outputs(apply_fn, params, normalize(images[i]), y, w, reduction="sum")
        return (carry[0] + loss_sum, carry[1] + jnp.sum(w * (jnp.argmax(logits, -1) == y))), None

    (loss_sum, correct), _ = jax.lax.scan(body, (0.0, 0.0), (idx, weights))
    return loss_sum, correct


# ---- the whole run ----------------------------------------------------------


class RunFiles:
    """metrics.jsonl (one line per epoch, appended as it ends), config.json, params.msgpack."""

    def __init__(self, out: str | None, config: TrainConfig):
        self.dir = Path(out) if out else None
        if self.dir is None:
            return
        if self.dir.exists() and not self.dir.is_dir():
            raise JaxbatchError(f"output folder {self.dir} is a file; pass --out a folder path")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.dir / "metrics.jsonl"
        self.metrics.unlink(missing_ok=True)  # a new run starts a new log
        self._write_atomic("config.json", json.dumps(dataclasses.asdict(config), indent=2).encode())

    def _write_atomic(self, name: str, payload: bytes) -> None:
        write_atomic(self.dir / name, lambda tmp: tmp.write_bytes(payload))

    def epoch(self, record: dict) -> None:
        if self.dir is not None:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def params(self, params) -> None:
        if self.dir is not None:
            self._write_atomic("params.msgpack", serialization.to_bytes(params))


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
    model = get_model(config.model)
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    return model.init(init_key, jnp.zeros(image_shape, jnp.float32))


def train_and_evaluate(config: TrainConfig, params=None, train_ds=None, test_ds=None,
                       on_progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `config.model` on `config.dataset` and evaluate on the test split
    after every epoch. `params`, if given, replaces the model's initialisation.

    `on_progress(event)` receives {"kind": "start", ...} once, {"kind": "chunk",
    "epoch", "step", "steps", "loss"} after every chunk of steps and
    {"kind": "epoch", **metrics} after every epoch.
    """
    validate(config)
    train_ds, test_ds = prepare_data(config, train_ds, test_ds)
    notify = on_progress or (lambda event: None)
    files = RunFiles(config.out, config)
    model = get_model(config.model)

    n = len(train_ds)
    steps_per_epoch = -(-n // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    chunk, unroll = chunk_plan(config, steps_per_epoch, model.convolutional)

    stats = channel_stats(train_ds.images, config.input_scale) if config.standardize else (None, None)
    normalize = make_normalize(config.input_scale, *stats)
    schedule = make_schedule(config.schedule, config.lr, config.warmup_steps, total_steps)
    optimizer = make_optimizer(config.optimizer, schedule, config.momentum, config.nesterov, config.weight_decay)
    if params is None:
        params = init_params(config, train_ds.image_shape)
    state = (params, optimizer.init(params))

    step_fn = partial(train_step, apply_fn=model.apply, optimizer=optimizer, loss_mode=config.loss,
                      reduction=config.loss_reduction, normalize=normalize)
    chunk_fn = jax.jit(partial(run_chunk, step_fn=step_fn, unroll=unroll), donate_argnums=0)
    eval_fn = partial(evaluate, apply_fn=model.apply, normalize=normalize, batch_size=config.eval_batch_size)

    # The data goes to the device once, as uint8.
    train_x, train_y = jax.device_put(train_ds.images), jax.device_put(train_ds.labels)
    test_x, test_y = jax.device_put(test_ds.images), jax.device_put(test_ds.labels)

    notify({"kind": "start", "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "train_size": n, "test_size": len(test_ds)})
    history, done, last_finite = [], 0, None
    for epoch in range(1, config.epochs + 1):
        if done >= total_steps:
            break
        t0 = time.perf_counter()
        idx, weights = epoch_batches(epoch_key(config.seed, epoch), n, config.batch_size)
        epoch_steps = min(steps_per_epoch, total_steps - done)
        loss_sum = correct_sum = seen = 0.0
        for start in range(0, epoch_steps, chunk):
            stop = min(start + chunk, epoch_steps)
            state, (losses, correct, counts) = chunk_fn(state, train_x, train_y, idx[start:stop], weights[start:stop])
            losses, correct, counts = np.asarray(losses), np.asarray(correct), np.asarray(counts)
            bad = np.flatnonzero(~(np.abs(losses) <= config.max_loss))  # NaN compares False
            if bad.size:
                good = losses[: bad[0]]
                last_finite = float(good[-1]) if good.size else last_finite
                raise Diverged(epoch, start + int(bad[0]) + 1, float(losses[bad[0]]), last_finite, config)
            last_finite = float(losses[-1])
            loss_sum += float(np.sum(losses * counts))
            correct_sum += float(np.sum(correct))
            seen += float(np.sum(counts))
            notify({"kind": "chunk", "epoch": epoch, "step": stop, "steps": epoch_steps, "loss": last_finite})
        done += epoch_steps
        jax.block_until_ready(state)
        train_time = time.perf_counter() - t0
        test_loss, test_acc = eval_fn(state[0], test_x, test_y)
        record = {
            "epoch": epoch, "steps": done, "examples_seen": int(seen),
            "train_loss": loss_sum / seen, "train_accuracy": correct_sum / seen,
            "test_loss": test_loss, "test_accuracy": test_acc,
            "epoch_time_s": train_time, "lr_end": float(schedule(done)),
        }
        history.append(record)
        files.epoch(record)
        notify({"kind": "epoch", **record})
    files.params(state[0])
    return TrainResult(state[0], history)
