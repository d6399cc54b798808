"""Everything issue 23 asks of a short GPU loan, in one call: the backend-dependent tests, the
benchmark against PyTorch, training-epoch times and the matmul peaks, written as JSON and markdown.

    PYTHONPATH=. python3 scripts/gpu_report.py                  # on the GPU machine: at most 450 s
    JAX_PLATFORMS=cpu python scripts/gpu_report.py --tiny --out /tmp/r   # the dry run: about a minute here

The call, with the device tool (one loan: about 15 minutes of device time, the machine's start
included). First, here: `scripts/gpu_wheels.sh`, which puts dp-accounting's wheel in wheels/gpu
(without it the dp-mnist DP epoch runs with no noise). Then one `run`:

    kind: nvidia-h100-x1    carry: ["wheels/gpu"]    timeout_s: 560
    command: PYTHONPATH=. python3 scripts/gpu_report.py

timeout_s is the 450 s budget plus 110 s: Python's start, the wheel's install, and up to 10 s to stop
a section at its time box. If sections did not finish ("timeout" or "failed" in the summary) and
status leaves 4 minutes or more, at once, while the machine is warm (30 s), retry only those, with a
budget of what is left less 90 s, at most 150 (the device section is not needed again):

    command: PYTHONPATH=. python3 scripts/gpu_report.py --sections bench,equality --budget-s 150
    carry: ["wheels/gpu"]    timeout_s: 240

Outside --tiny the sections run with JAX_PLATFORMS=cuda: no GPU for JAX stops the run after the device
section, with one line naming what was found, instead of spending the loan on the CPU.

Sections, in this order, each in its own process with its own time box, CAPS below (a section that
fails or runs out of time is recorded with the reason, and the next one runs; what a section finished
before its time ran out is kept; SIGTERM or SIGINT ends the running section's processes too):

    device      the device, software and missing modules; dense matmul peaks: JAX bf16, TF32, fp32
                (highest) and float32 at the default precision (what the models run at); PyTorch's too
    tests       pytest on the tests whose numbers depend on the backend (GPU_TESTS below), through a
                small plugin that writes one JSON line per test report; pass/fail per test
    epochs      two epochs of each recipe, the second timed (jaxbatch.train), on synthetic data of the
                real datasets' shapes and sizes unless --data-dir is given; dp-mnist DP vs plain
    bench       jaxbatch.bench.run_benchmarks: every model, B = 256, 32, 2048 (one call per B, most
                useful first), batched/vmap/per_example/clipped, with the PyTorch twins at JAX's
                precision (TF32 at the default); B = 256 once more at the highest precision on both
                sides; the library's own <device>.json/.md/.png files are written too
    conv_norms  scripts/clip_conv_norms.py: ghost vs vmapped convolution norms (jax#13800)
    equality    the equality experiment (digits, bundled), one model at a time: the gradient ways at
                highest and default precision, and data-parallel over K devices when there are several

Writes to $OUT when set, else --out: gpu_report.json, gpu_report.md, gpu_report.log (every
section's output) and the bench's 4 files: 7 files, flat (the device tool brings back at most 8).
Both reports are rewritten after every section, so a run stopped from outside still leaves them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCHEMA = "jaxbatch-gpu-report/1"
SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
SECTIONS = ("device", "tests", "epochs", "bench", "conv_norms", "equality")
# Seconds per section on a GPU. They add up to 430 of the 450 s budget: the other 20 s are the parent's
# (the wheels' install, the reports) and a time-out's stop (SIGTERM, then SIGKILL 5 s later). A section
# never eats the floor kept for each after it, so a late one keeps 40 s (or its cap) even after an
# overrun: a GPU process needs about 10 s to import JAX and start CUDA. The estimate behind each cap
# is in docs/bench.md. --tiny has no caps: its times are a CPU's, so only the budget bounds them.
CAPS = {"device": 40, "tests": 95, "epochs": 80, "bench": 130, "conv_norms": 35, "equality": 50}
BUDGET_S, TINY_BUDGET_S = 450, 300
FLOOR_S, TINY_FLOOR_S = 40, 10

# The tests whose outcome can depend on the XLA backend, with what each checks. Ids are prefixes
# (a test, all its parameters, a module); a missing one is reported, not fatal. Left out for the
# time they cost: the gradient ways at highest precision and float64 for every model (the equality
# section computes them) and the bench with its PyTorch twins (the bench section runs it).
GPU_TESTS = [
    ("tests/test_models.py::test_mask_max_pool_matches_flax_values_and_gradients_ties_included",
     "both max pools (mask, flax): same values and gradients, ties included"),
    ("tests/test_models.py::test_cnn_gradients_are_the_same_with_either_backends_pool",
     "cnn gradient with the CPU choice of pool and the GPU one"),
    ("tests/test_models.py::test_single_example_and_batch_agree",
     "one example and a batch give the same logits (default precision, rtol 1e-5)"),
    ("tests/test_losses.py::test_per_example_grads_are_each_examples_own_gradient", "per-example gradients, float64"),
    ("tests/test_losses.py::test_padding_weights_leave_loss_and_gradient_of_the_real_examples",
     "weight-0 padding leaves loss and gradient unchanged"),
    ("tests/test_chunks.py", "chunked sums, rolled and unrolled; unroll follows the backend"),
    ("tests/test_train.py::test_chunk_plan_is_decided_by_the_backend", "steps per scan call, by backend"),
    ("tests/test_train.py::test_unrolled_and_rolled_chunks_compute_the_same_training",
     "rolled and unrolled training chunks train the same (default precision, 1e-6)"),
    ("tests/test_train.py::test_vmap_and_batched_training_end_equal",
     "vmap and batched training end equal (default precision, 1e-5)"),
    ("tests/test_train.py::test_sum_loss_with_lr_over_b_equals_mean_loss_with_lr", "summed loss at lr/B = mean at lr"),
    ("tests/test_bench.py::test_every_method_computes_the_batched_gradient",
     "every bench method = the batched gradient (highest precision)"),
    ("tests/test_bench.py::test_xla_flops_of_mlp_step_match_the_hand_count", "XLA's FLOP count on this backend"),
    ("tests/test_bench.py::test_torch_twins_compute_the_jax_gradient",
     "PyTorch twins (CPU, float32) vs JAX's gradient at this backend's default precision: 1e-4, or 2e-3 "
     "where that is TF32 (the conv models differ by about 1e-3 there)"),
    ("tests/test_privacy.py::test_ghost_norms_are_the_per_example_gradient_norms", "ghost norms, float64"),
    ("tests/test_privacy.py::test_convolution_norms_and_clipped_sums_for_every_geometry",
     "convolution norms and clipped sums, every geometry, float64"),
    ("tests/test_privacy.py::test_clipped_mean_is_the_per_example_loop_in_float64",
     "clipped mean = the per-example loop, float64"),
]
TINY_TESTS = [
    ("tests/test_chunks.py::test_unroll_loop_follows_the_backend_and_the_body", "unroll follows the backend"),
    ("tests/test_train.py::test_chunk_plan_is_decided_by_the_backend", "steps per scan call, by backend"),
]

# (label, recipe, variant, overrides): "plain" drops the recipe's dp_ settings, the same model, data and batch.
EPOCH_RUNS = [("mlp-fashion", "mlp-fashion", None, {}), ("cnn-mnist", "cnn-mnist", None, {}),
              ("dp-mnist plain", "dp-mnist", "plain", {}), ("dp-mnist DP", "dp-mnist", "dp", {}),
              ("lenet-mnist", "lenet-mnist", None, {}), ("fc-cifar10", "fc-cifar10", None, {})]
# The mlp for dp-mnist's cnn: the DP path all the same, without the CPU's slow compile of a cnn DP step.
TINY_EPOCH_RUNS = [("mlp-fashion", "mlp-fashion", None, {}), ("dp-mnist plain", "dp-mnist", "plain", {"model": "mlp"}),
                   ("dp-mnist DP", "dp-mnist", "dp", {"model": "mlp"})]
TINY_SIZES = {"train": 512, "test": 128}

BENCH_MODELS = ("mlp", "cnn", "lenet5", "fc_nobias")
# One run_benchmarks call each, in this order: a time-out loses the last. No B = 1: one example's
# step is launch overhead on a GPU, a figure that costs four models' compiles and says little.
BENCH_SIZES = (256, 32, 2048)
BENCH_METHODS = ("batched", "vmap", "per_example", "clipped")
HIGHEST_METHODS = ("batched", "per_example")  # timed again at highest precision, on both sides
CONV_NORMS = {"models": ("cnn", "lenet5"), "batch_sizes": (256, 2048), "calls": 10}
TINY_CONV_NORMS = {"models": ("cnn",), "batch_sizes": (4,), "calls": 1}
TINY_EQUALITY_MODELS = ("mlp",)

# Not on the GPU machine's image, and what their absence costs (jaxbatch imports each lazily).
ABSENT_THERE = {
    "dp_accounting": "DP-SGD's epsilon: without it (and without wheels/gpu from scripts/gpu_wheels.sh) the dp-mnist "
                     "DP epoch runs clipping only (no noise, no accountant)",
    "tensorflow_datasets": "nothing here: only reading TFDS-prepared datasets needs it",
    "array_record": "nothing here: only reading TFDS-prepared datasets needs it",
}
CHECKED_MODULES = ("dp_accounting", "tensorflow_datasets", "array_record", "torch", "xdist", "tqdm", "sklearn",
                   "matplotlib", "PIL", "pytest")
PRETEND = "GPU_REPORT_PRETEND_MISSING"  # comma-separated top-level modules to treat as absent (the dry-run test)


class _Absent(importlib.abc.MetaPathFinder):
    """Makes `names` unimportable, as on a machine without them."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (absent for this run: ${PRETEND})")


