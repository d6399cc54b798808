"""How one figure is measured: step times, compile time, FLOPs, memory, peak.

Step time: `jaxbatch.machine.time_calls`, the one timing loop the experiments
use too: after `warmup` calls, the step is called repeatedly, each call
waited for (`jax.block_until_ready`, or torch's synchronize on a GPU), with
the input batch rotated among a few different ones so no cache sees the same
data twice in a row; the figure is the median (the minimum is kept too: on a
shared machine it is the better estimate of the work itself). Repeats go on
until both `min_repeats` and `min_time_s` are reached, or `max_repeats`.

FLOPs come from XLA's cost analysis of the compiled step, so they count what
XLA runs (matrix products and elementwise work alike), not a formula; memory
from the compiled executable's memory analysis (arguments + outputs +
temporaries - donated aliases). Fractions of peak are against a dense float32
matrix product timed in the same run on the same device, median against
median (`flops_per_s` is the best call, `flops_per_s_median` the median).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

from jaxbatch.machine import time_calls


def block(tree):
    import jax

    return jax.block_until_ready(tree)


class Compiled(NamedTuple):
    executable: Any
    compile_s: float
    flops: float | None
    peak_memory_bytes: int | None


def compile_step(fn: Callable, *example_args) -> Compiled:
    """jit, lower and compile `fn` for these argument shapes; time it and read
    XLA's cost and memory analyses.

    A function that is jitted already (or a functools.partial of one, as
    `methods.make_step` returns) is lowered through its own jit, whose
    compilations its calls share: the chunked and loop methods then compile
    each piece once, not once here and again when called, and a chunk shape
    shared by two batch sizes is compiled once (the second compile_s is the
    cache lookup)."""
    t0 = time.perf_counter()
    executable = _lowered(fn, example_args).compile()
    compile_s = time.perf_counter() - t0
    return Compiled(executable, compile_s, xla_flops(executable), xla_peak_memory(executable))


def _lowered(fn: Callable, args):
    import jax

    if isinstance(fn, functools.partial) and hasattr(fn.func, "lower"):
        return fn.func.lower(*fn.args, *args, **fn.keywords)
    return (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)


def xla_flops(executable) -> float | None:
    """FLOPs per call from XLA's cost analysis (None if the backend gives none).
    A loop body (lax.map, scan) is counted once, not once per trip."""
    try:
        cost = executable.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def xla_peak_memory(executable) -> int | None:
    """Bytes live at once while the executable runs: arguments + outputs +
    temporaries - aliased (donated) buffers."""
    try:
        mem = executable.memory_analysis()
    except Exception:
        mem = None
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def matmul_size(platform: str) -> int:
    """Big enough to reach a device's dense-matmul peak, small enough to be quick."""
    return 2048 if platform == "cpu" else 8192


def jax_matmul_peak(n: int, **timing) -> dict:
    """FLOP/s of an n x n x n float32 matrix product in JAX (2 n^3 FLOPs),
    at JAX's default precision, as the models' products run."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 6)
    pairs = [(jax.random.normal(keys[2 * i], (n, n)), jax.random.normal(keys[2 * i + 1], (n, n))) for i in range(3)]
    matmul = jax.jit(jnp.matmul)
    t = time_calls(matmul, pairs, block, **timing)
    return {"size": n, "median_s": t.median_s, "min_s": t.min_s,
            "flops_per_s": 2 * n**3 / t.min_s, "flops_per_s_median": 2 * n**3 / t.median_s}


def unless_out_of_memory(run: Callable[[], dict], skipped: Callable[[str], dict]) -> dict:
    """run(), or skipped(reason) when the device runs out of memory on the
    way; any other error is a bug and propagates."""
    try:
        return run()
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return skipped(f"out of memory: {first_line}")


def is_out_of_memory(err: BaseException) -> bool:
    """XLA's and PyTorch's ways of saying the device ran out of memory."""
    text = f"{type(err).__name__}: {err}".lower()
    return isinstance(err, MemoryError) or any(
        s in text for s in ("resource_exhausted", "out of memory", "outofmemory", "failed to allocate"))
