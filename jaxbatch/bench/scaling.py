"""Weak and strong scaling: the same gradient step on K devices.

For each batch size B of the benchmark, model and jit-able method:

    weak    the per-device batch is fixed at B: K devices take a global batch of K*B
    strong  the global batch is fixed at B and split: each of K devices takes B/K

On K devices, each device runs the one-device step of
`jaxbatch.bench.methods`, unchanged, on its own B/K examples (weak: B), and
`lax.pmean` averages the K mean gradients: text D's data parallelism, built
as `losses.data_parallel_grad` builds it, a `shard_map` over a one-axis
"data" mesh of the first K devices (`train.data_mesh`), the parameters
replicated and the batch split along "data". So the per-device program is
the one-device step at the per-device batch, plus one all-reduce.

Not jit with the inputs' shardings, as training does: there XLA partitions
the whole step itself, and its SPMD partitioner (jax 0.10.2, CPU) gets the
per-example kernel gradients of a convolution wrong when the batch is split
(the cnn's per_example gradient on 2 devices was 0.8 relative away from the
batched one; the mlp's, and every batched gradient, were right). shard_map
leaves nothing to partition.

Throughput is examples of the global batch per second, and for both kinds

    speedup_K    = throughput_K / throughput_1
    efficiency_K = throughput_K / (K * throughput_1) = speedup_K / K

where throughput_1 is the same step on one device with batch B (one
measurement, the K = 1 row of both kinds). Weak: throughput_K = K*B / t_K, so
efficiency = t_1 / t_K, 1 when K devices do K times the work in the same
time. Strong: throughput_K = B / t_K, so efficiency = t_1 / (K t_K), 1 when K
devices finish the same batch K times faster.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxbatch.bench.measure import block, compile_step, unless_out_of_memory
from jaxbatch.losses import shard_map
from jaxbatch.bench.methods import STEPS, make_step
from jaxbatch.errors import JaxbatchError
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
    """The methods that scale: those XLA compiles whole (the chunked and loop
    methods are driven from Python, one device at a time)."""
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


def data_parallel(step, mesh):
    """`step(params, xs, ys) -> mean gradient` made data-parallel over the
    "data" axis of `mesh`: each device runs it on its own share of the batch,
    then the K means are averaged (`lax.pmean`, an all-reduce). With equal
    shares that is the mean gradient of the whole batch."""
    spec = PartitionSpec
    k = mesh.size

    def per_device(copies, xs, ys):
        return jax.lax.pmean(step(jax.tree.map(lambda a: a[0], copies), xs, ys), "data")

    sharded = shard_map(per_device, mesh=mesh, in_specs=(spec("data"),) * 3, out_specs=spec())
    # One copy of the parameters per device, as losses.data_parallel_grad passes them: replicated
    # ones would make autodiff inside shard_map sum the K gradients before pmean could average them.
    return lambda params, xs, ys: sharded(jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), params), xs, ys)


def on_mesh(mesh, params, batches):
    """The step's inputs laid out for data parallelism, as training lays them
    out: the parameters replicated on every device, each batch split along "data"."""
    from jaxbatch.train import replicated

    params = jax.device_put(params, replicated(mesh))
    split = NamedSharding(mesh, PartitionSpec("data"))
    return [(params, *jax.device_put(batch, split)) for batch in batches]


def measure(method: str, apply_fn, params, batches, k: int, reference, timing: dict) -> dict:
    """Compile and time `method`'s step data-parallel over the first k
    devices; its gradient on the first batch against `reference` (the
    one-device batched gradient), both under the highest precision."""
    from jaxbatch.train import data_mesh  # lazily, as run_epoch: training's imports are not the benchmark's

    mesh = data_mesh(k)
    inputs = on_mesh(mesh, params, batches)
    step = jax.jit(data_parallel(make_step(method, apply_fn), mesh))
    compiled = compile_step(step, *inputs[0])
    t = time_calls(compiled.executable, inputs, block, **timing)
    with highest_precision():
        check = relative_difference(step(*inputs[0]), reference)
    return {"status": "ok", "compile_s": compiled.compile_s, "step_s": t.median_s, "step_s_min": t.min_s,
            "repeats": t.repeats, "max_rel_diff_vs_batched": check}


def model_rows(name: str, apply_fn, params, config, batches_for: Callable, notify: Callable) -> list[dict]:
    """Every scaling row of one model. `batches_for(global_batch)` gives the
    rotating input batches of that size. Cases run batch size by batch size
    and method by method, K = 1 (measured once, both kinds' reference) then
    weak and strong side by side, so slow drifts of a shared machine hit
    neighbours alike."""
    timing = dict(warmup=config.warmup, min_repeats=config.min_repeats, max_repeats=config.max_repeats,
                  min_time_s=config.min_time_s)
    ks = device_counts(config.devices)
    rows = []

    def emit(method, mode, b, k, global_batch, measured):
        rows.append(_row(name, method, mode, b, k, global_batch, measured))
        notify({"kind": "scaling", **rows[-1]})

    for b in config.batch_sizes:
        batches = {g: batches_for(g) for g in sorted({b, *(k * b for k in ks)})}
        with highest_precision():
            references = {g: make_step("batched", apply_fn)(params, *batches[g][0]) for g in batches}
        for method in scaling_methods(config.methods):
            one = _guarded(lambda: measure(method, apply_fn, params, batches[b], 1, references[b], timing))
            for mode in MODES:  # K = 1 is the same case for both kinds
                emit(method, mode, b, 1, b, one)
            for k in ks[1:]:
                for mode, g in (("weak", k * b), ("strong", b)):
                    emit(method, mode, b, k, g,
                         _guarded(lambda: measure(method, apply_fn, params, batches[g], k, references[g], timing)))
    return rows


def _guarded(run: Callable[[], dict]) -> dict:
    """Running out of device memory skips a case; anything else is a bug and propagates."""
    return unless_out_of_memory(run, lambda reason: {"status": "skipped", "reason": reason})


def _row(model, method, mode, batch_size, k, global_batch, measured) -> dict:
    row = {"model": model, "method": method, "mode": mode, "batch_size": batch_size, "devices": k,
           "per_device_batch": global_batch // k, "global_batch": global_batch, **measured}
    if row["status"] == "ok":
        row["examples_per_s"] = global_batch / row["step_s"]
    return row


def with_efficiency(rows: list[dict]) -> list[dict]:
    """The rows with speedup and efficiency, each against the K = 1 row of
    its (model, method, mode, batch size); None where either was skipped."""
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
