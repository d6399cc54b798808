"""`jaxbatch`: the command line. It only parses arguments and calls the library.

Each subcommand lives in its own module (cli/train.py, cli/data.py, ...) with
`add_parser(subparsers)`, which registers its flags and a `run(args)`.
Anything the user can fix ends as ONE line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import signal
import sys
import threading

from jaxbatch.errors import JaxbatchError

SUBCOMMANDS = ["train", "data", "experiment", "bench", "info", "plot"]  # each module adds its name here


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; we print one line.
    Flags are taken only whole: by default argparse reads --epoch 2 as
    --epochs 2, so a mistyped flag silently becomes another."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = _flags(self)
            for word in message.split(":", 1)[1].split():
                close = suggest_flag(word.split("=")[0], flags) if word.startswith("-") else None
                if close:
                    message += f"; did you mean {close}?"
                    break
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Flags other tools (PyTorch scripts, Keras, Hugging Face, argparse habits) name
# differently: what a newcomer types first, and jaxbatch's flag for it.
FLAG_SYNONYMS = {
    "--learning-rate": "--lr", "--learning_rate": "--lr", "--learningrate": "--lr", "--eta": "--lr",
    "--batch_size": "--batch-size", "--batchsize": "--batch-size", "--bs": "--batch-size", "-b": "--batch-size",
    "--num-epochs": "--epochs", "--num_epochs": "--epochs", "--n-epochs": "--epochs", "--n_epochs": "--epochs",
    "--max-epochs": "--epochs", "--max_epochs": "--epochs", "--epoch": "--epochs",
    "--output-dir": "--out", "--output_dir": "--out", "--outdir": "--out", "--out-dir": "--out",
    "--out_dir": "--out", "--output": "--out", "--logdir": "--out", "--log-dir": "--out", "--save-dir": "--out",
    "--data-path": "--data-dir", "--data_dir": "--data-dir", "--datadir": "--data-dir", "--data-root": "--data-dir",
    "--dataset-dir": "--data-dir",
    "--random-seed": "--seed", "--random_seed": "--seed",
    "--weight_decay": "--weight-decay", "--wd": "--weight-decay",
    "--optimiser": "--optimizer", "--optim": "--optimizer", "--opt": "--optimizer",
}


def suggest_flag(word: str, flags: list[str]) -> str | None:
    """The flag meant by an unknown `word`: a synonym from another tool whose
    jaxbatch flag exists here (--learning-rate -> --lr), the same flag with
    "_" for "-" (--batch_size -> --batch-size), else the closest by spelling."""
    for guess in (FLAG_SYNONYMS.get(word.lower()), word.replace("_", "-").lower()):
        if guess in flags:
            return guess
    close = difflib.get_close_matches(word, flags, n=1) if word.startswith("--") else []
    return close[0] if close else None


def _flags(parser) -> list[str]:
    """Every flag of `parser` and of its subcommands."""
    flags = []
    for action in parser._actions:
        flags += action.option_strings
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            flags += _flags(sub)
    return flags


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="jaxbatch",
        description="How mini-batch training really works, in JAX: per-example losses under "
        "jax.vmap beside batched ones, trained with Optax, measured on your hardware.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"jaxbatch.cli.{name}").add_parser(sub)
    return parser


def flag_name(setting: str | None) -> str | None:
    """The flag of a library setting: batch_size -> --batch-size."""
    return None if setting is None else "--" + setting.replace("_", "-")


STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit status: 128 + the signal's number


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what a cloud machine gets before
    preemption) only ask to stop: the handler sets a flag that training reads
    between chunks of steps, where it saves a checkpoint and stops cleanly.
    Installed first thing in `main`, before JAX is imported, so no moment of
    start-up turns a signal into a traceback. A second signal stops at once
    (os._exit: no exit handler runs to print a traceback; files are written
    whole or not at all, jaxbatch/atomic.py). Call it for the signal's name,
    or None. While `bar_showing` is set (a progress bar drawn on stderr
    without its newline yet), the notice begins with a newline, so it starts
    on a line of its own instead of after the bar's last figures."""

    def __init__(self):
        self.requested = None
        self.bar_showing = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        start = "\n" if self.bar_showing else ""
        if self.requested is not None:
            os.write(2, f"{start}jaxbatch: stopped at once by a second {name}\n".encode())
            os._exit(STOP_SIGNALS[signum])
        self.requested = name
        os.write(2, f"{start}jaxbatch: {name}: stopping at the next safe point; send it again to stop at once\n"
                 .encode())

    def __call__(self) -> str | None:
        return self.requested

    def restore(self) -> None:
        """The handlers from before: a signal acts at once again (Ctrl-C: KeyboardInterrupt)."""
        for signum, old in self.previous.items():
            signal.signal(signum, old)
        self.previous = {}


def main(argv=None) -> int:
    """`jaxbatch ARGV`'s exit status. With no `argv`, main is the process's own
    command (the `jaxbatch` script, `python -m jaxbatch`): its stop handlers
    then stay until the process exits, so a second signal that comes while
    the process ends (JAX's teardown takes a moment) still stops it with its
    line and 130 or 143. Called with `argv` (tests, a notebook), it puts back
    the handlers it found."""
    stop = StopSignals()
    own_process = argv is None
    try:
        argv = sys.argv[1:] if own_process else list(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv[1:]  # the subcommand's own words, e.g. for the command that resumes a run
        if args.command != "train":  # only training stops at a safe point; the others stop at once
            stop.restore()
            if stop.requested:
                raise KeyboardInterrupt
        args.stop_requested = stop
        return _run(args)
    except KeyboardInterrupt:
        print("jaxbatch: interrupted", file=sys.stderr)
        return 130
    finally:
        if not own_process:  # the caller goes on; the process's own command keeps them to its exit
            stop.restore()


def _run(args) -> int:
    # The words that named what failed: "jaxbatch experiment equality", "jaxbatch data check".
    name = " ".join(["jaxbatch", args.command, *filter(None, [getattr(args, "experiment", None),
                                                             getattr(args, "action", None)])])
    try:
        return args.run(args) or 0
    except JaxbatchError as err:
        print(f"{name}: error: {err.render(flag_name(err.setting))}", file=sys.stderr)
        if err.cluster_broken:
            # At exit JAX waits at a shutdown barrier for every process of the
            # cluster; peers that never come would hold this one there ~35 s
            # after its error line. Leave at once instead.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the disk, not the input: full, read-only, gone
        print(disk_error_line(name, err), file=sys.stderr)
        return 1


def disk_error_line(name: str, err: OSError, then: str = "") -> str:
    """The one line of a write that failed (a full disk): the file, the reason, and `then` (what to do next)."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{name}: error: {where}{err.strerror or err}; nothing after the last complete file was kept{then}"
