"""`jaxbatch experiment NAME`: run one of the texts' demonstrations, print its
table, and write result.json and PNG plots to --out."""

from __future__ import annotations

import sys

from jaxbatch.cli import OneLineParser


def add_parser(sub) -> None:
    from jaxbatch.experiments import EXPERIMENTS, get_experiment
    from jaxbatch.experiments.report import name_texts
    from jaxbatch.settings import add_flags

    p = sub.add_parser(
        "experiment", help="run a demonstration (equality, variance, input-scale, lr-scaling, activations, clipping, "
        "critical-batch)",
        description="Run one of the demonstrations, print a short table and write result.json and PNG "
        "plots to --out. Defaults are the full runs on the real datasets; --quick is a small offline "
        "run on the bundled digits.")
    names = p.add_subparsers(dest="experiment", metavar="NAME", parser_class=OneLineParser)
    names.required = True
    for name in EXPERIMENTS:
        module = get_experiment(name)
        line = name_texts(module.__doc__.splitlines()[0])  # "text A (one example at a time?): ..."
        e = names.add_parser(name, help=line, description=line)
        e.add_argument("--quick", action="store_true", help="a small offline run on digits (seconds)")
        e.add_argument("--out", help=f"folder for result.json and the plots (default runs/experiments/{name})")
        e.add_argument("--quiet", action="store_true", help="no progress lines")
        # Every setting's flag, help and valid range, from its declaration in module.Config.
        add_flags(e, module.Config, presets={"--quick": module.QUICK})
        e.set_defaults(run=run)


def run(args) -> int:
    from jaxbatch.experiments import get_experiment, make_config, run_experiment
    from jaxbatch.rundir import check_folder
    from jaxbatch.settings import given

    module = get_experiment(args.experiment)
    config = make_config(args.experiment, args.quick, **given(args, module.Config))
    out = f"runs/experiments/{args.experiment}" if args.out is None else args.out  # --out '' is refused below
    check_folder(out)  # before the experiment's work, not after it

    def on_progress(text: str) -> None:
        if not args.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    result, paths = run_experiment(args.experiment, config, out, on_progress)
    # A quick run's summary shows its figures but does not judge them against the full run's targets.
    print(module.summary({**result, "quick": bool(args.quick)}))
    print(f"wrote {', '.join(p.name for p in paths)} to {out}/")
    return 0