def block_pretended_modules() -> None:
    names = [n for n in os.environ.get(PRETEND, "").split(",") if n]
    if names and not any(isinstance(f, _Absent) for f in sys.meta_path):
        sys.meta_path.insert(0, _Absent(names))


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def plain(obj):
    """json.dumps' fallback: NumPy and JAX scalars and arrays as Python numbers and lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill
            pass
    return rows


# ---- pytest plugin: one JSON line per test report ------------------------------------------------
# Loaded in the pytest process by a stub module in the work folder (-p gpu_report_pytest). Under
# pytest-xdist the controller receives every worker's reports, so only it writes.

_controller = True


def pytest_configure(config):
    global _controller
    _controller = not hasattr(config, "workerinput")
    block_pretended_modules()


def pytest_runtest_logreport(report):
    if not _controller:
        return
    message = None
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)[-500:]
    elif report.skipped:
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": report.duration, "message": message and message[:1000]}
    with open(os.environ["GPU_REPORT_TESTS_JSONL"], "a") as f:
        f.write(json.dumps(line) + "\n")


PLUGIN_STUB = """# written by scripts/gpu_report.py: loads its pytest hooks
import importlib.util
_spec = importlib.util.spec_from_file_location("gpu_report", {script!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
pytest_configure = _module.pytest_configure
pytest_runtest_logreport = _module.pytest_runtest_logreport
"""


def node_ids_found(entries) -> tuple[list, list]:
    """(entries whose file and test function exist, node ids that do not): read from the files, so a
    renamed test is reported instead of stopping pytest with 'not found'."""
    found, missing = [], []
    for node, what in entries:
        path, _, name = node.partition("::")
        source = REPO / path
        ok = source.is_file() and (not name or re.search(rf"^def {re.escape(name.split('[')[0])}\(",
                                                         source.read_text(), re.M))
        (found if ok else missing).append((node, what))
    return found, missing


def outcomes_by_test(lines: list, entries: list) -> list:
    """One row per test: the worst of its setup/call/teardown reports."""
    tests: dict = {}
    for r in lines:
        t = tests.setdefault(r["nodeid"], {"nodeid": r["nodeid"], "outcome": "passed", "seconds": 0.0,
                                           "message": None})
        t["seconds"] += r["seconds"] or 0.0
        if r["outcome"] == "failed":
            t["outcome"] = "failed" if r["when"] == "call" else "error"
            t["message"] = r["message"]
        elif r["outcome"] == "skipped" and t["outcome"] == "passed":
            t["outcome"], t["message"] = "skipped", r["message"]
    for t in tests.values():
        t["checks"] = next((what for node, what in entries if t["nodeid"].startswith(node)), None)
    return sorted(tests.values(), key=lambda t: t["nodeid"])


# ---- the sections that import JAX, each in its own process ----------------------------------------


def timing(args) -> dict:
    """time_calls' settings: `jaxbatch bench --quick`'s, or one call in --tiny."""
    if args.tiny:
        return dict(warmup=1, min_repeats=1, max_repeats=1, min_time_s=0.0)
    from jaxbatch.bench.run import QUICK

    return {"warmup": 2, **{k: QUICK[k] for k in ("min_repeats", "max_repeats", "min_time_s")}}


def matmul_size(args, platform: str) -> int:
    return 256 if args.tiny else 2048 if platform == "cpu" else 8192  # 8192: what the bench uses off CPU


def torch_info() -> dict | None:
    """PyTorch's version, device and TF32 defaults; {"error": ...} when asking fails, which must not
    cost the device section (the matmul peaks) with it."""
    if not importable("torch"):
        return None
    try:
        import torch

        cuda = torch.cuda.is_available()
        return {"version": torch.__version__, "cuda": cuda, "cuda_version": torch.version.cuda,
                "device": torch.cuda.get_device_name(0) if cuda else "cpu", "threads": torch.get_num_threads(),
                # PyTorch's defaults differ from JAX's: fp32 matmuls, but TF32 convolutions (cuDNN).
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    except Exception as err:
        return {"error": one_line(err)}


def nvidia_smi() -> str | None:
    """The card's state as nvidia-smi reads it (a query only: nothing is set)."""
    if not shutil.which("nvidia-smi"):
        return None
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True,
                              text=True, timeout=20, check=False)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.SubprocessError) as err:
        return one_line(err)


