"""What DP-SGD costs: a private epoch against a plain one, and the memory of
logical batches split into physical ones.

    python scripts/dp_cost.py --data-dir ../shared/data

1. Epoch time, per model at the same batch: plain training, DP-SGD with
   Poisson sampling (the default), DP-SGD with shuffled batches, and for
   models with convolutions the vmapped per-example gradients (--dp-chunk B,
   every g_i formed) beside the ghost norms. Epoch 1 (which compiles) is
   excluded (its median is printed apart: compiling, and for Poisson batches
   once per padded size a chunk takes); each figure is the median of the
   later epochs, the runs interleaved so that machine noise hits them alike.
   Then the noise draws alone, per epoch: a floor for the private step. Targets (printed, not
   asserted): cnn DP / plain <= 1.5, mlp DP / plain <= 1.2.
2. Peak memory of one DP-SGD gradient at a logical batch of 4096 (its
   Poisson slots), whole and in physical batches, from XLA's memory
   analysis of the compiled gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch import TrainConfig, data, get_model, init_key, init_params, privacy, train_and_evaluate
from jaxbatch.bench.measure import compile_step
from jaxbatch.gradients import ClippedGrad
from jaxbatch.machine import cpu_model

TARGETS = {"cnn": 1.5, "mlp": 1.2}


def epoch_times(config: TrainConfig, train_ds, test_ds) -> list[float]:
    """Every epoch's time; the first includes compiling."""
    return [h["epoch_time_s"] for h in train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds).history]


def noise_draw_ms(model_name: str, image_shape: tuple, n: int = 50) -> float:
    """One step's DP noise alone (a normal draw per parameter), in ms: the
    floor of a private step's extra cost, whatever the clipping costs."""
    params = init_params(get_model(model_name), init_key(0), image_shape)
    draw = jax.jit(lambda step: privacy.standard_normal(params, privacy.step_key(0, step)))
    jax.block_until_ready(draw(0))
    times = []
    for step in range(1, n + 1):
        start = time.perf_counter()
        jax.block_until_ready(draw(step))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ways(model: str, batch_size: int) -> dict:
    private = dict(dp_clip=1.0, dp_noise=1.0)
    out = {"plain": {}, "dp poisson": private, "dp shuffle": {**private, "dp_sampling": "shuffle"}}
    if model != "mlp":  # the cnn's ghost norms against every g_i formed
        out["dp poisson, vmapped g_i"] = {**private, "dp_chunk": batch_size * 2}
    return out


def peak_memory(model_name: str, logical: int, physical: int | None, image_shape: tuple, n: int) -> int | None:
    model = get_model(model_name)
    params = init_params(model, init_key(0), image_shape)
    slots = privacy.batch_slots(logical, n, physical or 8)
    x = jnp.zeros((slots, *image_shape), jnp.float32)
    y, w = jnp.zeros(slots, jnp.int32), jnp.ones(slots, jnp.float32)
    numbers = {"dp": {"clip": jnp.float32(1.0), "batch": jnp.float32(logical)}}
    grad = ClippedGrad(model.apply, expected=True, physical=physical)
    return compile_step(lambda p, x, y, w: grad(p, x, y, w, 0, numbers)[0], params, x, y, w).peak_memory_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (after the first)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way, interleaved")
    parser.add_argument("--logical", type=int, default=4096, help="the logical batch whose memory is measured")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    train_ds, test_ds = (data.load(args.dataset, split, args.data_dir) for split in ("train", "test"))
    for model in args.models:
        times = {name: [] for name in ways(model, args.batch_size)}
        first = {name: [] for name in times}
        for _ in range(args.rounds):
            for name, kw in ways(model, args.batch_size).items():
                config = TrainConfig(model=model, dataset=args.dataset, batch_size=args.batch_size, lr=0.05,
                                     epochs=args.epochs + 1, **kw)
                compiling, *later = epoch_times(config, train_ds, test_ds)
                first[name].append(compiling)
                times[name] += later
        plain = statistics.median(times["plain"])
        for name, t in times.items():
            ratio = statistics.median(t) / plain
            target = f" (target <= {TARGETS[model]})" if name == "dp poisson" and model in TARGETS else ""
            print(f"{model} B={args.batch_size} {name:26s} epoch {statistics.median(t):7.2f} s  "
                  f"x{ratio:.2f} plain{target}  [{', '.join(f'{s:.2f}' for s in t)}]; "
                  f"first epoch (compiling) {statistics.median(first[name]):.1f} s", flush=True)
        steps = -(-len(train_ds) // args.batch_size)
        noise = noise_draw_ms(model, train_ds.image_shape) * steps / 1e3
        print(f"{model} B={args.batch_size} the noise draws alone: {noise:.2f} s per epoch "
              f"(x{noise / plain:.2f} of a plain epoch)", flush=True)
    for model in args.models:
        for physical in (None, args.logical // 4, args.logical // 16):
            mem = peak_memory(model, args.logical, physical, train_ds.image_shape, len(train_ds))
            label = "whole" if physical is None else f"physical {physical}"
            print(f"{model} logical batch {args.logical}, {label:14s} peak memory "
                  f"{'n/a' if mem is None else f'{mem / 2**20:8.1f} MiB'}", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
