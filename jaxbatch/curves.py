"""Training curves of one run or several, from their folders: loss and
accuracy against epochs (train solid, test dashed, and the test figures of
every evaluation as dots when the run evaluated between epochs), and epsilon
and the gradient noise scale when a run logged them, into one PNG.

    runs = [read_run("runs/mlp-digits/1"), read_run("runs/mlp-digits/2")]
    plot_runs(runs, "compare.png")   # legend: loss=vmap, loss=batched

Each run is named by the settings that differ between the runs compared
(`labels`), so two runs that differ only in --loss read "loss=vmap" and
"loss=batched"; runs whose settings are all the same are named by folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from jaxbatch.atomic import write_atomic
from jaxbatch.errors import JaxbatchError
from jaxbatch.figures import new_figure

# Settings that say where or how a run was kept or run, not what it computed.
NOT_DISTINGUISHING = {"out", "resume", "overwrite", "environment", "data_dir", "keep", "checkpoint_every",
                      "devices", "eval_batch_size", "steps_per_chunk", "unroll", "record_steps"}


@dataclasses.dataclass
class Run:
    folder: Path
    config: dict  # config.json as written, {} when the folder has none
    records: list  # metrics.jsonl, one dict per epoch
    evals: list = dataclasses.field(default_factory=list)  # evals.jsonl (--eval-every, --target-accuracy)


def read_run(folder) -> Run:
    """A run folder's config.json and metrics.jsonl. A folder without
    metrics, an empty one, or a line that is not a whole epoch record (a torn
    last line of a killed run) is a JaxbatchError naming the file and line."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not folder.is_dir():
        raise JaxbatchError(f"{folder} is not a folder; name a run folder (it holds metrics.jsonl)")
    if not metrics.is_file():
        raise JaxbatchError(f"{folder} holds no metrics.jsonl: not a run folder, or its first epoch never ended")
    records = []
    for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)
                and isinstance(record.get("test_loss"), (int, float))):
            raise JaxbatchError(f"{metrics}, line {number}: not an epoch record (a torn line from a killed run?)")
        records.append(record)
    if not records:
        raise JaxbatchError(f"{metrics} holds no epoch yet")
    config = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError:
            raise JaxbatchError(f"{folder / 'config.json'} is not JSON") from None
        if not isinstance(config, dict):
            raise JaxbatchError(f"{folder / 'config.json'} does not hold a run's settings")
    return Run(folder, config, records, _evaluations(folder / "evals.jsonl"))


def _evaluations(path: Path) -> list:
    """evals.jsonl's whole records (a torn last line is left out: they are extra points, not the record)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and all(isinstance(record.get(k), (int, float)) for k in ("epochs", "test_accuracy",
                                                                                              "test_loss")):
            records.append(record)
    return records


def labels(runs: list[Run]) -> list[str]:
    """Each run's name in a legend: `key=value` for the settings that differ
    between the runs (all of them, in config order), else the folder."""
    keys = []
    for run in runs:
        keys += [k for k in run.config if k not in keys and k not in NOT_DISTINGUISHING]
    differ = [k for k in keys if len({json.dumps(run.config.get(k)) for run in runs}) > 1]
    names = [", ".join(f"{k}={_show(run.config.get(k))}" for k in differ) if differ else str(run.folder)
             for run in runs]
    if len(set(names)) < len(names):  # same settings twice: the folders tell them apart
        names = [f"{name} ({run.folder})" if differ else name for name, run in zip(names, runs)]
    return names


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _series(run: Run, key: str):
    """(epochs, values) of one key, looked up under "nonprivate" too (a
    DP-SGD run's train figures are only there when asked for)."""
    points = [(r["epoch"], r.get(key, r.get("nonprivate", {}).get(key))) for r in run.records]
    points = [(e, v) for e, v in points if isinstance(v, (int, float))]
    return [e for e, _ in points], [v for _, v in points]


def draw(runs: list[Run]):
    """The figure: loss, accuracy, and epsilon and noise-scale panels when any run has them."""
    has = lambda key: any(_series(run, key)[0] for run in runs)  # noqa: E731
    panels = [("loss", "loss"), ("accuracy", "accuracy")]
    panels += [("epsilon", "epsilon (PLD)")] if has("epsilon") else []
    panels += [("noise_scale", "noise scale B_simple")] if has("noise_scale") else []
    fig, axes = new_figure(ncols=len(panels), width=4.5, height=3.6)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, title) in zip(axes[0], panels):
        for run, name, color in zip(runs, labels(runs), colors):
            if key in ("loss", "accuracy"):
                lines = [(f"train_{key}", "-o", f"{name} train"), (f"test_{key}", "--s", f"{name} test")]
            else:
                lines = [(key, "-o", name)]
            for series, style, label in lines:
                epochs, values = _series(run, series)
                if epochs:  # a private run without its non-private figures has no train line: no legend entry
                    ax.plot(epochs, values, style, color=color, ms=3, label=label)
            if key in ("loss", "accuracy") and run.evals:  # the evaluations between epoch ends, at epochs seen
                ax.plot([e["epochs"] for e in run.evals], [e[f"test_{key}"] for e in run.evals], ".", color=color,
                        ms=2, alpha=0.6, label=f"{name} test, every evaluation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch ticks whole: no 1.2, 1.4
        ax.grid(alpha=0.3)
        if key == "noise_scale":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("train: solid, test: dashed" + ("" if len(runs) > 1 else f" ({runs[0].folder})"), fontsize="medium")
    return fig


def plot_runs(runs: list[Run], path) -> Path:
    """Draw `runs` into the PNG `path`, written whole or not at all."""
    if not runs:
        raise JaxbatchError("name at least one run folder to plot")
    fig = draw(runs)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
