"""How a figure is measured, and on what. FLOPs come from XLA's cost analysis of
the compiled step, so they count what XLA runs, not a formula; memory from its
memory analysis; step times from `jaxbatch.machine.time_calls`, the timing loop
the experiments use too. Nothing assumes a CPU: the device is `jax.devices()[0]`.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxbatch.machine import cpu_flags, cpu_model, time_calls


class Compiled(NamedTuple):
    executable: Any
    compile_s: float
    flops: float | None
    peak_memory_bytes: int | None


def compile_step(fn: Callable, *example_args) -> Compiled:
    """Lower and compile `fn` for these argument shapes, timed. A jitted function
    (or a functools.partial of one, as `methods.make_step` returns) is lowered
    through its own jit, whose compilations its calls share: a case repeating
    earlier shapes records the cache lookup as its compile_s."""
    t0 = time.perf_counter()
    if isinstance(fn, functools.partial) and hasattr(fn.func, "lower"):
        lowered = fn.func.lower(*fn.args, *example_args, **fn.keywords)
    else:
        lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*example_args)
    executable = lowered.compile()
    compile_s = time.perf_counter() - t0
    return Compiled(executable, compile_s, xla_flops(executable), xla_peak_memory(executable))


def xla_flops(executable) -> float | None:
    """FLOPs per call (None if the backend gives none). A loop body (lax.map, scan) counts once, not per trip."""
    try:
        cost = executable.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def xla_peak_memory(executable) -> int | None:
    """Bytes live at once: arguments + outputs + temporaries - aliased (donated) buffers."""
    try:
        mem = executable.memory_analysis()
    except Exception:
        return None
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def timing_settings(config) -> dict:
    """time_calls' keywords from a BenchConfig."""
    return dict(warmup=config.warmup, min_repeats=config.min_repeats, max_repeats=config.max_repeats,
                min_time_s=config.min_time_s)


def matmul_peak(matmul: Callable, pairs: list, sync: Callable, **timing) -> dict:
    """FLOP/s of n x n x n float32 products (2 n^3 FLOPs), from the fastest call and from the median."""
    n = pairs[0][0].shape[0]
    t = time_calls(matmul, pairs, sync, **timing)
    return {"size": n, "median_s": t.median_s, "min_s": t.min_s,
            "flops_per_s": 2 * n**3 / t.min_s, "flops_per_s_median": 2 * n**3 / t.median_s}


def jax_matmul_peak(n: int, dtype=None, precision=None, **timing) -> dict:
    """The matmul peak in JAX: by default float32 at the default precision, as the models' products
    run; `dtype` (e.g. jnp.bfloat16) and `precision` (jnp.matmul's: "highest", a
    jax.lax.DotAlgorithmPreset such as TF32_TF32_F32) measure the device's other rates."""
    keys = jax.random.split(jax.random.key(0), 6)
    pairs = [(jax.random.normal(keys[2 * i], (n, n), dtype), jax.random.normal(keys[2 * i + 1], (n, n), dtype))
             for i in range(3)]
    matmul = jnp.matmul if precision is None else functools.partial(jnp.matmul, precision=precision)
    return matmul_peak(jax.jit(matmul), pairs, jax.block_until_ready, **timing)


def unless_out_of_memory(run: Callable[[], dict], skipped: Callable[[str], dict]) -> dict:
    """run(), or skipped(reason) when the device runs out of memory; any other error is a bug and propagates."""
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


def describe_device() -> dict:
    """The JAX devices, plus the host CPU (on a CPU backend it is the device; on a GPU it still feeds it)."""
    device = jax.devices()[0]
    return {"platform": device.platform, "name": cpu_model() if device.platform == "cpu" else device.device_kind,
            "device_kind": device.device_kind, "device_count": jax.device_count(), "host_cpu": cpu_model(),
            "host_cores": os.cpu_count(), "cpu_flags": cpu_flags(), "memory_bytes": device_memory_bytes(device)}


def device_memory_bytes(device) -> int | None:
    """The accelerator's allocator limit, or the host's RAM for a CPU device; None when unknown."""
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.platform == "cpu" else None
    except (ValueError, OSError, AttributeError):
        return None


def software_versions(with_torch: bool = False) -> dict:
    """Versions of what timed the run. PyTorch's only when it was timed too: importing it
    takes seconds, and its version says nothing about a JAX-only run."""
    versions = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
        versions[name] = importlib.import_module(name).__version__
    versions.update(xla_flags=os.environ.get("XLA_FLAGS", ""), torch=None)
    if with_torch:
        import torch

        versions.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return versions


def device_slug(device: dict) -> str:
    """A file-name stem naming the device: 'cpu-amd-epyc-2core', 'gpu-nvidia-h100-80gb-hbm3'."""
    name = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor", " ", device["name"].lower())
    stem = "-".join(re.findall(r"[a-z0-9]+", name)[:4]) or "unknown"  # vendor and model, not speed grades
    if device["platform"] == "cpu":
        return f"cpu-{stem}-{device['host_cores']}core"
    return f"{device['platform']}-{stem}"
