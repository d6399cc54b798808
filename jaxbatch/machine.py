"""What a measurement ran on, and how long a call took.

Both the experiments and the benchmark report times, and both name the CPU
beside them, so the one timing loop and the one /proc/cpuinfo reader live
here, below both.

A time is the median of repeated calls, each waited for (`sync`: JAX
dispatches asynchronously, so without `jax.block_until_ready` a call returns
before the device has finished), after warm-up calls that compile and fill
caches. The minimum is kept too: on a shared machine it is the better
estimate of the work itself.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple


class Timing(NamedTuple):
    median_s: float
    min_s: float
    repeats: int


def time_calls(call: Callable, inputs: list[tuple], sync: Callable[[Any], Any], *, warmup: int = 2,
               min_repeats: int = 5, max_repeats: int = 100, min_time_s: float = 1.0) -> Timing:
    """Median and minimum seconds of `sync(call(*args))`, args rotating through
    `inputs` (so no cache sees the same batch twice in a row), after `warmup`
    untimed calls; repeats go on until both `min_repeats` calls and
    `min_time_s` seconds are reached, or `max_repeats` calls."""
    for i in range(warmup):
        sync(call(*inputs[i % len(inputs)]))
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < min_time_s):
        args = inputs[(len(times) + warmup) % len(inputs)]
        t0 = time.perf_counter()
        sync(call(*args))
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), len(times))


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The host CPU's marketing name, e.g. 'AMD EPYC 9B45'."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The vector extensions that bound a CPU's matmul speed."""
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]


def cpu_summary() -> str:
    """The CPU, its vector extensions (they bound XLA:CPU's speed: the same
    model name can hide hosts with and without AVX-512) and its cores, for a
    script's first line."""
    return f"{cpu_model()} ({', '.join(cpu_flags()) or 'no AVX'}), {os.cpu_count()} cores"
