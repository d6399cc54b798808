"""`jaxbatch`: the command line. It only parses arguments and calls the library.

Each subcommand lives in its own module (cli/train.py, cli/data.py, ...) with
`add_parser(subparsers)`, which registers its flags and a `run(args)`.
Anything the user can fix ends as ONE line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jaxbatch.errors import JaxbatchError

SUBCOMMANDS = ["train", "data", "experiment", "bench"]  # each module adds its name here


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; we print one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own words, e.g. for the command that resumes a run
    try:
        return args.run(args) or 0
    except JaxbatchError as err:
        print(f"jaxbatch {args.command}: error: {err.render(flag_name(err.setting))}", file=sys.stderr)
        if err.cluster_broken:
            # At exit JAX waits at a shutdown barrier for every process of the
            # cluster; peers that never come would hold this one there ~35 s
            # after its error line. Leave at once instead.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print(f"jaxbatch {args.command}: interrupted", file=sys.stderr)
        return 130
