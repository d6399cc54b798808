"""`jaxbatch train`: train a model and print the test accuracy after every epoch."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import sys
import warnings
from pathlib import Path

from jaxbatch.cli import STOP_SIGNALS, disk_error_line, positive_int


def add_parser(sub) -> None:
    from jaxbatch.config import TrainConfig
    from jaxbatch.recipes import RECIPES
    from jaxbatch.settings import add_flags

    p = sub.add_parser(
        "train", help="train a model (default: mlp on the bundled digits)",
        description="Train a model with Optax and print the test accuracy after every epoch. "
        "With no flags: mlp on the bundled `digits` dataset. Flags override a --recipe.")
    p.add_argument("--recipe", choices=list(RECIPES), help="a preset reproducing one of the texts' runs")
    p.add_argument("--config", metavar="FILE", help="start from a run's config.json (other flags override it; "
                   "its out, resume and overwrite are not taken: the run goes to a new folder unless --out)")
    p.add_argument("--plot", action="store_true", help="draw the run's curves into its folder at the end "
                   "(curves.png; jaxbatch plot compares runs)")
    add_flags(p, TrainConfig)  # every setting's flag, help and valid range, from its declaration
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only when stderr is a terminal)")
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


def build_config(args):
    from jaxbatch.config import TrainConfig
    from jaxbatch.errors import JaxbatchError
    from jaxbatch.recipes import get_recipe
    from jaxbatch.rundir import numbered_out
    from jaxbatch.settings import given

    if args.recipe and args.config:
        raise JaxbatchError("--config gives every setting of a run and --recipe a preset; pass one of them")
    fields = get_recipe(args.recipe) if args.recipe else read_config(args.config) if args.config else {}
    config = TrainConfig(**{**fields, **given(args, TrainConfig)})
    if config.out is None:  # a new numbered folder, so no run replaces another (jaxbatch/rundir.py)
        config.out = numbered_out(f"runs/{args.recipe or f'{config.model}-{config.dataset}'}", config.resume)
    return config


# A run's config.json keys that are not settings to take: what the run ran on,
# and where its files went (a reproduced run must not resume or replace the
# run it copies: it goes to a new folder unless --out is given).
NOT_TAKEN = ("environment", "out", "resume", "overwrite")


def read_config(path) -> dict:
    """The settings of a saved config.json, as TrainConfig fields; checked
    later like flags. An unreadable file or an unknown key is one line."""
    import dataclasses

    from jaxbatch.config import TrainConfig
    from jaxbatch.errors import JaxbatchError

    try:
        record = json.loads(open(path, "rb").read())
    except OSError as err:
        raise JaxbatchError(f"--config {path}: {err.strerror}") from None
    except ValueError as err:
        raise JaxbatchError(f"--config {path} is not JSON ({err})") from None
    if not isinstance(record, dict):
        raise JaxbatchError(f"--config {path} holds no settings: expected a run's config.json, a JSON object")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [key for key in record if key not in names and key not in NOT_TAKEN]
    if unknown:
        raise JaxbatchError(f"--config {path}: unknown setting {unknown[0]!r} (not a jaxbatch train setting; "
                            "a config.json from another version?)")
    return {key: value for key, value in record.items() if key not in NOT_TAKEN}


@contextlib.contextmanager
def events_warnings_as_lines():
    """Writing TensorBoard events can fail without ending the run
    (jaxbatch/events.py warns once): show that warning as one line."""
    from jaxbatch.events import EventsWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, EventsWarning):
            print(f"jaxbatch train: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def format_seconds(seconds: float) -> str:
    """12.3 s, 1.23 s, 45.6 ms, 789 us: three significant figures, never 0.00 s."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def resume_command(argv: list[str], out: str) -> str:
    """The command that continues this run: the same flags (less --overwrite), plus --resume (and --out)."""
    words = [w for w in argv if w not in ("--resume", "--overwrite")]
    if not any(w == "--out" or w.startswith("--out=") for w in words):
        words += ["--out", out]
    return shlex.join(["jaxbatch", "train", *words, "--resume"])


