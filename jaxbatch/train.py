"""Training: the story from data to a test accuracy, in one file.

    data in -> model -> gradient -> train_step (one minibatch) -> run_chunk
    (jit, lax.scan over steps) -> evaluate -> train_and_evaluate (the epochs)

`run_chunk` and `evaluate_split` are jitted once, at module level. Everything
that varies between runs as a number (input scale, channel statistics,
learning rate, momentum, weight decay, schedule lengths, clip norm, noise,
the divergence threshold) is an argument, and what shapes the program (the
gradient function, the optimiser's structure) is a static, hashable
argument; so a second run with the same shapes, or a sweep over seeds or
learning rates, reuses the compiled program.

Choices worth knowing: the dataset stays on the device as uint8 and each
step normalises its own batch (data/inputs.py); each epoch's permutation
comes from (seed, epoch) alone; steps run in `lax.scan` chunks and the host
reads each chunk's few summary numbers one chunk late (runlog.Progress);
the last partial batch is padded with weight-0 examples, so every example
counts once per epoch; a NaN, infinite or exploded loss raises `Diverged`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbatch import backends, checkpoint, devices, optim, privacy, rundir, runlog
from jaxbatch import target as target_lib
from jaxbatch import data as data_lib
from jaxbatch.config import TrainConfig, is_private, poisson, validate  # noqa: F401  (the run's settings live there)
from jaxbatch.data.inputs import channel_stats, input_numbers, normalize
from jaxbatch.errors import JaxbatchError
from jaxbatch.gradients import BatchGrad, ClippedGrad, clip_figures, layer_norms
from jaxbatch.losses import batched_loss_and_outputs, vmap_loss_and_outputs
from jaxbatch.models import Model, get_model, init_params
from jaxbatch.noise_scale import NoiseScale, epoch_figures
from jaxbatch.precision import enable_x64
from jaxbatch.runlog import Diverged  # noqa: F401  (part of train_and_evaluate's contract)

# --loss: which batch loss the step differentiates (both return (L_B, outputs)).
LOSSES = {"vmap": vmap_loss_and_outputs, "batched": batched_loss_and_outputs}


class TrainResult(NamedTuple):
    params: Any
    history: list  # one dict per epoch
    steps: list = []  # with config.record_steps: one dict per step (loss, grad_norm, zero_output_fraction)
    evals: list = []  # with --eval-every or --target-accuracy: one dict per evaluation (evals.jsonl)
    target: dict = {}  # with --target-accuracy: target.record's steps, examples, epochs, seconds to it


class Interrupted(JaxbatchError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""

    def __init__(self, reason: str, epoch: int, step: int, checkpoint, started: bool = True):
        self.reason, self.epoch, self.step, self.checkpoint = reason, epoch, step, checkpoint
        self.started = started  # False: stopped before the run's first file was written
        if not started:
            super().__init__(f"stopped by {reason} before training began; nothing was written")
            return
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no output folder)"
        super().__init__(f"stopped by {reason} at epoch {epoch}, step {step}; {where}")


# ---- model ------------------------------------------------------------------


def init_key(seed: int):
    """The key of the initial parameters: from the seed alone."""
    return jax.random.fold_in(jax.random.key(seed), 0)


# ---- the gradient and the optimiser, chosen once per run ---------------------


def gradient_fn(config: TrainConfig, model: Model, mesh):
    """The step's gradient function (jaxbatch/gradients.py), composed from
    the settings before anything is jitted."""
    several = mesh if mesh.size > 1 else None
    if (config.dp_clip is not None or config.log_noise_scale) and config.dp_chunk is not None and several:
        raise JaxbatchError(f"{{setting}} forms per-example gradients, which are computed on one device only; "
                            f"drop it (ghost norms work on all {mesh.size}) or pass --devices 1", setting="dp_chunk")
    if config.dp_clip is not None:
        return ClippedGrad(model.apply, config.dp_chunk, several, expected=poisson(config),
                           physical=config.dp_physical_batch)
    grad = BatchGrad(model.apply, LOSSES[config.loss], config.loss_reduction)
    return NoiseScale(grad, config.noise_scale_every, several) if config.log_noise_scale else grad


def optimizer_parts(config: TrainConfig, total_steps: int):
    """(the step's Optax parts: DP noise if asked, then the optimiser; their
    numbers). optim.chain puts them together inside the step."""
    optim.check_warmup(config.schedule, config.warmup_steps, total_steps, config.lr)
    optimizer, numbers = optim.split(config.optimizer, config.lr, config.momentum, config.nesterov,
                                     config.weight_decay, config.schedule, config.warmup_steps, total_steps)
    parts = (privacy.AddNoise(expected=poisson(config)), optimizer) if config.dp_noise is not None else (optimizer,)
    return parts, numbers


def step_numbers(config: TrainConfig, train_ds, optimizer_numbers: dict) -> dict:
    """Every number a step takes as an argument (a sweep over them compiles nothing new)."""
    stats = channel_stats(train_ds.images, config.input_scale) if config.standardize else (None, None)
    return {"inputs": input_numbers(config.input_scale, *stats, dtype=config.dtype),
            # In the run's dtype: with JAX_ENABLE_X64 set, JAX's default float is
            # float64, and float64 numbers would promote a float32 run's state.
            "optimizer": {k: np.asarray(v, config.dtype) for k, v in optimizer_numbers.items()},
            "max_loss": np.float32(config.max_loss),
            "dp": {"clip": np.asarray(config.dp_clip or 0.0, config.dtype),
                   "noise": np.asarray(config.dp_noise or 0.0, config.dtype), "seed": np.uint32(config.seed),
                   "batch": np.asarray(config.batch_size, config.dtype)}}


# ---- one step, and a chunk of steps ------------------------------------------


def train_step(state, batch, numbers, *, grad_fn, optimizer, record=False):
    """One optimiser step on one minibatch.

    state: (params, opt_state); batch: (uint8 images, int labels, weights 1
    for real examples and 0 for padding, global step number). Returns the new
    state and {"loss" (the mean), "correct", "count", "sums" (the gradient
    function's)}; with `record`, also the per-layer gradient norms and the
    fraction of examples whose outputs are all exactly 0 (text C's dead
    network)."""
    params, opt_state = state
    pixels, labels, weights, step = batch
    x = normalize(pixels, numbers["inputs"])
    grads, loss, outputs, sums = grad_fn(params, x, labels, weights, step, numbers)
    n = jnp.sum(weights)
    updates, opt_state = optim.chain(optimizer, numbers).update(grads, opt_state, params, step=step, count=n)
    params = optax.apply_updates(params, updates)
    stats = {"loss": loss, "correct": jnp.sum(weights * (jnp.argmax(outputs, axis=-1) == labels)), "count": n,
             "sums": sums}
    if record:
        stats["grad_norm"] = layer_norms(grads)
        stats["zero_output_fraction"] = jnp.sum(weights * jnp.all(outputs == 0, axis=-1)) / n
    return (params, opt_state), stats


@partial(jax.jit, donate_argnums=0, static_argnames=("grad_fn", "optimizer", "unroll", "record"))
def run_chunk(state, data, idx, weights, steps, numbers, *, grad_fn, optimizer, unroll=1, record=False):
    """`len(idx)` steps under lax.scan; idx (k, B) indexes the on-device data
    (images, labels), steps (k,) are the steps' global numbers. Returns the
    new state, `summarize`'s few numbers, and the per-step stats when
    `record` (else None)."""
    images, labels = data

    def body(state, iws):
        i, w, step = iws
        return train_step(state, (images[i], labels[i], w, step), numbers, grad_fn=grad_fn, optimizer=optimizer,
                          record=record)

    if len(idx) == 1:  # one step: no loop. lax.scan keeps a while loop for a single step, even
        # unrolled (unroll=True means unroll=length, and 1 is "rolled"), and inside a loop body XLA:CPU
        # runs convolutions slowly (backends.py): a cnn step at B = 256 took 1.67 s there against 0.14 s.
        state, stat = body(state, (idx[0], weights[0], steps[0]))
        stats = jax.tree.map(lambda a: a[None], stat)
    else:
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
            "count": jnp.sum(stats["count"]), "extra": jax.tree.map(jnp.sum, stats["sums"])}


# ---- batches -----------------------------------------------------------------


def as_batches(order, batch_size: int):
    """Example indices in `order` as (steps, B) indices and weights; the last
    batch is padded with weight-0 copies of example 0."""
    n = order.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    idx = jnp.concatenate([order, jnp.zeros(pad, order.dtype)]).reshape(steps, batch_size)
    # float32 whatever JAX's default (0 and 1 are exact in it): with JAX_ENABLE_X64
    # set, float64 weights would promote a float32 run's gradients.
    weights = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)]).reshape(steps, batch_size)
    return idx, weights


def batch_multiple(config: TrainConfig, mesh) -> int:
    """What a padded Poisson batch's size must be a multiple of: the devices
    that share it, the physical batch that splits it, and 8."""
    return math.lcm(8, mesh.size, config.dp_physical_batch or 1)


def batches_of(config: TrainConfig, epoch: int, done: int, n: int, steps: int, slots: int | None, multiple: int):
    """(indices, weights) of an epoch's `steps` steps, (steps, batch) each, drawn the
    same by every process. Shuffled: the epoch's permutation from (seed,
    epoch). Poisson (privacy.draw_batches): each step's own draw from (seed,
    global step), padded to `slots`; the whole epoch at once, so the host
    waits for the device once per epoch, not once per chunk."""
    if slots is None:
        return tuple(np.asarray(a) for a in epoch_batches(epoch_key(config.seed, epoch), n, config.batch_size))
    return privacy.draw_batches(config.seed, np.arange(done, done + steps), n, slots, config.batch_size / n,
                                multiple)


def epoch_key(seed: int, epoch: int):
    """The key of an epoch's permutation, from (seed, epoch) alone: the same
    seed gives the same batches, whoever draws them."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


