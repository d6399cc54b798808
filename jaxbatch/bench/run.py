"""The benchmark: every (model, batch size, method), then training epochs.

    record = run_benchmarks(BenchConfig(models=("mlp",), batch_sizes=(32, 256)))

returns one JSON-able dict (schema in docs/bench.md). Cases run model by model and,
within a batch size, method after method (JAX then PyTorch), so slow drifts of a
shared machine hit neighbours alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch import data as data_lib
from jaxbatch import settings
from jaxbatch.bench import scaling
from jaxbatch.bench import torch_twins as tt
from jaxbatch.bench.measure import (compile_step, describe_device, is_out_of_memory, jax_matmul_peak,
                                    software_versions, timing_settings, unless_out_of_memory)
from jaxbatch.bench.methods import METHODS, STEPS, make_chunked_step, make_loop_step, make_step
from jaxbatch.errors import JaxbatchError
from jaxbatch.machine import time_calls
from jaxbatch.models import get_model
from jaxbatch.precision import highest_precision, matmul_precision, relative_difference
from jaxbatch.recipes import get_recipe
from jaxbatch.settings import setting
from jaxbatch.train import TrainConfig, train_and_evaluate

SCHEMA = "jaxbatch-bench/1"
# The input each model is benchmarked at: the dataset its text trains it on.
IMAGE_SHAPES = {"mlp": (28, 28, 1), "mlp_scratch": (28, 28, 1), "cnn": (28, 28, 1),
                "lenet5": (28, 28, 1), "fc_nobias": (32, 32, 3)}
DEFAULT_MODELS = ("mlp", "cnn", "lenet5", "fc_nobias")
DEFAULT_BATCH_SIZES = (1, 8, 32, 128, 256, 512, 2048)
EPOCH_RECIPES = ("mlp-fashion", "cnn-mnist")
ROTATIONS = 3  # different input batches cycled through while timing


# Settings whose empty tuple () means "none" (no thread counts to try, no
# scaling, no epochs): `validate` checks them as unset when empty.
NONE_WHEN_EMPTY = ("torch_threads", "epochs", "devices")


@dataclasses.dataclass
class BenchConfig:
    models: tuple = setting(DEFAULT_MODELS, "models to benchmark", choices=tuple(IMAGE_SHAPES), kind="model")
    batch_sizes: tuple = setting(DEFAULT_BATCH_SIZES, "batch sizes to time", item=int, at_least=1,
                                 kind="batch size")
    methods: tuple = setting(METHODS, "gradient methods to time", choices=METHODS, kind="method")
    chunk: int = setting(32, "examples per chunk in per_example_chunked", at_least=1)
    loop_max_batch: int = setting(32, "largest batch for the Python loop", at_least=0)
    torch: bool = setting(False, "also time the PyTorch twins (needs torch installed)")
    # On a busy machine 2 OpenMP threads can be 30x slower than 1; trying both is fair to PyTorch.
    torch_threads: tuple = setting((), "PyTorch thread counts to try per case, keeping the fastest, e.g. 1,2 "
                                   "(default: PyTorch's own)", item=int, at_least=1, optional=True,
                                   kind="thread count")
    epochs: tuple = setting(EPOCH_RECIPES, "training recipes to time one epoch of, or 'none'; needs the datasets",
                            item=str, optional=True, kind="recipe")
    data_dir: str | None = setting(None, "folder holding <dataset>/ files, for the epochs", type=str)
    warmup: int = setting(2, "untimed calls per case first", at_least=0)
    min_repeats: int = setting(5, "timed calls per case at least", at_least=1)
    max_repeats: int = setting(100, "timed calls per case at most", at_least=1)
    min_time_s: float = setting(1.0, "seconds of timed calls per case at least", at_least=0)
    memory_fraction: float = setting(0.5, "skip a case whose compiled step needs more than this share of the "
                                     "device's memory", above=0, at_most=1)
    seed: int = setting(0, "seed of the parameters and input batches", at_least=0)
    devices: tuple = setting((), "device counts K for weak scaling (each batch size per device) and strong "
                             "scaling (each batch size split over K), e.g. 1,2,4; K = 1, the reference, is always "
                             "measured (default: no scaling)", item=int, at_least=1, optional=True,
                             kind="device count")


# --quick: a few minutes' run, two batch sizes, fewer repeats, no epochs.
QUICK = dict(batch_sizes=(32, 256), min_repeats=3, max_repeats=20, min_time_s=0.3, epochs=())


def quick_config(**overrides) -> BenchConfig:
    return BenchConfig(**{**QUICK, **overrides})


def validate(config: BenchConfig) -> None:
    """Reject a bad configuration before anything is compiled: each setting by its declaration,
    then the rules that need code."""
    settings.check(dataclasses.replace(config, **{n: None for n in NONE_WHEN_EMPTY if getattr(config, n) == ()}))
    for name in config.models:
        get_model(name)
    if config.devices:
        if not scaling.scaling_methods(config.methods):
            raise JaxbatchError(f"scaling across --devices needs one of the methods {', '.join(STEPS)} in --methods")
        scaling.check_devices(config.devices, config.batch_sizes, jax.device_count(), jax.devices()[0].platform)
    if config.torch:
        tt.require_torch()
    for name in config.epochs:
        get_recipe(name)


def random_batches(seed, batch_size: int, image_shape, count: int = ROTATIONS):
    """`count` batches of uniform [0, 1) images and labels 0..9, on the device. Drawn by NumPy
    and sent over: jax.random would compile its sampler once per batch shape, most of a second
    each on a CPU."""
    rng = np.random.default_rng(seed)
    return [jax.block_until_ready(jax.device_put((rng.random((batch_size, *image_shape), dtype=np.float32),
                                                  rng.integers(0, 10, batch_size, dtype=np.int32))))
            for _ in range(count)]


def case_row(framework, model, batch_size, method, **fields) -> dict:
    return {"framework": framework, "model": model, "image_shape": list(IMAGE_SHAPES[model]),
            "batch_size": int(batch_size), "method": method, "status": "ok", **fields}


def skipped(framework, model, batch_size, method, reason) -> dict:
    return case_row(framework, model, batch_size, method, status="skipped", reason=reason)


def with_speed(r: dict, timing, flops) -> dict:
    r.update(step_s=timing.median_s, step_s_min=timing.min_s, repeats=timing.repeats,
             examples_per_s=r["batch_size"] / timing.median_s)
    if flops is not None:
        r.update(flops=flops, flops_per_s=flops / timing.median_s)
    return r


def too_big(needed, memory_limit, config) -> str | None:
    """Why a case needing `needed` bytes is skipped, or None when it fits."""
    if needed is not None and memory_limit is not None and needed > memory_limit:
        return (f"needs {needed / 2**30:.1f} GiB, more than {config.memory_fraction:.0%} "
                f"of the device's {memory_limit / config.memory_fraction / 2**30:.1f} GiB")
    return None


def time_jax(name, method, params, batches, config, memory_limit, reference: Callable) -> dict:
    """The row of one JAX case: compile, check the memory, time, and hold the gradient on
    batches[0] to `reference()` under the highest precision."""
    (xs, ys), b, apply_fn = batches[0], len(batches[0][1]), get_model(name).apply
    inputs, fields = [(params, *batch) for batch in batches], {}
    if method == "loop":
        if b > config.loop_max_batch:
            return skipped("jax", name, b, method, f"the Python loop runs up to batch {config.loop_max_batch}")
        # Timed as the Python function it is, on lists of examples.
        step, one_grad = make_loop_step(apply_fn)
        inputs = [(params, list(x), list(y)) for x, y in batches]
        compiled, timed = compile_step(one_grad, params, xs[0], ys[0]), step
    else:
        if method == "per_example_chunked":
            fields["chunk"] = chunk = min(config.chunk, b)
            step = make_chunked_step(apply_fn, chunk)
        else:
            step = make_step(method, apply_fn)
        compiled = compile_step(step, params, xs, ys)
        timed = compiled.executable
    flops, source = compiled.flops, "xla"
    if method in ("loop", "per_example_chunked"):
        # per_example's count: the arithmetic they do too, which XLA would count once for a loop body.
        flops, source = compile_step(make_step("per_example", apply_fn), params, xs, ys).flops, "xla, per_example"
    peak_memory = compiled.peak_memory_bytes or None
    reason = too_big(peak_memory, memory_limit, config)
    if reason:
        return skipped("jax", name, b, method, reason)
    timing = time_calls(timed, inputs, jax.block_until_ready, **timing_settings(config))
    with highest_precision():
        check = relative_difference(step(*inputs[0]), reference())
    row = case_row("jax", name, b, method, **fields, compile_s=compiled.compile_s, flops_source=source,
                   peak_memory_bytes=peak_memory, max_rel_diff_vs_batched=check)
    return with_speed(row, timing, flops)


def time_torch(name, method, params, batches, config, memory_limit, reference: Callable) -> dict:
    """The row of one PyTorch twin case: timed at each of `torch_threads` (the fastest kept),
    its gradient against `reference()`, and the FLOPs of the same method in JAX."""
    torch, dev, b = tt.require_torch(), tt.torch_device(jax.devices()[0].platform), len(batches[0][1])
    if method == "per_example":  # torch.func keeps all B gradients: B * params floats, a few times over
        reason = too_big(3 * 4 * b * sum(np.size(p) for p in jax.tree.leaves(params)), memory_limit, config)
        if reason:
            return skipped("torch", name, b, method, reason)
    model = tt.torch_twin(name, params, IMAGE_SHAPES[name], dev)
    step = tt.make_torch_step(method, model)
    inputs = [tt.to_torch_batch(xs, ys, dev) for xs, ys in batches]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    default_threads, by_threads = torch.get_num_threads(), {}
    tf32 = tt.tf32_like_jax()  # the precision JAX's steps are timed at
    try:
        with tt.tf32(tf32):
            for n in config.torch_threads or (default_threads,):
                torch.set_num_threads(n)
                by_threads[n] = time_calls(step, inputs, tt.torch_sync(dev), **timing_settings(config))
            grads = tt.grads_to_jax_layout(name, model, step(*inputs[0]), IMAGE_SHAPES[name])
    finally:
        torch.set_num_threads(default_threads)
    threads, timing = min(by_threads.items(), key=lambda item: item[1].median_s)
    row = case_row("torch", name, b, method, compile_s=None, flops_source="xla, same method in jax", tf32=tf32,
                   torch_threads=threads, step_s_by_threads={str(n): t.median_s for n, t in by_threads.items()},
                   peak_memory_bytes=int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
                   max_rel_diff_vs_batched=relative_difference(grads, tt.flax_layers(name, reference())))
    # The JAX case compiled this step already: its FLOPs come from jit's cache.
    return with_speed(row, timing, compile_step(make_step(method, get_model(name).apply), params, *batches[0]).flops)


def run_epoch(recipe: str, data_dir: str | None, seed: int = 0) -> dict:
    """Time a training epoch of `recipe` (its model, dataset, optimiser and batch size): two
    epochs run, the first compiles, the second is the figure."""
    config = TrainConfig(**dict(get_recipe(recipe), epochs=2, data_dir=data_dir, seed=seed))
    about = {"recipe": recipe, "model": config.model, "dataset": config.dataset, "batch_size": config.batch_size,
             "optimizer": config.optimizer, "loss": config.loss}
    try:
        train_ds, test_ds = (data_lib.load(config.dataset, split, data_dir) for split in ("train", "test"))
    except JaxbatchError as err:
        return dict(about, status="skipped", reason=str(err))
    history = train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds).history
    epoch_s = history[1]["epoch_time_s"]
    return dict(about, status="ok", train_examples=len(train_ds), epoch_s=epoch_s,
                first_epoch_s=history[0]["epoch_time_s"], examples_per_s=len(train_ds) / epoch_s,
                test_accuracy=history[1]["test_accuracy"])


def time_batch_size(name, params, b, config, memory_limit, notify) -> list[dict]:
    """The cases of model `name` at batch size b: JAX's methods, then the PyTorch twins of
    those asked for (batched always: the reference)."""
    try:
        batches = random_batches((config.seed, b), b, IMAGE_SHAPES[name])
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        return [skipped("jax", name, b, m, "out of memory for the input batch") for m in config.methods]

    # What every method is held to, computed once when first asked: the batched gradient under the
    # highest precision, where the methods agree to float32 rounding on every backend (at the default,
    # a GPU's TF32 or a TPU's bfloat16 products would differ by ~1e-3). jit caches per precision, so
    # the check compiles each step once more.
    @functools.cache
    def reference():
        with highest_precision():
            return make_step("batched", get_model(name).apply)(params, *batches[0])

    cases = [("jax", m, time_jax) for m in config.methods]
    if config.torch:
        cases += [("torch", m, time_torch) for m in tt.TORCH_METHODS if m in config.methods or m == "batched"]
    rows = []
    for framework, method, time_case in cases:
        # Running out of device memory skips a case; anything else is a bug and propagates.
        rows.append(unless_out_of_memory(
            lambda: time_case(name, method, params, batches, config, memory_limit, reference),
            lambda reason: skipped(framework, name, b, method, reason)))
        notify({"kind": "case", **rows[-1]})
    return rows


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_benchmarks(config: BenchConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Measure every case of `config`; `on_progress(event)` gets {"kind":
    "peak"|"case"|"scaling"|"epoch", ...} as results come in. Returns the record."""
    validate(config)
    notify = on_progress or (lambda event: None)
    started = time.perf_counter()
    device = describe_device()
    record = {
        "schema": SCHEMA,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "software": software_versions(with_torch=config.torch),
        "settings": dataclasses.asdict(config),
        # The steps are timed at this precision; max_rel_diff_vs_batched is checked at check_precision.
        "precision": matmul_precision(),
        "check_precision": matmul_precision("highest"),
        "load_average_start": load_average(),
    }
    # The matmul peak is measured before the first model and after each one; the fastest
    # median is the reference, so one disturbed measurement cannot inflate every fraction.
    n = 2048 if device["platform"] == "cpu" else 8192  # reaches a device's matmul peak, yet quick
    timing = timing_settings(config)
    peaks = [jax_matmul_peak(n, **timing)]
    notify({"kind": "peak", "jax": peaks[-1]})
    memory_limit = (device["memory_bytes"] * config.memory_fraction) if device["memory_bytes"] else None
    rows, scaling_rows = [], []
    for name in config.models:
        shape = IMAGE_SHAPES[name]
        # Jitted: Flax's eager init compiles every op on its own. (These parameters are only
        # something to time; unlike training's, their last bits need not match eager init's.)
        params = jax.jit(get_model(name).init)(jax.random.fold_in(jax.random.key(config.seed), 0),
                                               jnp.zeros(shape, jnp.float32))
        for b in config.batch_sizes:
            rows += time_batch_size(name, params, b, config, memory_limit, notify)
        if config.devices:
            # A global batch of g gets the same inputs as the case of batch size g above.
            scaling_rows += scaling.model_rows(name, get_model(name).apply, params, config,
                                               lambda g: random_batches((config.seed, g), g, shape), notify)
        peaks.append(jax_matmul_peak(n, **timing))
        notify({"kind": "peak", "jax": peaks[-1]})
    record["results"] = rows
    if config.devices:
        record["scaling"] = scaling.section(config, scaling_rows, device["platform"])
    record["matmul_peak"] = {"jax": max(peaks, key=lambda p: p["flops_per_s_median"]), "jax_runs": peaks}
    if config.torch:
        record["matmul_peak"]["torch"] = tt.torch_matmul_peak(n, tt.torch_device(device["platform"]), **timing)
        notify({"kind": "peak", "torch": record["matmul_peak"]["torch"]})
    # Like-for-like: a step's median FLOP/s against the matmul's median FLOP/s.
    for r in rows:
        if r.get("flops_per_s") is not None:
            r["fraction_of_peak"] = r["flops_per_s"] / record["matmul_peak"]["jax"]["flops_per_s_median"]
    record["epochs"] = []
    for recipe in config.epochs:
        record["epochs"].append(run_epoch(recipe, config.data_dir, config.seed))
        notify({"kind": "epoch", **record["epochs"][-1]})
    record["load_average_end"] = load_average()
    record["total_s"] = time.perf_counter() - started
    return record