def dp_start_line(config, event: dict) -> str:
    """The start line of a DP-SGD run: its noise, sampling and final epsilon by both accountants."""
    noise = (f"noise multiplier {event['dp_noise']:.4g} (calibrated for epsilon {config.dp_epsilon:g})"
             if event["dp_noise_calibrated"] else f"noise multiplier {event['dp_noise']:g}")
    if config.dp_sampling == "poisson":
        sampling = (f"Poisson sampling, {config.batch_size} examples per batch on average (padded to at most "
                    f"{event['slots']})")
    else:
        sampling = "shuffled fixed-size batches: the epsilon below assumes Poisson sampling and is NOT a guarantee"
    return (f"DP-SGD: clip {config.dp_clip:g}, {noise}; {sampling}; after {event['total_steps']} steps epsilon "
            f"{event['final_epsilon']:.3g} (PLD; RDP {event['final_epsilon_rdp']:.3g}) at delta {config.dp_delta:g}")


def epoch_line(event: dict, first: bool = False) -> str:
    """One epoch's line: train figures where the run releases them, test figures, extras, time.
    `first`: the first epoch this process ran, whose time includes compiling the steps."""
    train = event.get("nonprivate", event)
    parts = [f"epoch {event['epoch']:3d}"]
    if "train_loss" in train:
        mark = " (non-private)" if "nonprivate" in event else ""
        parts.append(f"train loss {train['train_loss']:.4f}  train acc {train['train_accuracy']:.4f}{mark}")
    parts.append(f"test loss {event['test_loss']:.4f}  test acc {event['test_accuracy']:.4f}"
                 f"{epoch_extras({**train, **event})}  ({format_seconds(event['epoch_time_s'])}"
                 f"{', including compilation' if first else ''})")
    return "  ".join(parts)


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


def target_line(target: dict, final: dict) -> str:
    """--target-accuracy's outcome: where the run reached it, or that it did not."""
    if not target["reached"]:
        return f"target test accuracy {target['target_accuracy']:g} not reached in {final['steps']} steps"
    epsilon = f", epsilon {target['epsilon_to_target']:.3g}" if "epsilon_to_target" in target else ""
    return (f"target test accuracy {target['target_accuracy']:g} reached at step {target['steps_to_target']}: "
            f"{target['examples_to_target']} examples ({target['epochs_to_target']:.3g} epochs), "
            f"{format_seconds(target['seconds_to_target'])} of training (compilation excluded){epsilon}")


def devices_note(chosen: int | None, event: dict) -> str:
    """What the start line says of a host device count jaxbatch chose (None: the user chose)."""
    if chosen is None or event["device_kind"] != "cpu":
        return ""
    if chosen == 1:
        return " (one host device: no convolution to spread over cores)"
    return (f" ({chosen} host devices, one per core: a convolution runs faster data-parallel; "
            "JAX_NUM_CPU_DEVICES=1 or --devices 1 for one)")


def bar_showing(args, showing: bool) -> None:
    """Tell the signal handler (cli.StopSignals) whether a progress bar holds stderr's last line."""
    if hasattr(args.stop_requested, "bar_showing"):
        args.stop_requested.bar_showing = showing