def child_device(args, emit) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxbatch.bench.measure import describe_device, jax_matmul_peak, matmul_peak, software_versions
    from jaxbatch.precision import matmul_precision

    has_torch = importable("torch") and not args.no_torch
    try:
        devices = jax.devices()
    except Exception as err:  # outside --tiny JAX_PLATFORMS is cuda: no GPU ends here, not on the CPU
        raise RuntimeError(f"JAX found no device for JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}: "
                           f"{one_line(err)}") from err
    environment = {
        "devices": [str(d) for d in devices[:16]], "device": describe_device(),
        "software": software_versions(with_torch=has_torch), "default_precision": matmul_precision(),
        "modules": {m: importable(m) for m in CHECKED_MODULES}, "torch": torch_info(), "nvidia_smi": nvidia_smi(),
        "executable": sys.executable,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "TF_", "CUDA_", PRETEND))}}
    emit({"environment": environment})
    n, t = matmul_size(args, environment["device"]["platform"]), timing(args)
    jax_peaks = {}
    # label: (dtype, jnp.matmul's precision). TF32 by its dot algorithm, so it is TF32 or an error, never
    # silently something else; f32_default is what the models' products run at (TF32 on recent NVIDIA GPUs).
    for label, dtype, precision in (("bf16", jnp.bfloat16, None), ("tf32", jnp.float32, "TF32_TF32_F32"),
                                    ("fp32", jnp.float32, "highest"), ("f32_default", jnp.float32, None)):
        try:
            algorithm = getattr(jax.lax.DotAlgorithmPreset, precision) if precision == "TF32_TF32_F32" else precision
            jax_peaks[label] = {**jax_matmul_peak(n, dtype, algorithm, **t), "dtype": jnp.dtype(dtype).name,
                                "precision": precision or "default"}
        except Exception as err:
            jax_peaks[label] = {"error": one_line(err)}
        emit({"jax": label, **jax_peaks[label]})
    torch_peaks = {}
    if has_torch:
        import torch

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sync = (lambda out: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda out: out)
        gen = torch.Generator(device=dev).manual_seed(0)  # drawn where they are used: 8192^2 floats each
        pairs = [tuple(torch.randn(n, n, generator=gen, device=dev) for _ in range(2)) for _ in range(3)]
        before = torch.backends.cuda.matmul.allow_tf32
        for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                                   ("fp32", torch.float32, False)):
            try:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                cast = [tuple(m.to(dtype) for m in pair) for pair in pairs]
                torch_peaks[label] = {**matmul_peak(torch.matmul, cast, sync, **t), "device": str(dev)}
            except Exception as err:
                torch_peaks[label] = {"error": one_line(err)}
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
            emit({"torch": label, **torch_peaks[label]})
    return {"environment": environment, "matmul_peak": {"size": n, "jax": jax_peaks, "torch": torch_peaks}}


def synthetic_split(name: str, split: str, size: int):
    """`size` uint8 images of dataset `name`'s shape, labels 0..9: each class lights its own random
    quarter of the pixels, 10% flipped per example, plus noise. Learnable like the real data (the
    recipes' learning rates train on it), so an epoch costs what a real one does."""
    import numpy as np

    from jaxbatch import data as data_lib

    spec = data_lib.get_spec(name)
    prototypes = np.random.default_rng(0).integers(0, 4, (10, *spec.image_shape), dtype=np.uint8) == 0
    rng = np.random.default_rng(1 if split == "train" else 2)
    labels = rng.integers(0, 10, size).astype(np.int32)
    on = prototypes[labels] ^ (rng.integers(0, 10, (size, *spec.image_shape), dtype=np.uint8) == 0)
    images = on.astype(np.uint8) * 192 + rng.integers(0, 64, (size, *spec.image_shape), dtype=np.uint8)
    return data_lib.Dataset(images, labels, spec.class_names, name)


def step_flops(config, image_shape) -> tuple[float | None, str]:
    """XLA's FLOPs of one training step's gradient at the run's batch size (no optimiser update):
    the bench's step of the same method."""
    import jax
    import jax.numpy as jnp

    from jaxbatch.bench.measure import compile_step
    from jaxbatch.bench.methods import make_step
    from jaxbatch.models import get_model

    method = "clipped" if config.dp_clip is not None else "batched" if config.loss == "batched" else "vmap"
    model = get_model(config.model)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(image_shape, jnp.float32))
    xs = jnp.zeros((config.batch_size, *image_shape), jnp.float32)
    ys = jnp.zeros(config.batch_size, jnp.int32)
    return compile_step(make_step(method, model.apply), params, xs, ys).flops, method


def child_epochs(args, emit) -> dict:
    from jaxbatch import data as data_lib
    from jaxbatch.recipes import get_recipe
    from jaxbatch.train import TrainConfig, train_and_evaluate

    has_accounting = importable("dp_accounting")
    datasets: dict = {}

    def splits(name):
        if name not in datasets:
            if args.data_dir:
                datasets[name] = tuple(data_lib.load(name, s, args.data_dir) for s in ("train", "test"))
            else:
                sizes = TINY_SIZES if args.tiny else data_lib.get_spec(name).sizes
                datasets[name] = tuple(synthetic_split(name, s, sizes[s]) for s in ("train", "test"))
        return datasets[name]

    rows = []
    for label, recipe, variant, overrides in TINY_EPOCH_RUNS if args.tiny else EPOCH_RUNS:
        fields, note = {**get_recipe(recipe), **overrides}, None
        if variant == "plain":
            fields = {k: v for k, v in fields.items() if not k.startswith("dp_")}
        elif variant == "dp":
            # The budget is a rule for the recipe's whole run, not part of a step's cost (and a tiny
            # dataset's sampling rate would exceed it): the budget check goes, noise stays (a recipe that
            # calibrates its noise to the budget gets sigma 1: the noise's size does not change the cost).
            fields = {**fields, "dp_epsilon": None, "dp_noise": fields.get("dp_noise") or 1.0}
            if not has_accounting:
                fields, note = {**fields, "dp_noise": None}, ABSENT_THERE["dp_accounting"]
        tiny = [f"--tiny: {k} {v} instead of the recipe's" for k, v in overrides.items()]
        row = {"label": label, "recipe": recipe, "variant": variant, "overrides": overrides,
               "note": "; ".join(filter(None, [note, *tiny]))}
        try:
            config = TrainConfig(**{**fields, "epochs": 2, "seed": 0})
            row.update(model=config.model, dataset=config.dataset, batch_size=config.batch_size,
                       optimizer=config.optimizer, loss=config.loss,
                       dp={k: v for k, v in vars(config).items() if k.startswith("dp_") and v is not None})
            train, test = splits(config.dataset)
            history = train_and_evaluate(config, train_ds=train, test_ds=test).history
            first, second = history
            epoch_s = second["epoch_time_s"]
            flops, method = step_flops(config, train.image_shape)
            steps = second["steps"] - first["steps"]
            row.update(status="ok", train_examples=len(train), steps_per_epoch=steps, epoch_s=epoch_s,
                       first_epoch_s=first["epoch_time_s"], examples_per_s=len(train) / epoch_s,
                       test_accuracy=second["test_accuracy"], step_flops=flops, flops_method=method,
                       epoch_flops_per_s=None if flops is None else flops * steps / epoch_s,
                       epoch_line={k: v for k, v in second.items() if isinstance(v, (int, float))})
        except Exception as err:
            row.update(status="failed", reason=one_line(err), traceback=traceback.format_exc()[-2000:])
        rows.append(row)
        emit(row)
    source = f"files in {args.data_dir}" if args.data_dir else "synthetic"
    return {"data": source, "rows": rows, "dp_accounting": has_accounting}


