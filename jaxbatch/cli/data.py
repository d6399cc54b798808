"""`jaxbatch data list | check NAME | download NAME | prepare NAME`: see and get datasets."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from jaxbatch.cli import positive_float


def add_parser(sub) -> None:
    from jaxbatch.data import DATASETS

    p = sub.add_parser("data", help="list, download or prepare datasets",
                       description="See which datasets are available here, and get the others.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    data_dir_help = "data folder (default $JAXBATCH_DATA_DIR or ~/.jaxbatch/data)"
    downloadable = [name for name, spec in DATASETS.items() if spec.downloads]

    listing = actions.add_parser("list", help="each dataset, its sizes and sources, and where it is found here")
    listing.add_argument("--data-dir", help=data_dir_help)
    listing.set_defaults(run=run_list)

    check = actions.add_parser(
        "check", help="load a dataset and print its counts, class balance and mean pixel")
    check.add_argument("name", choices=list(DATASETS))
    check.add_argument("--split", choices=["train", "test"], action="append",
                       help="split to check (repeatable; default both)")
    check.add_argument("--data-dir", help=data_dir_help)
    check.add_argument("--source", choices=["auto", "files", "tfds"], default="auto")
    check.set_defaults(run=run_check)

    download = actions.add_parser(
        "download", help="fetch the official files over HTTPS, checked against pinned SHA-256 (no TensorFlow)")
    download.add_argument("name", choices=downloadable)
    download.add_argument("--data-dir", help=data_dir_help)
    download.add_argument("--mirror", help="base URL serving <name>/<file> instead of the official servers "
                          "(default $JAXBATCH_MIRROR)")
    download.add_argument("--deadline", dest="deadline_s", type=positive_float, metavar="SECONDS",
                          help="the longest one file may take (default: 60 s plus 1 s per 64 KiB of the file)")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(run=run_download)

    prepare = actions.add_parser(
        "prepare", help="download and convert with tensorflow-datasets (needs TensorFlow)")
    prepare.add_argument("name", choices=[name for name, spec in DATASETS.items() if spec.tfds_name])
    prepare.add_argument("--data-dir", help=data_dir_help)
    prepare.set_defaults(run=run_prepare)


def _data_dir(args) -> Path:
    from jaxbatch.data import data_dir_or_default

    return data_dir_or_default(args.data_dir)


def describe(found) -> str:
    """One phrase for a `locate` result."""
    if found is None:
        return "not here"
    kind, where = found
    if kind == "digits":
        return "bundled with jaxbatch"
    if kind == "files":
        return f"files: {where.describe()}"
    return f"tfds: {where}"


def run_list(args) -> int:
    from jaxbatch.data import DATASETS, SPLITS, locate

    data_dir = _data_dir(args)
    print(f"data folder: {data_dir}")
    print(f"{'dataset':<14} {'image':<8} {'train':>7} {'test':>7}  {'sources':<26} here")
    for name, spec in DATASETS.items():
        sources = ["bundled"] if name == "digits" else ["files"]
        sources += ["download"] if spec.downloads else []
        sources += ["tfds"] if spec.tfds_name else []
        here = {split: describe(locate(name, split, data_dir)) for split in SPLITS}
        where = here["train"] if here["train"] == here["test"] else "; ".join(
            f"{split} {text}" for split, text in here.items())
        if where == "not here":
            where = f"not here (jaxbatch data download {name})"
        shape = "x".join(str(d) for d in spec.image_shape)
        print(f"{name:<14} {shape:<8} {spec.sizes['train']:>7,} {spec.sizes['test']:>7,}  "
              f"{', '.join(sources):<26} {where}")
    return 0


def run_check(args) -> int:
    import numpy as np

    from jaxbatch.data import load, locate

    data_dir = _data_dir(args)
    for split in args.split or ["train", "test"]:
        where = describe(locate(args.name, split, data_dir, args.source))
        data = load(args.name, split, data_dir, args.source)
        counts = np.bincount(data.labels, minlength=len(data.class_names))
        print(f"{args.name} {split}: {len(data):,} images {data.image_shape}, "
              f"mean pixel {data.images.mean():.2f}, per class {counts.min():,}..{counts.max():,} "
              f"({where})")
    return 0


def run_download(args) -> int:
    from tqdm import tqdm

    from jaxbatch.data import get_spec
    from jaxbatch.data.download import download

    bars = {}

    def on_progress(name, done, total):
        if args.quiet:
            return
        if name not in bars:
            bars[name] = tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024)
        bars[name].update(done - bars[name].n)

    # SIGTERM ends the download the way Ctrl-C does, so its temporary file and any
    # folder it created empty are removed on the way out (SIG_DFL would leave them).
    previous = _sigterm_interrupts()
    try:
        paths = download(get_spec(args.name), _data_dir(args), args.mirror, on_progress, args.deadline_s)
    finally:
        for bar in bars.values():
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"{args.name}: {len(paths)} files verified in {paths[0].parent}")
    return 0


def _sigterm_interrupts():
    """Make SIGTERM raise KeyboardInterrupt; return the handler it replaced (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return signal.SIG_DFL if previous is None else previous  # None: a handler set outside Python


def run_prepare(args) -> int:
    from jaxbatch.data import get_spec
    from jaxbatch.data.tfds_source import prepare

    folder = prepare(get_spec(args.name), _data_dir(args))
    print(f"{args.name}: prepared with TFDS in {folder}")
    return 0