def run(args) -> int:
    import jax
    from tqdm import tqdm

    from jaxbatch import checkpoint
    from jaxbatch.backends import start_host_devices
    from jaxbatch.config import is_private
    from jaxbatch.devices import collective_failed, join_cluster
    from jaxbatch.train import Interrupted, train_and_evaluate

    join_cluster(args.coordinator, args.num_processes, args.process_id, args.join_timeout, args.distributed)
    config = build_config(args)
    # Before JAX's backend starts: one host device per core for a convolution (jaxbatch/backends.py).
    chosen = None if jax.distributed.is_initialized() else start_host_devices(config)
    if args.stop_requested():  # a signal while JAX was importing: stop before loading anything
        print(f"jaxbatch train: {Interrupted(args.stop_requested(), 1, 0, None, started=False)}", file=sys.stderr)
        return STOP_SIGNALS[signal.Signals[args.stop_requested()]]
    bar = None
    first_epoch = True  # its time includes compiling
    releases_train_loss = not (is_private(config) and not config.dp_nonprivate_metrics)

    def on_progress(event):
        nonlocal bar, first_epoch
        if event["kind"] == "start":
            hosts = f" in {event['processes']} processes" if event["processes"] > 1 else ""
            print(f"training {config.model} on {config.dataset}: {event['train_size']} train / "
                  f"{event['test_size']} test examples, batch {config.batch_size}, "
                  f"{event['steps_per_epoch']} steps per epoch, {config.optimizer} lr {config.lr:g}, "
                  f"loss {config.loss}; {event['devices']} x {event['device_kind']}{hosts}"
                  f"{devices_note(chosen, event)}; run folder {config.out}/", flush=True)
            if event["final_epsilon"] is not None:
                print(dp_start_line(config, event), flush=True)
            if event["resumed_from"]:
                r = event["resumed_from"]
                for name, why in r["skipped"]:
                    print(f"jaxbatch train: skipped checkpoint {name}: {why}; taking the one before", file=sys.stderr,
                          flush=True)
                if r["missing_epochs"]:
                    epochs = ", ".join(map(str, r["missing_epochs"]))
                    print(f"jaxbatch train: warning: {config.out}/metrics.jsonl has no record of epoch"
                          f"{'s' if len(r['missing_epochs']) > 1 else ''} {epochs} (the file was lost or cut "
                          "short); the run resumes exactly from its checkpoint, but those lines stay missing",
                          file=sys.stderr, flush=True)
                print(f"resuming from {r['path']}: epoch {r['epoch']}, step {r['epoch_step']} of the epoch "
                      f"({r['step']} in all)", flush=True)
        elif event["kind"] == "epoch_start" and not args.quiet and sys.stderr.isatty():
            # Created before the epoch's first step is launched, so its rate
            # counts the whole time the steps took (and compiling, in epoch 1).
            # Only on a terminal: redrawn with carriage returns, a bar written
            # to a file (`> log 2>&1`) would fill it with one update per chunk.
            bar = tqdm(total=event["steps"], desc=f"epoch {event['epoch']}", unit="step",
                       leave=False, file=sys.stderr)
            bar_showing(args, True)  # a signal's notice then starts on a new line, not after the bar
        elif event["kind"] == "chunk" and bar is not None:
            bar.update(event["step"] - bar.n)
            if releases_train_loss:  # a DP-SGD run's training loss is not covered by its epsilon
                bar.set_postfix(loss=f"{event['loss']:.4f}")
        elif event["kind"] == "epoch":
            if bar is not None:
                bar.close()
                bar = None
                bar_showing(args, False)
            print(epoch_line(event, first=first_epoch), flush=True)
            first_epoch = False

    try:
        with events_warnings_as_lines():
            result = train_and_evaluate(config, on_progress=on_progress, stop_requested=args.stop_requested)
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        raise collective_failed(err)
    except OSError as err:  # a full disk: where a whole checkpoint was kept, the run goes on from it
        if jax.process_index() != 0 or not config.out or not checkpoint.paths(config.out):
            raise
        print(disk_error_line("jaxbatch train", err, f"; once that is fixed, resume with: "
                              f"{resume_command(args.argv, config.out)}"), file=sys.stderr, flush=True)
        return 1
    except Interrupted as stop:
        if bar is not None:  # leave=False: closing clears the bar, so the line below starts a line of its own
            bar.close()
            bar = None
            bar_showing(args, False)
        if jax.process_index() == 0:
            resume = f"; resume with: {resume_command(args.argv, config.out)}" if stop.started else ""
            print(f"jaxbatch train: {stop}{resume}", file=sys.stderr, flush=True)
        return STOP_SIGNALS[signal.Signals[stop.reason]]
    finally:
        if bar is not None:
            bar.close()
            bar_showing(args, False)
    final = result.history[-1]
    if jax.process_index() != 0:  # process 0 speaks for all
        return 0
    if result.target:
        print(target_line(result.target, final))
    epochs = f"{final['epoch']} epoch" + "s" * (final["epoch"] != 1)
    print(f"test accuracy {final['test_accuracy']:.4f} after {epochs}; "
          f"metrics and params in {config.out}/")
    if args.plot and config.out:
        from jaxbatch.curves import plot_runs, read_run

        print(f"curves in {plot_runs([read_run(config.out)], Path(config.out) / 'curves.png')}")
    return 0
