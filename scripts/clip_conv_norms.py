"""What a clipped step costs for the convolutional models, two ways.

    python scripts/clip_conv_norms.py [--models cnn,lenet5] [--batch-size 256] [--calls 15]

Times, in one process, with the calls of the three programs interleaved so
that a busy machine slows all of them alike (medians printed):

    batched      the plain batch gradient
    ghost        losses.clipped_grad_sum as jaxbatch runs it: every layer's
                 per-example norms from its inputs and output gradients
                 (Conv layers one kernel position at a time) and the clipped
                 sum from the same pass (jaxbatch/ghost.py)
    vmap convs   the same with Conv layers left out of ghost.py: their
                 kernels' per-example gradients from vmap (grouped
                 convolutions), the clipped sum from a second backward pass

The clip norm is 10^6, which no example reaches, so all three compute the
same gradient; the script checks that before timing, under the highest
matmul precision, and times at the backend's default.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch import ghost, losses
from jaxbatch.models import get_model
from jaxbatch.precision import highest_precision, relative_difference


@contextlib.contextmanager
def convolutions_left_to_vmap():
    """ghost.py without its Conv layers, while the program is traced."""
    take = ghost._conv_geometry
    ghost._conv_geometry = lambda module, x: None
    try:
        yield
    finally:
        ghost._conv_geometry = take


def measure(name: str, batch_size: int = 256, calls: int = 15) -> dict:
    """Median seconds of the three programs for model `name` ({"batched", "ghost",
    "vmap convs"}), each way's largest relative difference from the batched
    gradient, and the device; scripts/gpu_report.py calls this too."""
    model = get_model(name)
    shape = (32, 32, 1) if name == "lenet5" else (28, 28, 1)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.random((batch_size, *shape)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 10, batch_size))
    params = model.init(jax.random.key(0), xs[:1])
    clipped = lambda p: losses.clipped_grad_sum(model.apply, p, xs, ys, 1e6)[0]  # noqa: E731
    steps = {"batched": jax.jit(lambda p: jax.tree.map(lambda g: g * batch_size,
                                                       losses.batched_grad(model.apply, p, xs, ys))),
             "ghost": jax.jit(clipped)}
    with convolutions_left_to_vmap():
        steps["vmap convs"] = jax.jit(clipped)
        # Checked in true float32 products: at a GPU's default TF32 the ways differ by ~1e-3, not by
        # rounding. jit caches per precision, so the default-precision programs compile in the warm-up
        # (on a CPU the default is float32 already: the same numbers, compiled once).
        cpu = jax.default_backend() == "cpu"
        with contextlib.nullcontext() if cpu else highest_precision():
            results = {k: jax.block_until_ready(f(params)) for k, f in steps.items()}
        for f in steps.values():
            jax.block_until_ready(f(params))
    diffs = {k: relative_difference(results[k], results["batched"]) for k in ("ghost", "vmap convs")}
    for k, diff in diffs.items():
        assert diff < 1e-4, f"{name} {k} differs from the batched gradient by {diff:.1e}"
    times = {k: [] for k in steps}
    for _ in range(calls):
        for k, f in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(f(params))
            times[k].append(time.perf_counter() - start)
    return {"model": name, "batch_size": batch_size, "calls": calls, "device": jax.devices()[0].device_kind,
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "max_rel_diff_vs_batched": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,lenet5")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, batch {args.batch_size}, median of {args.calls} interleaved calls")
    for name in args.models.split(","):
        medians = measure(name, args.batch_size, args.calls)["median_s"]
        base = medians["batched"]
        for k, v in medians.items():
            print(f"{name:7s} {k:11s} {v * 1e3:8.1f} ms  {v / base:5.2f}x batched")


if __name__ == "__main__":
    main()
