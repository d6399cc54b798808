"""`jaxbatch experiment NAME`: run one of the texts' demonstrations, print its
table, and write result.json and PNG plots to --out."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxbatch.cli import OneLineParser, _finite_float


def add_parser(sub) -> None:
    from jaxbatch.experiments import EXPERIMENTS, get_experiment

    p = sub.add_parser(
        "experiment", help="run a demonstration (equality, variance, input-scale, lr-scaling, activations, clipping)",
        description="Run one of the demonstrations, print a short table and write result.json and PNG "
        "plots to --out. Defaults are the full runs on the real datasets; --quick is a small offline "
        "run on the bundled digits.")
    names = p.add_subparsers(dest="experiment", metavar="NAME", parser_class=OneLineParser)
    names.required = True
    for name in EXPERIMENTS:
        module = get_experiment(name)
        e = names.add_parser(name, help=module.__doc__.splitlines()[0],
                             description=module.__doc__.splitlines()[0])
        e.add_argument("--quick", action="store_true", help="a small offline run on digits (seconds)")
        e.add_argument("--out", help=f"folder for result.json and the plots (default runs/experiments/{name})")
        e.add_argument("--quiet", action="store_true", help="no progress lines")
        for field in dataclasses.fields(module.Config):
            add_field(e, field, module.QUICK)
        e.set_defaults(run=run)


def add_field(parser, field, quick: dict) -> None:
    """--field-name for one Config field, parsed by the type of its default."""
    default = field.default
    shown = f"default {_show(default)}" + (f"; --quick: {_show(quick[field.name])}" if field.name in quick else "")
    flag = "--" + field.name.replace("_", "-")
    if field.name == "data_dir":
        shown = "folder holding <dataset>/ files (default $JAXBATCH_DATA or ~/.jaxbatch/data)"
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
    elif isinstance(default, tuple):
        item = type(default[0]) if default else str
        parser.add_argument(flag, type=comma_list(item), default=None, help=f"comma-separated; {shown}")
    else:
        kind = {int: int, float: _finite_float}.get(type(default), str)
        if default is None:  # an optional number: its annotation says which, e.g. "int | None"
            kind = int if str(field.type).startswith("int") else _finite_float if str(field.type).startswith(
                "float") else str
        parser.add_argument(flag, type=kind, default=None, help=shown)


def comma_list(item):
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}")

    return parse


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def run(args) -> int:
    from jaxbatch.experiments import get_experiment, make_config, run_experiment

    module = get_experiment(args.experiment)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Config)}
    config = make_config(args.experiment, args.quick, **overrides)
    out = args.out or f"runs/experiments/{args.experiment}"

    def on_progress(text: str) -> None:
        if not args.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    result, paths = run_experiment(args.experiment, config, out, on_progress)
    print(module.summary(result))
    print(f"wrote {', '.join(p.name for p in paths)} to {out}/")
    return 0
