"""`jaxbatch train`: train a model and print the test accuracy after every epoch."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import signal
import sys

from jaxbatch.cli import non_negative_float, positive_float, positive_int


def add_parser(sub) -> None:
    from jaxbatch.data import SOURCES
    from jaxbatch.models import MODELS
    from jaxbatch.optim import OPTIMIZERS, SCHEDULES
    from jaxbatch.recipes import RECIPES
    from jaxbatch.train import LOSS_MODES, REDUCTIONS, TrainConfig

    d = TrainConfig()  # the defaults, quoted in the help

    p = sub.add_parser(
        "train", help="train a model (default: mlp on the bundled digits)",
        description="Train a model with Optax and print the test accuracy after every epoch. "
        "With no flags: mlp on the bundled `digits` dataset. Flags override a --recipe.")
    p.add_argument("--recipe", choices=list(RECIPES), help="a preset reproducing one of the texts' runs")
    p.add_argument("--model", choices=list(MODELS))
    p.add_argument("--dataset", help="digits (bundled), mnist, fashion_mnist, kmnist, cifar10")
    p.add_argument("--data-dir", help="folder holding <dataset>/ files (default $JAXBATCH_DATA or ~/.jaxbatch/data)")
    p.add_argument("--source", choices=list(SOURCES), help="where to read the dataset from (default auto)")
    p.add_argument("--epochs", type=positive_int, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=positive_int, help=f"default {d.batch_size}")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), help=f"default {d.optimizer}")
    p.add_argument("--lr", type=positive_float, help=f"learning rate (the peak, with a schedule; default {d.lr:g})")
    p.add_argument("--momentum", type=non_negative_float, help=f"sgd momentum (default {d.momentum:g})")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum (sgd)")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help=f"L2 added to the gradient (sgd, adam), or decoupled (adamw); default {d.weight_decay:g}")
    p.add_argument("--schedule", choices=list(SCHEDULES), help=f"learning-rate schedule (default {d.schedule})")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps for warmup schedules")
    p.add_argument("--loss", choices=list(LOSS_MODES),
                   help="vmap: the one-example loss under jax.vmap (default); batched: the whole batch at once")
    p.add_argument("--loss-reduction", choices=list(REDUCTIONS), help="mean (default) or sum over the batch")
    p.add_argument("--input-scale", type=positive_float, help=f"inputs are pixels / 255 * this (default {d.input_scale:g})")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel standardisation with training-set statistics")
    p.add_argument("--seed", type=int, help=f"initialisation and shuffling seed (default {d.seed})")
    p.add_argument("--max-loss", type=positive_float,
                   help=f"a step loss above this (or NaN/inf) stops training as diverged (default {d.max_loss:g})")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps in all")
    p.add_argument("--out", help="folder for metrics.jsonl, config.json and params.msgpack "
                   "(default runs/<recipe or model-dataset>)")
    c = p.add_argument_group("checkpoints (in --out/checkpoints; see README: Checkpoints and resuming)")
    c.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="save a checkpoint every N steps too (always: at the end of every epoch, and on "
                   "Ctrl-C or SIGTERM)")
    c.add_argument("--keep", type=positive_int, metavar="N", help=f"checkpoints kept, newest first (default {d.keep})")
    c.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, exactly where it stopped")
    q = p.add_argument_group("per-example clipping, DP-SGD and the gradient noise scale (README: Private training)")
    q.add_argument("--dp-clip", type=float, metavar="C",
                   help="clip every example's gradient to L2 norm C before averaging")
    q.add_argument("--dp-noise", type=float, metavar="SIGMA",
                   help="DP-SGD: add Gaussian noise of std SIGMA * C to the clipped sum; epsilon is reported")
    q.add_argument("--dp-delta", type=float, metavar="DELTA", help=f"the delta of epsilon (default {d.dp_delta:g})")
    q.add_argument("--dp-epsilon", type=float, metavar="EPS",
                   help="a privacy budget: refuse to start a run whose epsilon would exceed it")
    q.add_argument("--dp-chunk", type=positive_int, metavar="N",
                   help="clip N examples at a time (less memory; default: the whole batch)")
    q.add_argument("--log-noise-scale", action="store_true",
                   help="log the gradient noise scale B_simple every epoch")
    q.add_argument("--noise-scale-every", type=positive_int, metavar="K",
                   help=f"measure it on every K-th step (default {d.noise_scale_every})")
    p.add_argument("--devices", type=positive_int,
                   help="data-parallel over the first N devices (default: every device; the batch size is global "
                   "and must divide by N)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="parameters and inputs (default float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("several hosts (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordinator; with --num-processes and --process-id")
    g.add_argument("--num-processes", type=positive_int, help="how many processes run this same command")
    g.add_argument("--process-id", type=int, help="this process's number, 0 .. num-processes - 1")
    g.add_argument("--join-timeout", type=positive_int, default=60, metavar="SECONDS",
                   help="how long to wait for every process to join (default 60)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with no arguments: on Cloud TPU pods, SLURM and "
                   "other clusters JAX finds the coordinator and this process's number itself")
    p.set_defaults(run=run)


def start_distributed(args) -> None:
    """Join the other processes before JAX touches a device (one program on
    every process; jax.devices() then lists every process's devices)."""
    import jax

    from jaxbatch.errors import JaxbatchError

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if args.distributed:
        _join(jax.distributed.initialize, "the cluster's coordinator", args.join_timeout)
        return
    if any(v is None for v in explicit):
        raise JaxbatchError("--coordinator, --num-processes and --process-id go together; pass all three "
                            "(or --distributed on a cluster JAX detects itself)")
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise JaxbatchError(f"--coordinator {args.coordinator!r} is not HOST:PORT, e.g. 10.0.0.1:1234")
    if not 0 <= args.process_id < args.num_processes:
        raise JaxbatchError(f"--process-id {args.process_id} is outside 0 .. {args.num_processes - 1}")
    if args.process_id != 0:
        wait_for_coordinator(host, int(port), args.join_timeout)
    _join(lambda **kw: jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id, **kw),
          f"the coordinator at {args.coordinator} as process {args.process_id} of {args.num_processes}",
          args.join_timeout)
    if jax.process_count() != args.num_processes:
        # The coordinator's count wins inside XLA; a process started with another
        # one would otherwise train as if nothing were wrong.
        raise JaxbatchError(f"this process was started with --num-processes {args.num_processes}, but the "
                            f"coordinator at {args.coordinator} runs {jax.process_count()}; pass the same "
                            "--num-processes to every process", cluster_broken=True)