@partial(jax.jit, static_argnums=(1, 2))
def epoch_batches(key, n: int, batch_size: int):
    """A fresh random permutation of the n examples, as batches."""
    return as_batches(jax.random.permutation(key, n), batch_size)


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
    if config.eval_every:  # evaluations fall on chunk boundaries, every K steps of an epoch
        k = config.eval_every
        # Rolled, a scan's length costs nothing to compile: K steps a chunk. Unrolled, the
        # largest divisor of K that the backend's unrolled chunk allows.
        chunk = max(d for d in range(1, min(k, chunk) + 1) if k % d == 0) if unroll else k
    return max(1, min(chunk, steps_per_epoch)), bool(unroll)


# ---- evaluation --------------------------------------------------------------


def evaluate(params, images, labels, inputs: dict, *, apply_fn, batch_size: int, mesh=None):
    """Mean cross-entropy and accuracy over a whole split (batched forward
    passes), each batch shared among the mesh's devices."""
    n = labels.shape[0]
    k = 1 if mesh is None else mesh.size
    batch_size = -(-min(batch_size, n) // k) * k  # padded to share evenly
    idx, weights = (np.asarray(a) for a in as_batches(jnp.arange(n), batch_size))
    if mesh is not None:
        idx, weights = devices.place((idx, weights), devices.by_example(mesh))
    loss_sum, correct = devices.fetch(evaluate_split(params, images, labels, idx, weights, inputs, apply_fn=apply_fn))
    return float(loss_sum) / n, float(correct) / n


@partial(jax.jit, static_argnames=("apply_fn",))
def evaluate_split(params, images, labels, idx, weights, inputs, *, apply_fn):
    """(summed loss, correct count) over the batches idx (k, B) of a split."""
    def body(carry, iw):
        i, w = iw
        y = labels[i]
        loss_sum, logits = batched_loss_and_outputs(apply_fn, params, normalize(images[i], inputs), y, w,
                                                    reduction="sum")
        return (carry[0] + loss_sum, carry[1] + jnp.sum(w * (jnp.argmax(logits, -1) == y))), None

    (loss_sum, correct), _ = jax.lax.scan(body, (0.0, 0.0), (idx, weights))
    return loss_sum, correct


# ---- the whole run -----------------------------------------------------------


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
    Every setting is checked before any file is written.
    """
    validate(config)
    model = get_model(config.model)
    mesh = devices.data_mesh(config.devices)
    devices.check_divides(config.batch_size, mesh)
    grad_fn = gradient_fn(config, model, mesh)
    train_ds, test_ds = data_lib.prepare_data(config.dataset, model, config.batch_size, config.data_dir,
                                              config.source, train_ds, test_ds)
    notify = on_progress if on_progress and jax.process_index() == 0 else (lambda event: None)
    with contextlib.ExitStack() as closing:  # what the run holds until it ends, however it ends
        if config.dtype == "float64":
            closing.enter_context(enable_x64())  # while the run is traced and run
        return _train(config, mesh, model, grad_fn, params, train_ds, test_ds, notify,
                      stop_requested or (lambda: None), closing)


def _train(config, mesh, model, grad_fn, params, train_ds, test_ds, notify, stop_requested,
           closing) -> TrainResult:
    n = len(train_ds)
    steps_per_epoch = -(-n // config.batch_size)
    total_steps = min(steps_per_epoch * config.epochs, config.max_steps or steps_per_epoch * config.epochs)
    q = config.batch_size / n
    calibrated = is_private(config) and config.dp_noise is None
    if calibrated:  # --dp-epsilon alone: the noise that makes the whole run end at that epsilon
        config = dataclasses.replace(config, dp_noise=privacy.calibrate_noise(q, total_steps, config.dp_delta,
                                                                              config.dp_epsilon))
    # DP-SGD: the epsilon the whole run will reach, checked against a budget before any file is written.
    final_epsilon = privacy.run_epsilon(q, config.dp_noise, total_steps, config.dp_delta, config.dp_epsilon)
    env = runlog.environment(mesh)

    if params is None:
        params = init_params(model, init_key(config.seed), train_ds.image_shape)
    params = jax.tree.map(lambda p: np.asarray(p, config.dtype), params)
    example = np.zeros(train_ds.image_shape, config.dtype)
    has_conv = backends.has_convolution(model.apply, params, example)
    backends.warn_if_few_devices(config, has_conv)  # the CLI chooses the count before JAX starts; the API cannot
    chunk, unroll = chunk_plan(config, steps_per_epoch, has_conv)
    optimizer, optimizer_numbers = optimizer_parts(config, total_steps)
    numbers = step_numbers(config, train_ds, optimizer_numbers)
    state = (params, optim.chain(optimizer, numbers).init(params))
    position = {"step": 0, "epoch": 1, "epoch_step": 0, "epochs_done": 0}
    # Every setting is checked by now; the folder last, so a bad flag is not
    # met only after the folder's refusal has been dealt with.
    rundir.check_out(config.out, config.resume, config.overwrite)
    ckpt = None
    fresh = state  # the structure a checkpoint's state must have (`state` moves on as the run goes)

    def usable(c):  # a checkpoint's position and state fit this run (to resume from it, to count it as kept)
        checkpoint.check_position(c["position"], steps_per_epoch, total_steps, config.epochs)
        c["state"] = checkpoint.restore(c, fresh)

    if config.resume:  # the newest checkpoint that fits
        ckpt = checkpoint.latest(config.out, config, usable)
        state, position = ckpt["state"], ckpt["position"]
    # Everything but the batches is replicated: parameters, optimiser state,
    # the numbers, and the uint8 dataset, which goes to every device once
    # (60,000 MNIST images are 47 MB; CIFAR-10's 50,000 are 154 MB). Each step
    # then gathers only its own B/K examples from its own copy: no device
    # builds more of a batch than its share, and no pixels cross devices.
    everywhere = devices.replicated(mesh)
    state, numbers = devices.place((state, numbers), everywhere)
    train_data = devices.place((train_ds.images, train_ds.labels), everywhere)
    test_x, test_y = devices.place((test_ds.images, test_ds.labels), everywhere)
    slots = cut = None
    multiple = batch_multiple(config, mesh)
    if poisson(config):  # padded Poisson batches: the slots for the worst case, their padding cut
        slots = privacy.batch_slots(config.batch_size, n, multiple)
        if backends.cut_padding_in_step(has_conv, mesh.size):  # in each step (chunks.front_sum)
            grad_fn = grad_fn._replace(front=privacy.front_blocks(config.batch_size, n, multiple))
        else:  # per chunk of steps (privacy.trim)
            cut = privacy.typical_slots(config.batch_size, n, multiple)
    chunk_fn = partial(run_chunk, grad_fn=grad_fn, optimizer=optimizer, unroll=unroll,
                       record=config.record_steps > 0)
    reason = stop_requested()
    if reason:  # before the first file: the folder stays as it was
        raise Interrupted(reason, position["epoch"], position["epoch_step"], None, started=False)
    files = closing.enter_context(runlog.RunFiles(config.out, config, env, usable))  # the folder, locked to the end
    history = files.history(position["epochs_done"]) if ckpt is not None else []
    logged = {record["epoch"] for record in history}
    notify({"kind": "start", "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "dp_noise": config.dp_noise, "dp_noise_calibrated": calibrated, "slots": slots,
            "final_epsilon_rdp": None if final_epsilon is None else privacy.epsilon(
                q, config.dp_noise, total_steps, config.dp_delta, "rdp"),
            "train_size": n, "test_size": len(test_ds), "out": config.out, "devices": env["devices"],
            "device_kind": env["device_kind"], "processes": env["processes"],
            "resumed_from": None if ckpt is None else {
                **position, "path": str(ckpt["path"]), "skipped": ckpt["skipped"],
                # epochs done that metrics.jsonl lost: the run goes on exactly, their lines do not come back
                "missing_epochs": [e for e in range(1, position["epochs_done"] + 1) if e not in logged]},
            "final_epsilon": final_epsilon})
    progress = runlog.Progress(config, notify)
    evals = files.evaluations(position["step"]) if ckpt is not None else []
    saved = ckpt["epoch_sums"] if ckpt is not None else {}
    clock = closing.enter_context(target_lib.TrainClock(_number(saved.get("train_time_s"))))
    examples_before = _number(saved.get("examples_before"))  # the examples of the epochs done
    keeps_evals = config.eval_every is not None or config.target_accuracy is not None
    point = None  # the first evaluation that reached the target

    def evaluate_now(epoch: int, step: int) -> dict:
        """Evaluate the test split (the clock stopped) and record it as an evaluation point."""
        loss, accuracy = evaluate(state[0], test_x, test_y, numbers["inputs"], apply_fn=model.apply,
                                  batch_size=config.eval_batch_size, mesh=mesh)
        examples = int(examples_before + progress.seen)
        record = {"step": step, "epoch": epoch, "examples": examples, "epochs": examples / n,
                  "test_loss": loss, "test_accuracy": accuracy, "train_time_s": clock.seconds}
        if keeps_evals:
            evals.append(record)
            files.evaluation(record)
        if target_lib.reached(config.target_accuracy, accuracy) and config.dp_noise is not None:
            record = {**record, "epsilon": privacy.epsilons(q, config.dp_noise, step, config.dp_delta)["epsilon"]}
        return record

    def save(position: dict):
        return files.checkpoint(position, {**progress.sums(), "train_time_s": clock.seconds,
                                           "examples_before": examples_before}, state)

    done = position["step"] - position["epoch_step"]  # steps before this epoch
    for epoch in range(position["epoch"], config.epochs + 1):
        if done >= total_steps or point is not None:
            break
        t0 = time.perf_counter()
        clock.start()
        epoch_steps = min(steps_per_epoch, total_steps - done)
        resumed = ckpt is not None and epoch == position["epoch"] and position["epoch_step"] > 0
        progress.start_epoch(epoch, epoch_steps, ckpt["epoch_sums"] if resumed else None)
        idx, weights = batches_of(config, epoch, done, n, steps_per_epoch, slots, multiple)
        first = position["epoch_step"] if resumed else 0  # a chunk boundary: the chunks stay the same
        for start in range(first, epoch_steps, chunk):
            stop = min(start + chunk, epoch_steps)
            batch = (idx[start:stop], weights[start:stop])
            if cut is not None:  # Poisson: the chunk's padding cut where all its batches fit
                batch = privacy.trim(*batch, cut)
            batches = devices.place(batch, devices.by_example(mesh))
            steps = devices.place(np.arange(done + start, done + stop, dtype=np.int32), everywhere)
            state, summary, trace = chunk_fn(state, train_data, *batches, steps, numbers)
            progress.push(start, stop, summary, trace)
            if stop < epoch_steps and target_lib.eval_due(config.eval_every, stop):
                progress.flush()  # the chunk's steps are done (and did not diverge) before they are timed
                clock.stop()
                reached = evaluate_now(epoch, done + stop)
                if target_lib.reached(config.target_accuracy, reached["test_accuracy"]):
                    point = reached
                    break
                clock.start()
            reason = stop_requested()
            every = config.checkpoint_every
            due = every and (done + stop) // every > (done + start) // every and stop < epoch_steps
            path = None
            if (reason or due) and config.out:
                progress.flush()  # a checkpoint holds only steps known not to have diverged
                clock.stop()
                path = save({"step": done + stop, "epoch": epoch, "epoch_step": stop, "epochs_done": epoch - 1})
                clock.start()
            if reason:
                raise Interrupted(reason, epoch, stop, path)
        progress.flush()
        jax.block_until_ready(state)
        clock.stop()
        train_time = time.perf_counter() - t0
        steps_done = point["step"] - done if point is not None else epoch_steps
        done += steps_done
        if point is None:
            end = evaluate_now(epoch, done)
            point = end if target_lib.reached(config.target_accuracy, end["test_accuracy"]) else None
        else:
            end = point
        record = {
            "epoch": epoch, "steps": done, "examples_seen": int(progress.seen),
            "train_loss": progress.loss_sum / progress.seen, "train_accuracy": progress.correct / progress.seen,
            "test_loss": end["test_loss"], "test_accuracy": end["test_accuracy"], "epoch_time_s": train_time,
            "lr_end": float(optimizer[-1].learning_rate(optimizer_numbers)(done)),
            "devices": env["devices"], "device_kind": env["device_kind"],
            **gradient_metrics(config, progress, n, done),
        }
        record = privacy.released(record, config.dp_noise is not None, config.dp_nonprivate_metrics)
        examples_before += progress.seen
        # The target's record on the run's last line: reached here, or never (the run's last epoch).
        last = point is not None or done >= total_steps or epoch == config.epochs
        if last and config.target_accuracy is not None:
            record["target"] = target_lib.record(config.target_accuracy, point, n)
        history.append(record)
        files.epoch(record)
        notify({"kind": "epoch", **record})
        # No checkpoint once the target is reached: the run is over, and a --resume replays
        # it from the checkpoint before, to the same step.
        if config.out and point is None:
            save({"step": done, "epoch": epoch + 1, "epoch_step": 0, "epochs_done": epoch})
    final = jax.tree.map(jnp.asarray, devices.fetch(state[0]))
    files.params(final)
    target = history[-1].get("target", {}) if history else {}
    return TrainResult(final, history, progress.steps, evals, target)


def _number(value) -> float:
    """A checkpoint's saved number, or 0 where an older checkpoint has none."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def gradient_metrics(config: TrainConfig, progress, train_size: int, steps_done: int) -> dict:
    """What an epoch line adds for clipping, DP-SGD and the noise scale."""
    record = clip_figures(progress.extra, progress.seen) if config.dp_clip is not None else {}
    if config.dp_noise is not None:
        q = config.batch_size / train_size
        record.update(privacy.epsilons(q, config.dp_noise, steps_done, config.dp_delta), delta=config.dp_delta)
    if config.log_noise_scale:
        record.update(epoch_figures(progress.extra))
    return record
