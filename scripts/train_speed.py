"""Time training epochs after compilation, per recipe and loss mode.

    python scripts/train_speed.py --data-dir ../shared/data

Targets on a 2-core CPU (figures printed, not asserted): one `mlp-fashion`
epoch within 0.7 s, one `cnn-mnist` epoch within 25 s, and `--loss vmap`
within 5% of `--loss batched`. Epoch 1 (which compiles) is excluded; the
figure is the median of the remaining epochs, vmap and batched runs
interleaved so that machine noise hits both alike.

    python scripts/train_speed.py --data-dir ../shared/data --host-devices 1 2

times each recipe with a convolution (cnn-mnist, lenet-mnist, dp-mnist,
dp-mnist-cnn; or --recipes) on 1 and on 2 host devices (JAX_NUM_CPU_DEVICES,
which must be set before JAX starts: one child process per count, the
counts interleaved round by round), the vmap loss only, and prints each
count's median epoch against 1 device's, with the test accuracy each run
ended at (the runs compute the same numbers, to float rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys

import jax

from jaxbatch import data
from jaxbatch.errors import JaxbatchError
from jaxbatch.machine import cpu_summary
from jaxbatch.recipes import get_recipe
from jaxbatch import TrainConfig, train_and_evaluate

TARGET_S = {"mlp-fashion": 0.7, "cnn-mnist": 25.0}
CONV_RECIPES = ["cnn-mnist", "lenet-mnist", "dp-mnist", "dp-mnist-cnn"]


def epoch_times(config: TrainConfig, train_ds, test_ds) -> list[float]:
    history = train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds).history
    return [h["epoch_time_s"] for h in history[1:]]


def recipe_and_data(name: str, data_dir: str | None, dataset: str | None = None):
    """Recipe `name`'s fields (its dataset replaced by `dataset` if given) and its train and test splits."""
    fields = {**get_recipe(name), **({"dataset": dataset} if dataset else {})}
    return fields, data.load(fields["dataset"], "train", data_dir), data.load(fields["dataset"], "test", data_dir)


def one_run(name: str, epochs: int, data_dir: str | None, dataset: str | None = None) -> dict:
    """One run of recipe `name` (on `dataset` if given) in this process, as
    the child of --host-devices does it."""
    fields, train_ds, test_ds = recipe_and_data(name, data_dir, dataset)
    config = dataclasses.replace(TrainConfig(**fields), epochs=1 + epochs)
    result = train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds)
    return {"times": [h["epoch_time_s"] for h in result.history[1:]], "accuracy": result.history[-1]["test_accuracy"],
            "devices": jax.device_count()}


def host_devices(args) -> None:
    """Each recipe on each count of host devices, a child process per run."""
    recipes = args.recipes or CONV_RECIPES
    print(f"CPU: {cpu_summary()}; jax {jax.__version__}; {args.epochs} timed epoch(s) a run after the first, "
          f"{args.rounds} round(s)", flush=True)
    for name in recipes:
        runs = {count: [] for count in args.host_devices}
        for _ in range(args.rounds):
            for count in args.host_devices:
                env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(count)}
                child = [sys.executable, __file__, "--one-run", name, "--epochs", str(args.epochs),
                         *(["--data-dir", args.data_dir] if args.data_dir else []),
                         *(["--dataset", args.dataset] if args.dataset else [])]
                out = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                    sys.exit(f"train_speed.py: {name} on {count} host device(s) failed: {last}")
                runs[count].append(json.loads(out.stdout.strip().splitlines()[-1]))
        one = statistics.median(t for r in runs[args.host_devices[0]] for t in r["times"])
        for count, done in runs.items():
            m = statistics.median(t for r in done for t in r["times"])
            print(f"{name:<14}{done[0]['devices']} host device(s)  epoch {m:7.2f} s  "
                  f"x{m / one:.2f} of {args.host_devices[0]}  test accuracy "
                  f"{', '.join(str(r['accuracy']) for r in done)}  "
                  f"[{', '.join(f'{t:.2f}' for r in done for t in r['times'])}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--recipes", nargs="+", default=None,
                        help=f"default {' '.join(TARGET_S)}; with --host-devices {' '.join(CONV_RECIPES)}")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (after the first)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each loss mode (or each device count), interleaved")
    parser.add_argument("--host-devices", type=int, nargs="+", default=None,
                        help="time each recipe on these counts of host devices (JAX_NUM_CPU_DEVICES), e.g. 1 2")
    parser.add_argument("--dataset", default=None, help="with --host-devices: train the recipes on this dataset "
                        "instead of their own (digits: a quick check that needs no data folder)")
    parser.add_argument("--one-run", default=None, help=argparse.SUPPRESS)  # a child of --host-devices
    args = parser.parse_args()
    try:  # an unknown recipe is one line, before any run or child starts
        for name in args.recipes or []:
            get_recipe(name)
    except JaxbatchError as err:
        sys.exit(f"train_speed.py: {err}")
    if args.one_run:
        print(json.dumps(one_run(args.one_run, args.epochs, args.data_dir, args.dataset)))
        return
    if args.host_devices:
        return host_devices(args)
    args.recipes = args.recipes or list(TARGET_S)

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; CPU: {cpu_summary()}, {jax.local_device_count()} "
          f"device(s); jax {jax.__version__}")
    print(f"{'recipe':<20}{'loss':<9}{'median epoch s':>15}{'target s':>10}{'examples/s':>12}")
    for name in args.recipes:
        fields, train_ds, test_ds = recipe_and_data(name, args.data_dir)
        times = {"vmap": [], "batched": []}
        for _ in range(args.rounds):
            for loss in times:
                config = dataclasses.replace(TrainConfig(**fields), loss=loss, epochs=1 + args.epochs)
                times[loss] += epoch_times(config, train_ds, test_ds)
        medians = {loss: statistics.median(t) for loss, t in times.items()}
        for loss, m in medians.items():
            print(f"{name:<20}{loss:<9}{m:>15.3f}{TARGET_S.get(name, float('nan')):>10.2f}"
                  f"{len(train_ds) / m:>12.0f}")
        print(f"{name:<20}vmap / batched = {medians['vmap'] / medians['batched']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