def merge_records(records: list) -> dict:
    """One bench record from the per-batch-size ones: their rows, the fastest of all their matmul
    peaks as the reference, and every row's fraction of it recomputed (run_benchmarks' own rule)."""
    merged = {**records[0], "results": [r for rec in records for r in rec["results"]]}
    merged["settings"] = {**records[0]["settings"],
                          "batch_sizes": [b for rec in records for b in rec["settings"]["batch_sizes"]]}
    runs = [p for rec in records for p in rec["matmul_peak"]["jax_runs"]]
    peak = {"jax": max(runs, key=lambda p: p["flops_per_s_median"]), "jax_runs": runs}
    torch_peaks = [rec["matmul_peak"]["torch"] for rec in records if "torch" in rec["matmul_peak"]]
    if torch_peaks:
        peak["torch"] = max(torch_peaks, key=lambda p: p["flops_per_s_median"])
    merged["matmul_peak"] = peak
    for r in merged["results"]:
        if r.get("flops_per_s") is not None:
            r["fraction_of_peak"] = r["flops_per_s"] / peak["jax"]["flops_per_s_median"]
    merged.update(load_average_end=records[-1]["load_average_end"], total_s=sum(r["total_s"] for r in records))
    return merged


def child_bench(args, emit) -> dict:
    import dataclasses

    from jaxbatch.bench.measure import device_slug
    from jaxbatch.bench.report import check_targets, write_results
    from jaxbatch.bench.run import BenchConfig, run_benchmarks
    from jaxbatch.precision import highest_precision

    has_torch = importable("torch") and not args.no_torch
    models, sizes = (("mlp",), (4,)) if args.tiny else (BENCH_MODELS, BENCH_SIZES)
    t = timing(args)
    records, highest = [], None
    for b in sizes:
        config = BenchConfig(models=models, batch_sizes=(b,), methods=BENCH_METHODS, torch=has_torch, epochs=(),
                             warmup=t["warmup"], min_repeats=t["min_repeats"], max_repeats=t["max_repeats"],
                             min_time_s=t["min_time_s"])
        records.append(run_benchmarks(config, on_progress=lambda e: emit(e) if e["kind"] == "case" else None))
        # The library's files after every batch size: a time-out later still leaves those done.
        record = merge_records(records)
        files = write_results(record, args.out, device_slug(record["device"]), plots=True)
        emit({"files": [p.name for p in files], "batch_sizes": [r["settings"]["batch_sizes"][0] for r in records]})
        if highest is None:
            # The first batch size once more with every product in float32 on both sides (JAX's highest
            # precision; PyTorch's TF32 off, as the twins follow JAX): how much of a gap is TF32's.
            config = dataclasses.replace(config, methods=HIGHEST_METHODS)
            with highest_precision():
                found = run_benchmarks(config, on_progress=lambda e: emit({**e, "kind": "highest_case"})
                                       if e["kind"] == "case" else None)
            highest = {"batch_size": b, "precision": found["precision"], "rows": found["results"]}
    return {"record": record, "targets": check_targets(record), "files": [p.name for p in files],
            "torch": has_torch, "batch_size_order": list(sizes), "highest": highest}


