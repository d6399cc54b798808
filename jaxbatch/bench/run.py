"""The benchmark: every (model, batch size, method), then training epochs.

    record = run_benchmarks(BenchConfig(models=("mlp",), batch_sizes=(32, 256)))

returns one JSON-able dict (schema in docs/bench.md): the device, software
versions, the measured matmul peak, one row per case and one per epoch run,
and with `devices` the weak and strong scaling over device counts
(scaling.py).
Cases run model by model and, within a batch size, method after method (JAX
then PyTorch), so slow drifts of a shared machine hit neighbours alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch.bench import device as device_lib
from jaxbatch.bench import scaling
from jaxbatch.bench.measure import (block, compile_step, is_out_of_memory, jax_matmul_peak, matmul_size,
                                    unless_out_of_memory)
from jaxbatch.bench.methods import METHODS, STEPS, make_chunked_step, make_loop_step, make_step
from jaxbatch.errors import JaxbatchError
from jaxbatch.machine import time_calls
from jaxbatch.models import get_model
from jaxbatch.precision import highest_precision, matmul_precision, relative_difference

SCHEMA = "jaxbatch-bench/1"
# The input each model is benchmarked at: the dataset its text trains it on.
IMAGE_SHAPES = {"mlp": (28, 28, 1), "mlp_scratch": (28, 28, 1), "cnn": (28, 28, 1),
                "lenet5": (28, 28, 1), "fc_nobias": (32, 32, 3)}
DEFAULT_MODELS = ("mlp", "cnn", "lenet5", "fc_nobias")
DEFAULT_BATCH_SIZES = (1, 8, 32, 128, 256, 512, 2048)
EPOCH_RECIPES = ("mlp-fashion", "cnn-mnist")
ROTATIONS = 3  # different input batches cycled through while timing


@dataclasses.dataclass
class BenchConfig:
    models: tuple = DEFAULT_MODELS
    batch_sizes: tuple = DEFAULT_BATCH_SIZES
    methods: tuple = METHODS
    chunk: int = 32  # examples per chunk of per_example_chunked
    loop_max_batch: int = 32  # the Python loop runs only up to this batch size
    torch: bool = False  # also time the PyTorch twins
    # PyTorch intra-op thread counts to try per case, keeping the fastest; () = PyTorch's default.
    # On a busy machine 2 OpenMP threads can be 30x slower than 1; trying both is fair to PyTorch.
    torch_threads: tuple = ()
    epochs: tuple = EPOCH_RECIPES  # recipes whose training epoch is timed; () for none
    data_dir: str | None = None
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 100
    min_time_s: float = 1.0
    # A case whose compiled step needs more than this share of the device's memory is skipped.
    memory_fraction: float = 0.5
    seed: int = 0
    # Device counts K for weak and strong scaling (jaxbatch/bench/scaling.py); () for none.
    devices: tuple = ()


def quick_config(**overrides) -> BenchConfig:
    """A few minutes' run: two batch sizes, fewer repeats, no epochs."""
    fields = dict(batch_sizes=(32, 256), min_repeats=3, max_repeats=20, min_time_s=0.3, epochs=())
    fields.update(overrides)
    return BenchConfig(**fields)


def validate(config: BenchConfig) -> None:
    """Reject a bad configuration before anything is compiled."""
    if not config.models:
        raise JaxbatchError("no model to benchmark; pass --models, e.g. --models mlp,cnn")
    for name in config.models:
        get_model(name)
        if name not in IMAGE_SHAPES:
            raise JaxbatchError(f"model {name!r} has no benchmark input shape; choose from: {', '.join(IMAGE_SHAPES)}")
    if not config.batch_sizes:
        raise JaxbatchError("no batch size to benchmark; pass --batch-sizes, e.g. --batch-sizes 32,256")
    for b in config.batch_sizes:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise JaxbatchError(f"batch size must be a whole number of 1 or more, got {b!r}")
    for m in config.methods:
        if m not in METHODS:
            raise JaxbatchError(f"unknown method {m!r}; choose from: {', '.join(METHODS)}")
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in config.torch_threads):
        raise JaxbatchError(f"torch threads must be whole numbers of 1 or more, got {config.torch_threads}")
    if config.chunk < 1 or config.loop_max_batch < 0:
        raise JaxbatchError("chunk must be 1 or more and loop-max-batch 0 or more")
    if not 0 < config.memory_fraction <= 1:
        raise JaxbatchError(f"memory fraction must be in (0, 1], got {config.memory_fraction}")
    if config.devices:
        if not scaling.scaling_methods(config.methods):
            raise JaxbatchError(f"scaling across --devices needs one of the methods {', '.join(STEPS)} in --methods")
        scaling.check_devices(config.devices, config.batch_sizes, jax.device_count(), jax.devices()[0].platform)
    if config.torch:
        from jaxbatch.bench.torch_twins import require_torch

        require_torch()
    if config.epochs:
        from jaxbatch.recipes import get_recipe

        for name in config.epochs:
            get_recipe(name)


