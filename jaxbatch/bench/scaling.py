"""Weak and strong scaling: the same gradient step on K devices (docs/bench.md).

    weak    each device takes the batch size B: K devices, a global batch of K*B
    strong  the global batch B is split: each of K devices takes B/K

Each device runs the one-device step of `methods.make_step` on its own examples
and `lax.pmean` averages the K mean gradients (`losses.data_parallel`, a
shard_map over the first K devices). Not jit with the inputs' shardings, as
training does: XLA's SPMD partitioner (jax 0.10.2, CPU) gets a convolution's
per-example kernel gradients wrong when the batch is split.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxbatch.bench.measure import compile_step, timing_settings, unless_out_of_memory
from jaxbatch.bench.methods import STEPS, make_step
from jaxbatch.devices import BY_EXAMPLE, data_mesh, place, replicated
from jaxbatch.errors import JaxbatchError
from jaxbatch.losses import data_parallel
from jaxbatch.machine import time_calls
from jaxbatch.precision import highest_precision, relative_difference

MODES = ("weak", "strong")
EFFICIENCY = ("efficiency = throughput_K / (K * throughput_1), speedup = throughput_K / throughput_1, "
              "throughput = examples of the global batch per second; weak: B examples per device (global "
              "K*B), so efficiency = t_1 / t_K; strong: the global batch B split over K devices, so "
              "efficiency = speedup / K")
CPU_NOTE = ("On CPU, the host devices (JAX_NUM_CPU_DEVICES) share the same cores, so CPU figures check the "
            "harness, not speed: K devices add no cores, they divide the same ones (a step that leaves cores "
            "idle, as the mlp's single-threaded products do, can still gain).")


def scaling_methods(methods) -> list[str]:
    """The methods that scale: those of STEPS, one jitted step each (not the chunked and loop methods)."""
    return [m for m in methods if m in STEPS]


def device_counts(devices) -> list[int]:
    """The K values measured: those asked for, and 1, the reference of every efficiency."""
    return sorted({1, *devices})


def check_devices(devices, batch_sizes, available: int, platform: str) -> None:
    """Reject device counts below 1, a batch size that strong scaling cannot
    split evenly over one of them, and more devices than the `available` ones."""
    for k in devices:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise JaxbatchError(f"{{setting}} must be whole numbers of 1 or more, got {k!r}", setting="devices")
    multiple = math.lcm(*map(int, devices)) if devices else 1
    for b in batch_sizes:
        for k in devices:
            if b % k:
                raise JaxbatchError(f"batch size {b} does not split evenly over {k} devices (strong scaling "
                                    f"splits each batch over K); pass {{setting}} that are multiples of {multiple}, "
                                    "or fewer --devices", setting="batch_sizes")
    for k in devices:
        if k > available:
            hint = f"; on a CPU, start with JAX_NUM_CPU_DEVICES={k}" if platform == "cpu" else ""
            raise JaxbatchError(f"{{setting}} {k} asks for more devices than the {available} {platform} devices "
                                f"here{hint}", setting="devices")


def measure(method: str, apply_fn, params, batches, k: int, reference, timing: dict) -> dict:
    """Compile and time `method`'s step data-parallel over the first k devices; its gradient
    on the first batch against `reference` (the one-device batched gradient), both under the
    highest precision."""
    mesh = data_mesh(k)
    # As training lays them out: the parameters on every device, each batch split along "data".
    params = place(params, replicated(mesh))
    inputs = [(params, *place(batch, NamedSharding(mesh, BY_EXAMPLE))) for batch in batches]
    step = jax.jit(data_parallel(make_step(method, apply_fn), mesh))
    compiled = compile_step(step, *inputs[0])
    t = time_calls(compiled.executable, inputs, jax.block_until_ready, **timing)
    with highest_precision():
        check = relative_difference(step(*inputs[0]), reference)
    return {"status": "ok", "compile_s": compiled.compile_s, "step_s": t.median_s, "step_s_min": t.min_s,
            "repeats": t.repeats, "max_rel_diff_vs_batched": check,
            "examples_per_s": len(batches[0][1]) / t.median_s}


def model_rows(name: str, apply_fn, params, config, batches_for: Callable, notify: Callable) -> list[dict]:
    """Every scaling row of one model; `batches_for(global_batch)` gives the rotating input
    batches of that size. For each batch size and method: K = 1 (both kinds' reference), then
    weak and strong side by side, so slow drifts of a shared machine hit neighbours alike."""
    timing, ks, rows = timing_settings(config), device_counts(config.devices), []
    for b in config.batch_sizes:
        batches = {g: batches_for(g) for g in sorted({b, *(k * b for k in ks)})}
        with highest_precision():
            references = {g: make_step("batched", apply_fn)(params, *batches[g][0]) for g in batches}
        for method in scaling_methods(config.methods):
            cases = [(mode, 1, b) for mode in MODES]
            cases += [(mode, k, g) for k in ks[1:] for mode, g in (("weak", k * b), ("strong", b))]
            measured = {}
            for mode, k, g in cases:
                if (k, g) not in measured:  # K = 1: one measurement, the same case for both kinds
                    measured[k, g] = unless_out_of_memory(
                        lambda: measure(method, apply_fn, params, batches[g], k, references[g], timing),
                        lambda reason: {"status": "skipped", "reason": reason})
                rows.append({"model": name, "method": method, "mode": mode, "batch_size": b, "devices": k,
                             "per_device_batch": g // k, "global_batch": g, **measured[k, g]})
                notify({"kind": "scaling", **rows[-1]})
    return rows


def with_efficiency(rows: list[dict]) -> list[dict]:
    """The rows with speedup and efficiency, each against the K = 1 row of its (model, method,
    mode, batch size); None where either was skipped."""
    base = {(r["model"], r["method"], r["mode"], r["batch_size"]): r.get("examples_per_s")
            for r in rows if r["devices"] == 1}
    out = []
    for r in rows:
        one = base.get((r["model"], r["method"], r["mode"], r["batch_size"]))
        speedup = r["examples_per_s"] / one if one and r.get("examples_per_s") else None
        out.append({**r, "speedup": speedup, "efficiency": None if speedup is None else speedup / r["devices"]})
    return out


def section(config, rows: list[dict], platform: str) -> dict:
    """The record's `scaling` section."""
    return {"devices": device_counts(config.devices), "device_count": jax.device_count(),
            "methods": scaling_methods(config.methods), "batch_sizes": list(config.batch_sizes),
            "definitions": EFFICIENCY, "note": CPU_NOTE if platform == "cpu" else None,
            "rows": with_efficiency(rows)}