def child_conv_norms(args, emit) -> dict:
    from jaxbatch.bench.measure import is_out_of_memory

    spec = importlib.util.spec_from_file_location("clip_conv_norms", REPO / "scripts" / "clip_conv_norms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plan, rows = TINY_CONV_NORMS if args.tiny else CONV_NORMS, []
    for b in plan["batch_sizes"]:  # every model at the first size before any at the next
        for name in plan["models"]:
            try:
                row = {**module.measure(name, b, plan["calls"]), "status": "ok"}
                row["ratio_to_batched"] = {k: v / row["median_s"]["batched"] for k, v in row["median_s"].items()}
            except Exception as err:
                status = "skipped" if is_out_of_memory(err) else "failed"
                row = {"model": name, "batch_size": b, "status": status, "reason": one_line(err)}
            rows.append(row)
            emit(row)
    return {"rows": rows}


def child_equality(args, emit) -> dict:
    from jaxbatch.experiments import equality, make_config

    tiny = {"batch_size": 10, "comparisons": ("float32", "float32_default")} if args.tiny else {}
    keep = ("dtype", "precision", "max_rel", "max_abs", "within_target", "data_parallel", "seconds")
    models = {}
    # One model per run, emitted when it is done: a time-out keeps the models finished before it.
    for name in TINY_EQUALITY_MODELS if args.tiny else BENCH_MODELS:
        config = make_config("equality", quick=True, models=(name,), **tiny)
        result = equality.run(config, on_progress=lambda text: emit({"progress": text}))
        models[name] = {c: {k: result["models"][name][c][k] for k in keep} for c in result["comparisons"]}
        emit({"model": name, "comparisons": models[name]})
    return {"models": models, "comparisons": list(result["comparisons"]),
            "all_within_target": all(m[c]["within_target"] is not False for m in models.values() for c in m),
            "data_parallel": {k: v for k, v in result["data_parallel"].items() if k != "note"},
            "default_precision_means": result["default_precision_means"], "batch_size": config.batch_size,
            "dataset": config.dataset}


CHILDREN = {"device": child_device, "epochs": child_epochs, "bench": child_bench, "conv_norms": child_conv_norms,
            "equality": child_equality}


def child_main(args) -> int:
    """Run one section; its result (or error) goes to <work>/<section>.json, what it finishes on
    the way to <work>/<section>.partial.jsonl (kept if the section runs out of time)."""
    block_pretended_modules()
    work, name = Path(args.work), args.child
    with open(work / f"{name}.partial.jsonl", "a") as partial:
        def emit(item):
            line = json.dumps(item, default=plain)
            partial.write(line + "\n")
            partial.flush()
            print(line[:300], flush=True)  # to the section's log, gpu_report.log

        try:
            outcome = {"result": CHILDREN[name](args, emit)}
        except Exception as err:
            traceback.print_exc()
            outcome = {"error": one_line(err), "traceback": traceback.format_exc()[-3000:]}
    (work / f"{name}.json").write_text(json.dumps(outcome, default=plain))
    return 0 if "result" in outcome else 1


# ---- the parent: runs the sections, writes the reports ---------------------------------------------


class Stopped(BaseException):
    """SIGTERM or SIGINT from outside (the device tool's time limit, Ctrl-C), raised in the parent
    wherever it waits, so that run_process's cleanup ends the running section before the parent."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Stopped(signum)


def die_with_parent() -> None:
    """Run in a section's process before it starts: Linux sends it SIGKILL when the parent dies,
    even by a SIGKILL that leaves the parent no time to stop it (prctl's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def stop_group(proc) -> None:
    """Ends `proc` and everything it started: its process group, by its id, SIGTERM (with SIGCONT,
    which a stopped process needs to act on it), then SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGCONT)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def run_process(cmd, env, log: Path, timeout: float) -> tuple[int | None, float]:
    """(exit status or None when stopped at `timeout`, seconds). The process gets its own session, so
    on time-out, or when the parent is stopped from outside, it is stopped with everything it started."""
    started = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
        print(f"gpu_report: {log.stem}: started, pid {proc.pid}, time box {timeout:.0f} s", flush=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            stop_group(proc)
    return rc, time.perf_counter() - started


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def run_child(name, args, env, work: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--child", name, "--work", str(work), "--out", str(args.out_dir)]
    cmd += [flag for flag, on in (("--tiny", args.tiny), ("--no-torch", args.no_torch)) if on]
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    log = work / f"{name}.log"
    rc, seconds = run_process(cmd, env, log, timeout)
    section = {"seconds": seconds, "timeout_s": timeout}
    final = work / f"{name}.json"
    outcome = json.loads(final.read_text()) if final.exists() else {}
    if "result" in outcome:
        return {**section, "status": "ok", "reason": None, "result": outcome["result"]}
    reason = (outcome.get("error") or (f"stopped at its time box of {timeout:.0f} s" if rc is None
                                       else f"ended with exit status {rc} and no result"))
    return {**section, "status": "timeout" if rc is None else "failed", "reason": reason,
            "partial": read_jsonl(work / f"{name}.partial.jsonl"), "log_tail": log_tail(log)}


def run_tests(args, env, work: Path, timeout: float) -> dict:
    entries, missing = node_ids_found(TINY_TESTS if args.tiny else GPU_TESTS)
    # The full list is checked in --tiny too: a renamed test shows up in the dry run, not on the GPU.
    _, missing_there = node_ids_found(GPU_TESTS)
    (work / "gpu_report_pytest.py").write_text(PLUGIN_STUB.format(script=str(SCRIPT)))
    jsonl = work / "tests.jsonl"
    # -k: conftest refuses a selection that leaves lines of tests/slow_tests.txt unused, unless -k is given;
    # every test name contains "test", so this -k selects all the ids given.
    # no:cacheprovider: this pytest may run inside another one (tests/test_gpu_report.py), which owns .pytest_cache.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "gpu_report_pytest",
           "-k", "test"]
    workers = min(4, (os.cpu_count() or 1) // 4)
    if not args.tiny and workers > 1 and importable("xdist"):
        # Compiling is on the CPU and this machine has cores to spare; the workers share the GPU, whose
        # memory JAX takes as needed here (XLA_PYTHON_CLIENT_PREALLOCATE=false).
        cmd += ["-n", str(workers), "--dist", "loadscope"]
    cmd += [node for node, _ in entries]
    env = {**env, "GPU_REPORT_TESTS_JSONL": str(jsonl),
           "PYTHONPATH": os.pathsep.join([str(work), env["PYTHONPATH"]])}
    rc, seconds = run_process(cmd, env, work / "tests.log", timeout)
    tests = outcomes_by_test(read_jsonl(jsonl), entries)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    not_run = [node for node, _ in entries if not any(t["nodeid"].startswith(node) for t in tests)]
    result = {"command": " ".join(cmd[2:]), "exit_status": rc, "counts": counts, "tests": tests,
              "not_found": [node for node, _ in missing], "not_found_in_gpu_list": [n for n, _ in missing_there],
              "not_run": not_run, "workers": workers if "-n" in cmd else 1}
    section = {"seconds": seconds, "timeout_s": timeout, "result": result}
    if rc is None:
        return {**section, "status": "timeout", "reason": f"stopped at its time box of {timeout:.0f} s; "
                f"{len(tests)} tests reported, {len(not_run)} selections not run",
                "log_tail": log_tail(work / "tests.log")}
    if rc not in (0, 1):  # 1: some tests failed, which is a result; anything else: pytest could not run them
        return {**section, "status": "failed", "reason": f"pytest exit status {rc}",
                "log_tail": log_tail(work / "tests.log")}
    return {**section, "status": "ok", "reason": None}


def install_wheels(args, work: Path) -> dict:
    """Wheels from --wheels (scripts/gpu_wheels.sh fills wheels/gpu) for modules this Python lacks,
    installed offline into the work folder and put on the sections' PYTHONPATH."""
    folder = Path(args.wheels) if args.wheels else None
    wheels = sorted(folder.glob("*.whl")) if folder and folder.is_dir() else []
    # A wheel's module: its distribution name, normalised (dp_accounting-0.6.0-... -> dp_accounting).
    needed = [w for w in wheels if not importable(w.name.split("-")[0].lower())]
    info = {"folder": str(folder) if folder else None, "found": [w.name for w in wheels],
            "installed": [], "site": None, "error": None}
    if not needed:
        return info
    site = work / "site"
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--disable-pip-version-check", "--target", str(site),
                               *map(str, needed)], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return {**info, "error": one_line(err)}
    if done.returncode:
        return {**info, "error": (done.stderr or done.stdout).strip()[-500:]}
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return {**info, "installed": [w.name for w in needed], "site": str(site)}


def slot(name, todo, left, tiny) -> float:
    """Seconds section `name` may take of the `left` in the budget: its cap (none in --tiny), less
    whatever would leave the sections after it (`todo`) under their floor."""
    if tiny:
        return left - TINY_FLOOR_S * len(todo)
    return min(CAPS[name], left - sum(min(FLOOR_S, CAPS[n]) for n in todo))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_report", help="output folder when $OUT is not set")
    parser.add_argument("--tiny", action="store_true", help="the dry run: tiny sizes, one call per case, 1-2 models")
    parser.add_argument("--data-dir", help="folder holding <dataset>/ files for the epochs (default: synthetic data)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--budget-s", type=float, help=f"seconds for all sections (default {BUDGET_S}; --tiny "
                        f"{TINY_BUDGET_S})")
    parser.add_argument("--wheels", default=str(REPO / "wheels" / "gpu"),
                        help="folder of wheels for missing modules ('' for none; scripts/gpu_wheels.sh fills it)")
    parser.add_argument("--no-torch", action="store_true", help="no PyTorch twins or peaks")
    parser.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.out_dir = Path(args.out)
        return child_main(args)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(chosen) - set(SECTIONS):
        parser.error(f"unknown section(s) {sorted(set(chosen) - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    args.budget_s = args.budget_s or (TINY_BUDGET_S if args.tiny else BUDGET_S)
    args.out_dir = Path(os.environ.get("OUT") or args.out).resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    block_pretended_modules()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, raise_stopped)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_report-"))
    try:
        wheels = install_wheels(args, work)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
               # JAX would take 75% of the GPU's memory at start; PyTorch's twins and the test workers
               # share the card, so each process takes what it uses.
               "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), wheels["site"], os.environ.get("PYTHONPATH"))
                                             if p)}
        if not args.tiny:
            # A CUDA plugin that fails to start makes JAX warn and run on the CPU, and the PyTorch twins
            # follow it there: the GPU or an error, never a CPU run that spends the loan.
            env["JAX_PLATFORMS"] = "cuda"
        report = {"schema": SCHEMA, "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "tiny": args.tiny, "argv": sys.argv[1:], "budget_s": args.budget_s, "out": str(args.out_dir),
                  "data": {"source": f"files in {args.data_dir}" if args.data_dir else "synthetic",
                           "note": None if args.data_dir else SYNTHETIC_NOTE},
                  "missing_modules": {m: why for m, why in ABSENT_THERE.items() if not importable(m)},
                  "wheels": wheels, "sections": {}}
        print(f"gpu_report: writing to {args.out_dir}; budget {args.budget_s:.0f} s", flush=True)
        try:
            for i, name in enumerate(SECTIONS):
                if name not in chosen:
                    report["sections"][name] = {"status": "skipped", "reason": "not in --sections"}
                    continue
                seconds = slot(name, [s for s in SECTIONS[i + 1:] if s in chosen],
                               args.budget_s - (time.perf_counter() - started), args.tiny)
                try:
                    if seconds < 3:
                        report["sections"][name] = {"status": "skipped", "reason": "no time left in the budget"}
                    elif name == "tests":
                        report["sections"][name] = run_tests(args, env, work, seconds)
                    else:
                        report["sections"][name] = run_child(name, args, env, work, seconds)
                except Stopped as stop:
                    report["sections"][name] = {"status": "stopped", "reason": f"{stop} from outside: its processes "
                                                "were ended", "partial": read_jsonl(work / f"{name}.partial.jsonl")}
                    raise
                except Exception as err:  # a bug here must not cost the other sections
                    report["sections"][name] = {"status": "failed",
                                                "reason": f"gpu_report.py itself: {one_line(err)}",
                                                "traceback": traceback.format_exc()[-3000:]}
                s = report["sections"][name]
                print(f"gpu_report: {name}: {s['status']}" + (f" in {s['seconds']:.1f} s" if "seconds" in s else "")
                      + (f" ({s['reason']})" if s.get("reason") else ""), flush=True)
                no_gpu = None if args.tiny or name != "device" else why_no_gpu(report)
                for later in (SECTIONS[i + 1:] if no_gpu else ()):
                    report["sections"][later] = {"status": "skipped",
                                                 "reason": no_gpu if later in chosen else "not in --sections"}
                report["total_s"] = time.perf_counter() - started
                write_reports(report, work, args.out_dir)
                if no_gpu:
                    print(f"gpu_report: stopped: {no_gpu}", flush=True)
                    return 3
        except Stopped as stop:
            report["total_s"] = time.perf_counter() - started
            write_reports(report, work, args.out_dir)
            print(f"gpu_report: stopped by {stop}; {args.out_dir} holds the sections done", flush=True)
            return 128 + stop.signum
        try:
            print(summary(report), flush=True)
        except Exception as err:
            print(f"gpu_report: no summary ({one_line(err)}); see {args.out_dir}/gpu_report.md", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def why_no_gpu(report) -> str | None:
    """None when the device section found JAX on a GPU; else why the other sections are not run."""
    s = report["sections"]["device"]
    platform = environment_of(report).get("device", {}).get("platform")
    if platform == "gpu":
        return None
    found = f"JAX's backend is {platform}" if platform else f"the device section {s['status']}: {s.get('reason')}"
    return (f"no GPU ({found}); the report is for a GPU, so the other sections were not run "
            "(--tiny is the dry run on a CPU)")


SYNTHETIC_NOTE = ("the real datasets do not travel to the GPU machine, so these are synthetic: uint8 images of each "
                  "dataset's shape and size, labels 0..9, each class its own random pattern plus noise. Epoch "
                  "times depend only on shapes and sizes; test accuracies are not the real datasets'.")


# ---- figures derived from the sections, and the files ---------------------------------------------


def environment_of(report) -> dict:
    """The device section's environment: from its result, or emitted before it failed or timed out."""
    s = report["sections"].get("device", {})
    return s.get("result", {}).get("environment") or next(
        (e["environment"] for e in s.get("partial", []) if "environment" in e), {})


def peaks_of(report) -> dict:
    """{"jax": {label: median FLOP/s}, "torch": {...}} of the device section's matmuls."""
    found = report["sections"].get("device", {}).get("result", {}).get("matmul_peak", {})
    return {fw: {k: p["flops_per_s_median"] for k, p in found.get(fw, {}).items() if "flops_per_s_median" in p}
            for fw in ("jax", "torch")}


def fractions(flops_per_s, peaks) -> dict:
    return {k: flops_per_s / v for k, v in peaks.get("jax", {}).items()} if flops_per_s else {}


def annotate(report) -> None:
    """Every bench row and epoch its share of each JAX matmul peak of the device section
    (`fractions_of_peaks`: bf16, tf32, fp32, f32_default), beside the bench's own `fraction_of_peak`."""
    peaks = peaks_of(report)
    for row in bench_rows(report):
        row["fractions_of_peaks"] = fractions(row.get("flops_per_s"), peaks)
    for row in epoch_rows(report):
        row["fractions_of_peaks"] = fractions(row.get("epoch_flops_per_s"), peaks)


def bench_rows(report) -> list:
    """The bench's rows: the finished record's, or the cases done before a time-out."""
    s = report["sections"].get("bench", {})
    if "result" in s:
        return s["result"]["record"]["results"]
    return [e for e in s.get("partial", []) if e.get("kind") == "case"]


def epoch_rows(report) -> list:
    s = report["sections"].get("epochs", {})
    return s["result"]["rows"] if "result" in s else [e for e in s.get("partial", []) if "label" in e]


def find_row(rows, model, b, method, framework="jax"):
    return next((r for r in rows if (r["framework"], r["model"], r["batch_size"], r["method"], r["status"])
                 == (framework, model, b, method, "ok")), None)


def device_of(report) -> dict:
    """The device the sections ran on, as JAX names it: the device section's, else the bench's."""
    return environment_of(report).get("device") or report["sections"].get("bench", {}).get("result", {}).get(
        "record", {}).get("device", {})


def issue_targets(report) -> list:
    """Issue 23's targets, set for an H100, each with its figure from this run (None: not measured).
    Epoch times are judged on an H100 only; the ratios of two steps on one device on any GPU, since
    both steps run on the same card; on another device a figure is stated and not judged."""
    rows, epochs, peaks, out = bench_rows(report), epoch_rows(report), peaks_of(report), []
    device = device_of(report)
    gpu, h100 = device.get("platform") == "gpu", "h100" in device.get("name", "").lower()
    elsewhere = f"set for an H100: not judged on {device.get('name', 'an unnamed device')}"

    def add(target, measured, limit, at_most=True, note="", judged=True):
        met = None if measured is None or limit is None or not judged else \
            measured <= limit if at_most else measured >= limit
        note = note if judged else "; ".join(filter(None, [note, elsewhere]))
        out.append({"target": target, "measured": measured, "limit": limit, "met": met, "note": note})

    for label, limit in (("mlp-fashion", 0.030), ("cnn-mnist", 0.3)):
        e = next((e for e in epochs if e["label"] == label and e.get("status") == "ok"), None)
        add(f"{label} epoch, s", e and e["epoch_s"], limit, judged=h100)
    for m in BENCH_MODELS:
        base = find_row(rows, m, 256, "batched")
        for method, limit in (("per_example", 1.2), ("clipped", 1.25)):
            r = find_row(rows, m, 256, method)
            add(f"{m}: {method} / batched, B = 256", r and base and r["step_s"] / base["step_s"], limit, judged=gpu)
    for m in BENCH_MODELS:
        jax_row, torch_row = find_row(rows, m, 256, "per_example"), find_row(rows, m, 256, "per_example", "torch")
        add(f"{m}: per-example speed-up over torch.func, B = 256", jax_row and torch_row
            and torch_row["step_s"] / jax_row["step_s"], 10.0 if m in ("mlp", "fc_nobias") else 1.0, at_most=False,
            judged=gpu)
    mlp = find_row(rows, "mlp", 256, "batched")
    tf32 = peaks.get("jax", {}).get("tf32")
    add("mlp batched step, fraction of the measured TF32 peak, B = 256",
        mlp and tf32 and mlp.get("flops_per_s") and mlp["flops_per_s"] / tf32, None,
        note="stated, not held to a limit: see the step time against launch and memory costs")
    return out


def _f(value, spec=".3g", none="-"):
    return none if value is None else format(value, spec)


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def _pct(x):
    return "-" if x is None else f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def to_markdown(report) -> str:
    sections, peaks = report["sections"], peaks_of(report)
    env = environment_of(report)
    dev, sw = device_of(report), env.get("software", {})
    title = f"# GPU report: {dev.get('platform', '?')} {dev.get('name', '?')}"
    lines = [title + (" (--tiny dry run)" if report["tiny"] else ""),
             "", f"- {report['created_utc']}, {report.get('total_s', 0):.0f} s of a {report['budget_s']:.0f} s budget; "
             f"jax {sw.get('jax', '?')}, flax {sw.get('flax', '?')}, optax {sw.get('optax', '?')}, "
             f"torch {sw.get('torch') or 'not used'}; {dev.get('device_count', '?')} device(s)",
             f"- data for the epochs: {report['data']['source']}" + (f" ({report['data']['note']})"
                                                                      if report["data"]["note"] else ""),
             f"- default float32 matmul precision: {env.get('default_precision', {}).get('float32_matmul_means', '?')}"]
    for module, why in report["missing_modules"].items():
        lines.append(f"- `{module}` is not installed: {why}")
    if report["wheels"]["installed"]:
        lines.append(f"- installed from {report['wheels']['folder']}: {', '.join(report['wheels']['installed'])}")
    if env.get("torch"):
        t = env["torch"]
        lines.append(f"- PyTorch on {t['device']}: " + (f"not asked: {t['error']}" if "error" in t else
                     f"its defaults matmul TF32 {t['matmul_allow_tf32']}, cuDNN TF32 {t['cudnn_allow_tf32']}; "
                     "the twins run at JAX's precision instead (TF32 for both at the default on an NVIDIA GPU, "
                     "neither at the highest: each row's `tf32`)"))
    if env.get("nvidia_smi"):
        lines += ["", "```", env["nvidia_smi"], "```"]
    lines += ["", "| section | status | seconds | time box | reason |", "|---|---|---:|---:|---|"]
    for name, s in sections.items():
        lines.append(f"| {name} | {s['status']} | {_f(s.get('seconds'), '.0f')} | {_f(s.get('timeout_s'), '.0f')} | "
                     f"{s.get('reason') or ''} |")

    found = sections.get("device", {}).get("result", {}).get("matmul_peak")
    if found:
        lines += ["", f"## Dense matmul peaks ({found['size']}^3, median of timed calls)", "",
                  "| framework | precision | TFLOP/s (median) | TFLOP/s (fastest call) |", "|---|---|---:|---:|"]
        for fw in ("jax", "torch"):
            for label, p in found.get(fw, {}).items():
                lines.append(f"| {fw} | {label} | " + (f"{p['flops_per_s_median'] / 1e12:.3g} | "
                                                         f"{p['flops_per_s'] / 1e12:.3g} |" if "error" not in p
                                                         else f"error: {p['error']} | |"))

    s = sections.get("tests", {})
    if s.get("result"):
        r = s["result"]
        lines += ["", "## Backend-dependent tests", "", f"`{r['command'][:300]}`", "",
                  ", ".join(f"{k} {v}" for k, v in r["counts"].items())
                  + (f"; not run: {', '.join(r['not_run'])}" if r["not_run"] else "")
                  + (f"; not found: {', '.join(r['not_found'])}" if r["not_found"] else ""), "",
                  "| test | checks | outcome | s | message |", "|---|---|---|---:|---|"]
        for t in r["tests"]:
            message = (t["message"] or "").replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| `{t['nodeid'].split('::', 1)[1]}` | {t['checks'] or ''} | {t['outcome']} | "
                         f"{t['seconds']:.1f} | {message} |")

    rows = epoch_rows(report)
    if rows:
        lines += ["", "## Training epochs (the second of two; the first compiles)", "",
                  "| run | model | dataset | B | epoch s | first epoch s | examples/s | GFLOP/s | % f32-default peak "
                  "| % TF32 peak | test acc | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e in rows:
            head = f"| {e['label']} | {e.get('model', '')} | {e.get('dataset', '')} | {e.get('batch_size', '')} |"
            if e.get("status") != "ok":
                lines.append(f"{head} failed: {e.get('reason')} | | | | | | | |")
                continue
            fr = fractions(e["epoch_flops_per_s"], peaks)
            lines.append(f"{head} {e['epoch_s']:.3g} | {e['first_epoch_s']:.3g} | {e['examples_per_s']:,.0f} | "
                         f"{_f(e['epoch_flops_per_s'] and e['epoch_flops_per_s'] / 1e9)} | "
                         f"{_pct(fr.get('f32_default'))} | {_pct(fr.get('tf32'))} | {e['test_accuracy']:.3f} | "
                         f"{e.get('note') or ''} |")
        lines += ["", "GFLOP/s: XLA's FLOPs of the step's gradient at batch B (no optimiser update) x steps / epoch "
                  "time; a Poisson-sampled DP batch is padded to more than B slots, so its figure reads low."]
        dp = {e["variant"]: e for e in rows if e.get("recipe") == "dp-mnist" and e.get("status") == "ok"}
        if {"dp", "plain"} <= set(dp):
            lines += ["", f"DP epoch / plain epoch at batch {dp['dp']['batch_size']}: "
                      f"{dp['dp']['epoch_s'] / dp['plain']['epoch_s']:.2f}x"]

    rows = bench_rows(report)
    if rows:
        lines += ["", "## Gradient step, per model (median ms; % of the JAX f32-default / TF32 matmul peak)", "",
                  "| model | B | method | JAX ms | vs batched | % f32-default | % TF32 | torch ms | torch / JAX |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in rows if r["framework"] == "jax"),
                        key=lambda r: (BENCH_MODELS.index(r["model"]) if r["model"] in BENCH_MODELS else 9,
                                       r["batch_size"], BENCH_METHODS.index(r["method"]))):
            head = f"| {r['model']} | {r['batch_size']} | {r['method']} |"
            if r["status"] != "ok":
                lines.append(f"{head} skipped: {r.get('reason')} | | | | | |")
                continue
            base, t = find_row(rows, r["model"], r["batch_size"], "batched"), find_row(
                rows, r["model"], r["batch_size"], r["method"], "torch")
            fr = fractions(r.get("flops_per_s"), peaks)
            lines.append(f"{head} {_ms(r['step_s'])} | {_f(base and r['step_s'] / base['step_s'], '.2f')} | "
                         f"{_pct(fr.get('f32_default'))} | {_pct(fr.get('tf32'))} | {_ms(t and t['step_s'])} | "
                         f"{_f(t and t['step_s'] / r['step_s'], '.2f')} |")
        skipped = [r for r in rows if r["framework"] == "torch" and r["status"] != "ok"]
        lines += [f"- torch {r['model']} {r['method']} B = {r['batch_size']} skipped: {r.get('reason')}"
                  for r in skipped]

    s = sections.get("bench", {})
    highest = s["result"]["highest"] if "result" in s else None
    rows = highest["rows"] if highest else [e for e in s.get("partial", []) if e.get("kind") == "highest_case"]
    if rows:
        default_rows = bench_rows(report)
        lines += ["", f"## The same steps at the highest precision on both sides (B = {rows[0]['batch_size']}): "
                  "float32 products, no TF32", "",
                  "| model | method | JAX ms | torch ms | torch / JAX | JAX at default / highest |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["framework"] == "jax" and r["status"] == "ok"):
            t = find_row(rows, r["model"], r["batch_size"], r["method"], "torch")
            d = find_row(default_rows, r["model"], r["batch_size"], r["method"])
            lines.append(f"| {r['model']} | {r['method']} | {_ms(r['step_s'])} | {_ms(t and t['step_s'])} | "
                         f"{_f(t and t['step_s'] / r['step_s'], '.2f')} | {_f(d and d['step_s'] / r['step_s'], '.2f')} |")

    s = sections.get("conv_norms", {})
    rows = s.get("result", {}).get("rows") or [e for e in s.get("partial", []) if "model" in e]
    if rows:
        lines += ["", "## Convolution norms for clipping: ghost (kernel positions) vs vmapped (grouped convs)", "",
                  "| model | B | batched ms | ghost ms (x batched) | vmap convs ms (x batched) |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | {r['batch_size']} | {r['status']}: {r.get('reason')} | | |")
                continue
            m, x = r["median_s"], r["ratio_to_batched"]
            lines.append(f"| {r['model']} | {r['batch_size']} | {_ms(m['batched'])} | {_ms(m['ghost'])} "
                         f"({x['ghost']:.2f}) | {_ms(m['vmap convs'])} ({x['vmap convs']:.2f}) |")

    s = sections.get("equality", {})
    models = s["result"]["models"] if "result" in s else {e["model"]: e["comparisons"] for e in s.get("partial", [])
                                                          if "model" in e}
    if models:
        comparisons = list(next(iter(models.values())))
        r = s.get("result", {})
        lines += ["", f"## Gradient ways ({r.get('dataset', 'digits')}, batch {r.get('batch_size', '?')}): largest "
                  "relative difference" + ("" if r else f" (the models done before the section {s['status']})"), "",
                  "| model | " + " | ".join(comparisons) + " |", "|---|" + "---:|" * len(comparisons)]
        for name, m in models.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{m[c]['max_rel']:.1e}" + ("" if m[c]["within_target"] is None else
                                             " ok" if m[c]["within_target"] else " **over**") for c in comparisons)
                         + " |")
        if r:
            dp = r["data_parallel"]
            lines += ["", f"Data-parallel K = {dp['ks']} of {dp['device_count']} device(s)"
                      + ("" if dp["device_count"] > 1 else ": one device here, so no several-device check on it")]

    lines += ["", f"## Issue 23's targets (set for an H100; this run: {dev.get('platform', '?')} "
              f"{dev.get('name', '?')})", "", "| target | measured | limit | met | note |", "|---|---:|---:|---|---|"]
    for t in issue_targets(report):
        met = {True: "yes", False: "**no**", None: "not measured" if t["measured"] is None else "not judged"
               if t["limit"] is not None else "stated"}[t["met"]]
        lines.append(f"| {t['target']} | {_f(t['measured'])} | {_f(t['limit'])} | {met} | {t['note']} |")
    return "\n".join(lines) + "\n"


