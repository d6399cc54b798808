"""The gradient noise scale during training, and what measuring it costs.

    python scripts/noise_scale.py --data-dir ../shared/data [--epochs 5] [--out results/noise_scale]
    python scripts/noise_scale.py --quick            # digits, seconds, no download
    python scripts/noise_scale.py --replot --out results/noise_scale   # redraw the PNG from result.json

Trains the mlp with `log_noise_scale` (McCandlish et al. 2018's B_simple from
per-example gradient norms on every k-th training step; jaxbatch/train.py,
`noise_scale_gradient`) on MNIST and Fashion-MNIST with the settings of the
`variance` experiment's training (batch 128, SGD lr 0.02, momentum 0.9), and
puts its per-epoch B_simple beside that experiment's offline figures (at
initialisation and after one epoch, results/variance/result.json).

It also times the same runs without the noise scale, alternating plain and
logged runs, and prints the ratio of median epoch times (epochs after the
first, which compiles). Target: at most 1.3x. Writes result.json and
noise_scale.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import jax

from jaxbatch import data
from jaxbatch.atomic import write_atomic
from jaxbatch.figures import new_figure
from jaxbatch.machine import cpu_model
from jaxbatch import TrainConfig, train_and_evaluate

# The variance experiment's training settings (jaxbatch/experiments/variance.py defaults).
SETTINGS = dict(model="mlp", batch_size=128, lr=0.02, momentum=0.9)
TARGET = 1.3
VARIANCE_RESULT = Path(__file__).resolve().parents[1] / "results" / "variance" / "result.json"


def run(dataset: str, data_dir, epochs: int, every: int, repeats: int) -> dict:
    train_ds, test_ds = (data.load(dataset, split, data_dir) for split in ("train", "test"))
    config = dict(SETTINGS, dataset=dataset, data_dir=data_dir, epochs=epochs)
    times = {"plain": [], "logged": []}
    logged = None
    for _ in range(repeats):  # alternate, so drifts in machine load hit both alike
        for kind in ("plain", "logged"):
            extra = dict(log_noise_scale=True, noise_scale_every=every) if kind == "logged" else {}
            result = train_and_evaluate(TrainConfig(**config, **extra), train_ds=train_ds, test_ds=test_ds)
            times[kind] += [h["epoch_time_s"] for h in result.history[1:]]
            logged = result.history if kind == "logged" else logged
    ratio = statistics.median(times["logged"]) / statistics.median(times["plain"])
    return {"history": [{k: h[k] for k in ("epoch", "noise_scale", "noise_scale_trace", "noise_scale_g2",
                                             "noise_scale_steps", "test_accuracy")} for h in logged],
            "epoch_s_median": {k: statistics.median(v) for k, v in times.items()},
            "cost_ratio": ratio}


def offline(dataset: str):
    """The variance experiment's B_noise at initialisation and after one epoch, if it was run."""
    if not VARIANCE_RESULT.exists():
        return None
    found = json.loads(VARIANCE_RESULT.read_text())["datasets"].get(dataset)
    return None if found is None else {k: found[k]["b_noise"] for k in ("init", "after_training")}


def plot(result: dict, path: Path | None = None):
    """The figure of `result`, written to `path` when given; returns the Figure."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    for i, (name, r) in enumerate(result["datasets"].items()):
        epochs = [h["epoch"] for h in r["history"]]
        ax.plot(epochs, [h["noise_scale"] for h in r["history"]], "-o", color=f"C{i}",
                label=f"{name}: during training (mean over epoch)")
        if r["offline"]:
            ax.plot([0, 1], [r["offline"]["init"], r["offline"]["after_training"]], "s--", color=f"C{i}",
                    alpha=0.6, label=f"{name}: variance experiment (all examples, at 0 and 1 epoch)")
    s = result["settings"]
    ax.set(xlabel="epoch", ylabel="B_simple = tr(S) / |G|^2", yscale="log")
    # Two short lines: one long line ran past the figure's right edge.
    ax.set_title(f"Gradient noise scale of the {s['model']}\n(batch {s['batch_size']}, SGD lr {s['lr']:g}, "
                 f"momentum {s['momentum']:g})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # Below the axes: inside, it covered the fashion_mnist curve's early points.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=7)
    if path is not None:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("JAXBATCH_DATA_DIR"))
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--every", type=int, default=4, help="measure on every k-th step")
    parser.add_argument("--repeats", type=int, default=2, help="plain/logged run pairs timed")
    parser.add_argument("--quick", action="store_true", help="digits only, 3 epochs, 1 repeat")
    parser.add_argument("--out", default="runs/noise_scale")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw --out's noise_scale.png from its result.json (no training)")
    args = parser.parse_args()
    if args.replot:
        out = Path(args.out)
        plot(json.loads((out / "result.json").read_text()), out / "noise_scale.png")
        print(f"wrote {out}/noise_scale.png")
        return
    if args.quick:
        args.datasets, args.epochs, args.repeats = ["digits"], 3, 1
    result = {"settings": {**SETTINGS, "epochs": args.epochs, "every": args.every, "repeats": args.repeats},
              "machine": f"{cpu_model()}, {os.cpu_count()} cores, JAX {jax.__version__} on {jax.default_backend()}",
              "datasets": {}}
    print(f"mlp, batch 128, noise scale on every {args.every}th step; {result['machine']}")
    print(f"{'dataset':<15}{'epoch':>6}{'B_simple':>10}{'tr(S)':>10}{'|G|^2':>10}{'test acc':>10}")
    for name in args.datasets:
        r = run(name, args.data_dir, args.epochs, args.every, args.repeats)
        r["offline"] = offline(name)
        result["datasets"][name] = r
        for h in r["history"]:
            print(f"{name:<15}{h['epoch']:>6}{h['noise_scale']:>10.1f}{h['noise_scale_trace']:>10.3g}"
                  f"{h['noise_scale_g2']:>10.3g}{h['test_accuracy']:>10.4f}")
        if r["offline"]:
            print(f"{'':<15}variance experiment: B_noise {r['offline']['init']:.0f} at initialisation, "
                  f"{r['offline']['after_training']:.0f} after one epoch")
        s = r["epoch_s_median"]
        print(f"{'':<15}epoch {s['plain'] * 1e3:.0f} ms plain, {s['logged'] * 1e3:.0f} ms with the noise scale: "
              f"{r['cost_ratio']:.2f}x (target at most {TARGET}x): {'met' if r['cost_ratio'] <= TARGET else 'MISSED'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "result.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    plot(result, out / "noise_scale.png")
    print(f"wrote {out}/result.json and noise_scale.png")


if __name__ == "__main__":
    main()