def wait_for_coordinator(host: str, port: int, timeout: int) -> None:
    """Wait until process 0's coordinator accepts connections. XLA's client,
    when it cannot register in time, ends the process from C++ (SIGABRT and a
    stack trace), so an address nobody answers at is caught here first."""
    import socket
    import time

    from jaxbatch.errors import JaxbatchError

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise JaxbatchError(f"no coordinator answered at {host}:{port} within {timeout} s ({err.strerror or err}); "
                                    "start process 0 first, with the same --coordinator, or check the address")
            time.sleep(0.5)


def _join(initialize, what: str, timeout: int) -> None:
    """jax.distributed.initialize, bounded in time; a failure is one line."""
    from jaxbatch.errors import JaxbatchError

    try:
        initialize(initialization_timeout=timeout)
    except Exception as err:  # XLA's runtime errors carry many lines; the first says what happened
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JaxbatchError(f"could not join {what} within {timeout} s ({first[:200]}); check that process 0 "
                            "is running at that address and that every process passes the same --num-processes")


def build_config(args):
    from jaxbatch.recipes import get_recipe
    from jaxbatch.train import TrainConfig

    fields = get_recipe(args.recipe) if args.recipe else {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            fields[field.name] = value
    config = TrainConfig(**fields)
    if config.out is None:
        config.out = f"runs/{args.recipe or f'{config.model}-{config.dataset}'}"
    return config


def format_seconds(seconds: float) -> str:
    """12.3 s, 1.23 s, 45.6 ms, 789 us: three significant figures, never 0.00 s."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit status: 128 + the signal's number


@contextlib.contextmanager
def stop_on_signals():
    """While training: Ctrl-C (SIGINT) or SIGTERM (what a cloud machine gets
    before preemption) only asks the run to stop. Training checks between
    chunks of steps, saves a checkpoint and raises train.Interrupted. The
    handler then steps aside, so a second signal acts at once (Ctrl-C twice:
    KeyboardInterrupt; SIGTERM twice: the process ends)."""
    requested = []
    previous = {}

    def handler(signum, frame):
        requested.append(signal.Signals(signum).name)
        signal.signal(signum, previous[signum])

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield lambda: requested[0] if requested else None
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def resume_command(argv: list[str], out: str) -> str:
    """The command that continues this run: the same flags, plus --resume (and --out)."""
    words = [w for w in argv if w != "--resume"]
    if not any(w == "--out" or w.startswith("--out=") for w in words):
        words += ["--out", out]
    return shlex.join(["jaxbatch", "train", *words, "--resume"])


def epoch_extras(event: dict) -> str:
    """The epoch line's additions for clipping, DP-SGD and the noise scale."""
    parts = []
    if "clipped_fraction" in event:
        parts.append(f"clipped {event['clipped_fraction']:.0%}")
    if "epsilon" in event:
        parts.append(f"epsilon {event['epsilon']:.3g}")
    if "noise_scale" in event:
        parts.append(f"noise scale {event['noise_scale']:.4g}")
    return "".join(f"  {p}" for p in parts)


def run(args) -> int:
    import jax
    from tqdm import tqdm

    from jaxbatch.train import Interrupted, train_and_evaluate

    start_distributed(args)
    config = build_config(args)
    bar = None

    def on_progress(event):
        nonlocal bar
        if event["kind"] == "start":
            hosts = f" in {event['processes']} processes" if event["processes"] > 1 else ""
            print(f"training {config.model} on {config.dataset}: {event['train_size']} train / "
                  f"{event['test_size']} test examples, batch {config.batch_size}, "
                  f"{event['steps_per_epoch']} steps per epoch, {config.optimizer} lr {config.lr:g}, "
                  f"loss {config.loss}; {event['devices']} x {event['device_kind']}{hosts}", flush=True)
            if event["final_epsilon"] is not None:
                print(f"DP-SGD: clip {config.dp_clip:g}, noise multiplier {config.dp_noise:g}; after "
                      f"{event['total_steps']} steps epsilon {event['final_epsilon']:.3g} at delta "
                      f"{config.dp_delta:g}", flush=True)
            if event["resumed_from"]:
                r = event["resumed_from"]
                print(f"resuming from {r['path']}: epoch {r['epoch']}, step {r['epoch_step']} of the epoch "
                      f"({r['step']} in all)", flush=True)
        elif event["kind"] == "epoch_start" and not args.quiet:
            # Created before the epoch's first step is launched, so its rate
            # counts the whole time the steps took (and compiling, in epoch 1).
            bar = tqdm(total=event["steps"], desc=f"epoch {event['epoch']}", unit="step",
                       leave=False, file=sys.stderr)
        elif event["kind"] == "chunk" and bar is not None:
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.4f}")
        elif event["kind"] == "epoch":
            if bar is not None:
                bar.close()
                bar = None
            print(f"epoch {event['epoch']:3d}  train loss {event['train_loss']:.4f}  "
                  f"train acc {event['train_accuracy']:.4f}  test loss {event['test_loss']:.4f}  "
                  f"test acc {event['test_accuracy']:.4f}{epoch_extras(event)}  "
                  f"({format_seconds(event['epoch_time_s'])})", flush=True)

    try:
        with stop_on_signals() as stop_requested:
            result = train_and_evaluate(config, on_progress=on_progress, stop_requested=stop_requested)
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        from jaxbatch.errors import JaxbatchError

        first = str(err).strip().splitlines()[0][:300]
        raise JaxbatchError(f"a collective with the other processes failed ({first}); another process "
                            "probably stopped: see its output, and check every process passes the same flags",
                            cluster_broken=True)
    except Interrupted as stop:
        if jax.process_index() == 0:
            print(f"jaxbatch train: {stop}; resume with: {resume_command(args.argv, config.out)}",
                  file=sys.stderr, flush=True)
        return STOP_SIGNALS[signal.Signals[stop.reason]]
    finally:
        if bar is not None:
            bar.close()
    final = result.history[-1]
    if jax.process_index() != 0:  # process 0 speaks for all
        return 0
    print(f"test accuracy {final['test_accuracy']:.4f} after {final['epoch']} epochs; "
          f"metrics and params in {config.out}/")
    return 0