def summary(report) -> str:
    """The last lines the device tool shows: statuses, test failures, the targets."""
    lines = ["", "== gpu_report summary =="]
    for name, s in report["sections"].items():
        lines.append(f"{name:10} {s['status']:8} {_f(s.get('seconds'), '.0f'):>4} s  {s.get('reason') or ''}")
    tests = report["sections"].get("tests", {}).get("result")
    if tests:
        lines.append(f"tests: {tests['counts']}")
        lines += [f"  {t['outcome']}: {t['nodeid']}: {(t['message'] or '')[:150]}" for t in tests["tests"]
                  if t["outcome"] in ("failed", "error")]
    for t in issue_targets(report):
        lines.append(f"target: {t['target']}: {_f(t['measured'])} (limit {_f(t['limit'])})"
                     + (f"; {t['note']}" if t["note"] else ""))
    return "\n".join(lines)


def write_reports(report, work: Path, out: Path) -> None:
    """gpu_report.json, .md and .log, each written whole under a temporary name, then renamed."""
    logs = []
    for name in report["sections"]:
        log = work / ("tests.log" if name == "tests" else f"{name}.log")
        if log.exists():
            text = log.read_text(errors="replace")
            logs.append(f"===== {name} =====\n" + (text if len(text) < 400_000 else "[...]\n" + text[-400_000:]))
    try:
        annotate(report)
        markdown = to_markdown(report)
    except Exception:  # the JSON still says everything; the markdown says why it is missing
        markdown = f"# GPU report\n\nThe markdown could not be written; see gpu_report.json.\n\n```\n" \
                   f"{traceback.format_exc()}```\n"
    files = {"gpu_report.json": json.dumps(report, indent=1, default=plain) + "\n",
             "gpu_report.md": markdown, "gpu_report.log": "\n".join(logs)}
    for file_name, text in files.items():
        tmp = out / f".{file_name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / file_name)


if __name__ == "__main__":
    sys.exit(main())
