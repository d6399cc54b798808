"""`jaxbatch info`: what this installation will use, on one screen: versions,
backend and devices, the float32 matrix-product precision, the optional
extras, and the data folder with the datasets found in it.

Fast on purpose (the first command to run on a new machine): versions come
from package metadata (torch and TensorFlow are not imported), and the data
files are checked by name and size against the pinned official files, not
hashed, unless --sha256 is given; `jaxbatch data check NAME` loads a dataset
and checks its contents.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version

# extra -> (what it is for, the distributions it installs that matter)
EXTRAS = {
    # a base dependency, listed because jaxbatch run uninstalled (PYTHONPATH=.) may lack it
    "dp": ("DP-SGD epsilon accounting (--dp-noise, --dp-epsilon)", ["dp-accounting"]),
    "torch": ("PyTorch twins in jaxbatch bench --torch", ["torch"]),
    "tfds": ("preparing TFDS datasets (jaxbatch data prepare)", ["tensorflow"]),
    # a base dependency, listed because a run goes on without it (and writes no events)
    "tensorboard": ("TensorBoard event files in every run folder", ["tensorboardX"]),
    "notebook": ("opening notebooks/ in Jupyter", ["notebook"]),
}
CORE = ["jaxbatch", "jax", "jaxlib", "flax", "optax", "tensorflow-datasets"]


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, precision, extras and data: what this install will use",
                       description="Print the versions of jaxbatch and its main dependencies, the JAX backend "
                       "and devices, the default float32 matrix-product precision there, which optional "
                       "extras are installed, and the data folder with the datasets found in it.")
    p.add_argument("--data-dir", help="data folder (default $JAXBATCH_DATA_DIR or ~/.jaxbatch/data)")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object")
    p.add_argument("--sha256", action="store_true",
                   help="also hash the official files found (seconds for CIFAR-10), not only their sizes")
    p.set_defaults(run=run)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def dataset_state(name: str, data_dir, sha256: bool) -> dict:
    """Where a dataset is found and what was checked of it."""
    from jaxbatch.cli.data import describe
    from jaxbatch.data import SPLITS, get_spec, locate

    spec = get_spec(name)
    where = {split: describe(locate(name, split, data_dir)) for split in SPLITS}
    state = {"train": where["train"], "test": where["test"], "present": all(w != "not here" for w in where.values())}
    if name == "digits":
        state["checked"] = "bundled with jaxbatch"
        return state
    folder = data_dir / name
    official = [(folder / r.name, r) for r in spec.downloads]
    found = [(path, r) for path, r in official if path.is_file()]
    if not state["present"]:
        state["checked"] = "not here"
    elif official and len(found) == len(official) and all(p.stat().st_size == r.size for p, r in found):
        if sha256:
            from jaxbatch.data.download import sha256_of

            bad = [p.name for p, r in found if sha256_of(p) != r.sha256]
            state["checked"] = f"SHA-256 differs: {', '.join(bad)}" if bad else "the official files: SHA-256 match"
        else:
            state["checked"] = "the official files by name and size (--sha256 hashes them)"
    else:
        state["checked"] = "a copy, not the official files: checked as it loads"
    return state


def collect(data_dir=None, sha256: bool = False) -> dict:
    import jax

    from jaxbatch.data import DATASETS, DATA_DIR_VARIABLE, data_dir_or_default
    from jaxbatch.precision import matmul_precision

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    folder = data_dir_or_default(data_dir)
    origin = "--data-dir" if data_dir is not None else f"${DATA_DIR_VARIABLE}" \
        if os.environ.get(DATA_DIR_VARIABLE) else "default"
    extras = {}
    for extra, (purpose, packages) in EXTRAS.items():
        versions = {p: package_version(p) for p in packages}
        extras[extra] = {"installed": all(versions.values()), "versions": versions, "for": purpose}
    return {
        "versions": {name: package_version(name) for name in CORE},
        "python": ".".join(map(str, sys.version_info[:3])),
        "backend": jax.default_backend(),
        "devices": {"count": len(devices), "local": jax.local_device_count(), "kinds": kinds,
                    "processes": jax.process_count()},
        "precision": matmul_precision(),
        "extras": extras,
        "data": {"folder": str(folder), "from": origin, "exists": folder.is_dir(),
                 "datasets": {name: dataset_state(name, folder, sha256) for name in DATASETS}},
    }


def render(info: dict) -> str:
    v = info["versions"]
    lines = ["jaxbatch " + (v["jaxbatch"] or "(not installed)") + f"; Python {info['python']}; "
             + ", ".join(f"{k} {v[k] or 'missing'}" for k in CORE[1:])]
    d = info["devices"]
    hosts = f" in {d['processes']} processes" if d["processes"] > 1 else ""
    lines.append(f"backend {info['backend']}: {d['count']} x {', '.join(d['kinds'])}{hosts}")
    p = info["precision"]
    lines.append(f"float32 matmul precision: {p['matmul_precision']} = {p['float32_matmul_means']}")
    lines.append("extras:")
    for extra, e in info["extras"].items():
        got = ", ".join(f"{k} {ver}" for k, ver in e["versions"].items() if ver)
        if e["installed"]:
            lines.append(f"  {extra:<12} {got:<26} {e['for']}")
        else:
            fix = "pip install tensorboardX" if extra == "tensorboard" else f"pip install -e '.[{extra}]'"
            lines.append(f"  {extra:<12} {'not installed':<26} {e['for']}: {fix}")
    data = info["data"]
    missing = "" if data["exists"] else " (does not exist)"
    lines.append(f"data folder: {data['folder']} ({data['from']}){missing}")
    for name, s in data["datasets"].items():
        where = s["train"] if s["train"] == s["test"] else f"train {s['train']}; test {s['test']}"
        lines.append(f"  {name:<14} {where}" + ("" if s["checked"] in (where, "not here", "bundled with "
                                                                        "jaxbatch") else f"; {s['checked']}"))
    return "\n".join(lines)


def run(args) -> int:
    info = collect(args.data_dir, args.sha256)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
