"""Time training epochs after compilation, per recipe and loss mode.

    python scripts/train_speed.py --data-dir ../shared/data

Targets on a 2-core CPU (figures printed, not asserted): one `mlp-fashion`
epoch within 0.7 s, one `cnn-mnist` epoch within 25 s, and `--loss vmap`
within 5% of `--loss batched`. Epoch 1 (which compiles) is excluded; the
figure is the median of the remaining epochs, vmap and batched runs
interleaved so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax

from jaxbatch import data
from jaxbatch.machine import cpu_model
from jaxbatch.recipes import get_recipe
from jaxbatch import TrainConfig, train_and_evaluate

TARGET_S = {"mlp-fashion": 0.7, "cnn-mnist": 25.0}


def epoch_times(config: TrainConfig, train_ds, test_ds) -> list[float]:
    history = train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds).history
    return [h["epoch_time_s"] for h in history[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--recipes", nargs="+", default=list(TARGET_S))
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (after the first)")
    parser.add_argument("--rounds", type=int, default=2, help="vmap/batched runs, interleaved")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; CPU: {cpu_model()}, {jax.local_device_count()} "
          f"device(s); jax {jax.__version__}")
    print(f"{'recipe':<20}{'loss':<9}{'median epoch s':>15}{'target s':>10}{'examples/s':>12}")
    for name in args.recipes:
        fields = get_recipe(name)
        train_ds = data.load(fields["dataset"], "train", args.data_dir)
        test_ds = data.load(fields["dataset"], "test", args.data_dir)
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