def random_batches(seed, batch_size: int, image_shape, count: int = ROTATIONS):
    """`count` different batches of uniform [0, 1) images and labels 0..9, on
    the device. Drawn by NumPy and sent over: jax.random would compile its
    sampler once per batch shape, most of a second each on a CPU."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        xs = rng.random((batch_size, *image_shape), dtype=np.float32)
        ys = rng.integers(0, 10, batch_size, dtype=np.int32)
        batches.append(jax.block_until_ready(jax.device_put((xs, ys))))
    return batches


def _row(framework, model, batch_size, method, **fields) -> dict:
    row = {"framework": framework, "model": model, "image_shape": list(IMAGE_SHAPES[model]),
           "batch_size": int(batch_size), "method": method, "status": "ok"}
    row.update(fields)
    return row


def _skipped(framework, model, batch_size, method, reason) -> dict:
    return _row(framework, model, batch_size, method, status="skipped", reason=reason)


def _with_speed(row: dict, timing, flops) -> dict:
    row.update(step_s=timing.median_s, step_s_min=timing.min_s, repeats=timing.repeats,
               examples_per_s=row["batch_size"] / timing.median_s)
    if flops is not None:
        row.update(flops=flops, flops_per_s=flops / timing.median_s)
    return row


class _Case:
    """What the cases of one (model, batch size) share: params, inputs, the
    batched gradient every method is checked against, the steps' FLOPs.

    The steps are timed at the backend's default float32 matmul precision, as
    training runs them; the check of each method against the batched gradient
    runs under `highest_precision()`, where the methods agree to float32
    rounding on every backend (at the default, a GPU's TF32 or a TPU's
    bfloat16 products would make them differ by ~1e-3). jit caches per
    precision, so the check compiles the step once more."""

    def __init__(self, name, params, batches, config, memory_limit):
        self.name, self.params, self.batches, self.config = name, params, batches, config
        self.batch_size = int(batches[0][0].shape[0])
        self.memory_limit = memory_limit
        self.apply = get_model(name).apply
        self.reference = None  # batched gradient on batches[0]
        self.flops = {}  # method -> XLA's FLOPs of its compiled step

    def timing(self):
        c = self.config
        return dict(warmup=c.warmup, min_repeats=c.min_repeats, max_repeats=c.max_repeats, min_time_s=c.min_time_s)

    def reference_grad(self):
        if self.reference is None:
            with highest_precision():
                self.reference = make_step("batched", self.apply)(self.params, *self.batches[0])
        return self.reference

    def max_rel_diff_vs_batched(self, step, batch) -> float:
        """relative_difference(step's gradient, the batched gradient) on the
        first batch (`batch` in the form `step` takes), both under highest precision."""
        with highest_precision():
            return relative_difference(step(self.params, *batch), self.reference_grad())

    def step_flops(self, method: str):
        """FLOPs of a jitted method's step, from its case if that ran already.
        per_example's is the arithmetic the loop (and torch.func) also does."""
        if method not in self.flops:
            self.flops[method] = compile_step(make_step(method, self.apply), self.params, *self.batches[0]).flops
        return self.flops[method]

    def too_big(self, needed) -> str | None:
        if needed is not None and self.memory_limit is not None and needed > self.memory_limit:
            return (f"needs {needed / 2**30:.1f} GiB, more than {self.config.memory_fraction:.0%} "
                    f"of the device's {self.memory_limit / self.config.memory_fraction / 2**30:.1f} GiB")
        return None

    def run_jax(self, method: str) -> dict:
        b = self.batch_size
        if method == "loop":
            if b > self.config.loop_max_batch:
                return _skipped("jax", self.name, b, method, f"the Python loop runs up to batch {self.config.loop_max_batch}")
            return self._run_loop()
        if method == "per_example_chunked":
            return self._run_chunked()
        step = make_step(method, self.apply)
        compiled = compile_step(step, self.params, *self.batches[0])
        self.flops[method] = compiled.flops
        reason = self.too_big(compiled.peak_memory_bytes)
        if reason:
            return _skipped("jax", self.name, b, method, reason)
        inputs = [(self.params, xs, ys) for xs, ys in self.batches]
        timing = time_calls(compiled.executable, inputs, block, **self.timing())
        row = _row("jax", self.name, b, method, compile_s=compiled.compile_s, flops_source="xla",
                   peak_memory_bytes=compiled.peak_memory_bytes,
                   max_rel_diff_vs_batched=self.max_rel_diff_vs_batched(step, self.batches[0]))
        return _with_speed(row, timing, compiled.flops)

    def _run_chunked(self) -> dict:
        b, chunk = self.batch_size, min(self.config.chunk, self.batch_size)
        step, chunk_sum = make_chunked_step(self.apply, chunk)
        xs, ys = self.batches[0]
        parts = [(b // chunk, compile_step(chunk_sum, self.params, xs[:chunk], ys[:chunk]))]
        if b % chunk:
            parts.append((1, compile_step(chunk_sum, self.params, xs[:b % chunk], ys[:b % chunk])))
        peak_memory = max(c.peak_memory_bytes or 0 for _, c in parts) or None
        reason = self.too_big(peak_memory)
        if reason:
            return _skipped("jax", self.name, b, "per_example_chunked", reason)
        flops = None if any(c.flops is None for _, c in parts) else sum(n * c.flops for n, c in parts)
        inputs = [(self.params, xs, ys) for xs, ys in self.batches]
        timing = time_calls(step, inputs, block, **self.timing())
        row = _row("jax", self.name, b, "per_example_chunked", chunk=chunk,
                   compile_s=sum(c.compile_s for _, c in parts), flops_source="xla, per chunk x chunks",
                   peak_memory_bytes=peak_memory,
                   max_rel_diff_vs_batched=self.max_rel_diff_vs_batched(step, self.batches[0]))
        return _with_speed(row, timing, flops)

    def _run_loop(self) -> dict:
        b = self.batch_size
        step, one_grad = make_loop_step(self.apply)
        one = compile_step(one_grad, self.params, self.batches[0][0][0], self.batches[0][1][0])
        inputs = [(self.params, list(xs), list(ys)) for xs, ys in self.batches]
        timing = time_calls(step, inputs, block, **self.timing())
        row = _row("jax", self.name, b, "loop", compile_s=one.compile_s, flops_source="xla, per_example",
                   peak_memory_bytes=one.peak_memory_bytes,
                   max_rel_diff_vs_batched=self.max_rel_diff_vs_batched(step, inputs[0][1:]))
        return _with_speed(row, timing, self.step_flops("per_example"))

    def run_torch(self, method: str, jax_rows: dict) -> dict:
        from jaxbatch.bench import torch_twins as tt

        torch = tt.require_torch()
        b = self.batch_size
        dev = tt.torch_device(jax.devices()[0].platform)
        n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.params))
        if method == "per_example":  # torch.func keeps all B gradients: B * params floats, a few times over
            reason = self.too_big(3 * 4 * b * n_params)
            if reason:
                return _skipped("torch", self.name, b, method, reason)
        shape = IMAGE_SHAPES[self.name]
        model = tt.torch_twin(self.name, self.params, shape, dev)
        step = tt.make_torch_step(method, model)
        inputs = [tt.to_torch_batch(xs, ys, dev) for xs, ys in self.batches]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        default_threads = torch.get_num_threads()
        by_threads = {}
        try:
            for n in self.config.torch_threads or (default_threads,):
                torch.set_num_threads(n)
                by_threads[n] = time_calls(step, inputs, tt.torch_sync(dev), **self.timing())
        finally:
            torch.set_num_threads(default_threads)
        threads, timing = min(by_threads.items(), key=lambda item: item[1].median_s)
        grads = tt.grads_to_jax_layout(self.name, model, step(*inputs[0]), shape)
        reference = tt._flax_layers(self.name, self.reference_grad())
        twin = jax_rows.get(method)
        row = _row("torch", self.name, b, method, compile_s=None, flops_source="xla, same method in jax",
                   torch_threads=threads, step_s_by_threads={str(n): t.median_s for n, t in by_threads.items()},
                   peak_memory_bytes=int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
                   max_rel_diff_vs_batched=relative_difference(grads, reference))
        flops = twin.get("flops") if twin else None
        if flops is None:
            flops = self.step_flops(method)
        return _with_speed(row, timing, flops)


def _guarded(run: Callable[[], dict], framework, model, batch_size, method) -> dict:
    """Run one case; running out of device memory skips it, anything else is a bug and propagates."""
    return unless_out_of_memory(run, lambda reason: _skipped(framework, model, batch_size, method, reason))


def run_epoch(recipe: str, data_dir: str | None, seed: int = 0) -> dict:
    """Time a training epoch of `recipe` (its model, dataset, optimiser and
    batch size): two epochs run, the first compiles, the second is the figure."""
    from jaxbatch import data as data_lib
    from jaxbatch.recipes import get_recipe
    from jaxbatch.train import TrainConfig, train_and_evaluate

    fields = dict(get_recipe(recipe), epochs=2, data_dir=data_dir, seed=seed)
    config = TrainConfig(**fields)
    row = {"recipe": recipe, "model": config.model, "dataset": config.dataset, "batch_size": config.batch_size,
           "optimizer": config.optimizer, "loss": config.loss}
    try:
        train_ds = data_lib.load(config.dataset, "train", data_dir)
        test_ds = data_lib.load(config.dataset, "test", data_dir)
    except JaxbatchError as err:
        return dict(row, status="skipped", reason=str(err))
    history = train_and_evaluate(config, train_ds=train_ds, test_ds=test_ds).history
    epoch_s = history[1]["epoch_time_s"]
    return dict(row, status="ok", train_examples=len(train_ds), epoch_s=epoch_s,
                first_epoch_s=history[0]["epoch_time_s"], examples_per_s=len(train_ds) / epoch_s,
                test_accuracy=history[1]["test_accuracy"])


def run_benchmarks(config: BenchConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Measure every case of `config`; `on_progress(event)` gets {"kind":
    "peak"|"case"|"epoch", ...} as results come in. Returns the record."""
    validate(config)
    notify = on_progress or (lambda event: None)
    started = time.perf_counter()
    device = device_lib.describe_device()
    record = {
        "schema": SCHEMA,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "software": device_lib.software_versions(with_torch=config.torch),
        "settings": dataclasses.asdict(config),
        # The steps are timed at this precision; max_rel_diff_vs_batched is checked at check_precision.
        "precision": matmul_precision(),
        "check_precision": matmul_precision("highest"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    timing = dict(warmup=config.warmup, min_repeats=config.min_repeats, max_repeats=config.max_repeats,
                  min_time_s=config.min_time_s)
    # The matmul peak is measured before the first model and after each one; the
    # fastest median is the reference, so one disturbed measurement cannot
    # inflate every fraction of peak.
    n = matmul_size(device["platform"])
    peaks = [jax_matmul_peak(n, **timing)]
    notify({"kind": "peak", "jax": peaks[-1]})
    memory_limit = (device["memory_bytes"] * config.memory_fraction) if device["memory_bytes"] else None

    rows, scaling_rows = [], []
    key = jax.random.key(config.seed)
    for name in config.models:
        shape = IMAGE_SHAPES[name]
        # Jitted: Flax's eager init compiles every op on its own. (These parameters are only
        # something to time; unlike training's, their last bits need not match eager init's.)
        params = jax.jit(get_model(name).init)(jax.random.fold_in(key, 0), jnp.zeros(shape, jnp.float32))
        for b in config.batch_sizes:
            try:
                batches = random_batches((config.seed, b), b, shape)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                for m in config.methods:
                    rows.append(_skipped("jax", name, b, m, "out of memory for the input batch"))
                continue
            case = _Case(name, params, batches, config, memory_limit)
            jax_rows = {}
            for method in config.methods:
                row = _guarded(lambda: case.run_jax(method), "jax", name, b, method)
                jax_rows[method] = row
                rows.append(row)
                notify({"kind": "case", **row})
            if config.torch:
                from jaxbatch.bench.torch_twins import TORCH_METHODS

                # The twins of the methods asked for (batched is always timed: the reference).
                for method in [m for m in TORCH_METHODS if m in config.methods or m == "batched"]:
                    row = _guarded(lambda: case.run_torch(method, jax_rows), "torch", name, b, method)
                    rows.append(row)
                    notify({"kind": "case", **row})
            del case, batches
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
        from jaxbatch.bench import torch_twins as tt

        record["matmul_peak"]["torch"] = tt.torch_matmul_peak(n, tt.torch_device(device["platform"]), **timing)
        notify({"kind": "peak", "torch": record["matmul_peak"]["torch"]})
    # Like-for-like: a step's median FLOP/s against the matmul's median FLOP/s.
    peak_flops = record["matmul_peak"]["jax"]["flops_per_s_median"]
    for row in rows:
        if row.get("flops_per_s") is not None:
            row["fraction_of_peak"] = row["flops_per_s"] / peak_flops

    record["epochs"] = []
    for recipe in config.epochs:
        row = run_epoch(recipe, config.data_dir, config.seed)
        record["epochs"].append(row)
        notify({"kind": "epoch", **row})
    record["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    record["total_s"] = time.perf_counter() - started
    return record
