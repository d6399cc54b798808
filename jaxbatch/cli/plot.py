"""`jaxbatch plot RUN [RUN ...]`: training curves of run folders in one PNG (jaxbatch/curves.py)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="loss and accuracy against epochs of one or several runs, in a PNG",
                       description="Draw loss and accuracy against epochs (and epsilon and the noise scale "
                       "when logged) of run folders, each named in the legend by the settings that differ "
                       "between them.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (it holds metrics.jsonl and config.json)")
    p.add_argument("--out", metavar="FILE.png",
                   help="the PNG to write (default: RUN/curves.png for one run, curves.png here for several)")
    p.set_defaults(run=run)


def run(args) -> int:
    from jaxbatch.curves import plot_runs, read_run
    from jaxbatch.errors import JaxbatchError

    if args.out is not None and not args.out.strip():  # as train, bench and experiment refuse it
        raise JaxbatchError("--out is empty; name a .png file, e.g. --out curves.png")
    runs = [read_run(folder) for folder in args.runs]  # every folder checked before anything is drawn
    out = Path(args.out) if args.out else Path(args.runs[0]) / "curves.png" if len(runs) == 1 else Path("curves.png")
    if out.suffix.lower() != ".png":
        raise JaxbatchError(f"--out {out}: the plot is a PNG; name a .png file")
    if not out.parent.is_dir():
        raise JaxbatchError(f"--out {out}: the folder {out.parent} does not exist")
    print(f"wrote {plot_runs(runs, out)}")
    return 0
