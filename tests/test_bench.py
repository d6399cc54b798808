"""The benchmark harness on tiny sizes: FLOP counts, equal gradients, the
JSON schema, clear errors. No test looks at a timing."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.bench import report
from jaxbatch.bench.measure import compile_step, device_slug, is_out_of_memory
from jaxbatch.bench.methods import METHODS, make_chunked_step, make_loop_step, make_step
from jaxbatch.bench.run import IMAGE_SHAPES, SCHEMA, BenchConfig, run_benchmarks, run_epoch, validate
from jaxbatch.cli import main
from jaxbatch.errors import JaxbatchError
from jaxbatch.models import get_model
from jaxbatch.precision import highest_precision, matmul_precision
from jaxbatch.precision import relative_difference as rel_diff

TINY = dict(min_repeats=1, max_repeats=2, min_time_s=0.0, warmup=1, epochs=())


def mlp_hand_flops(b, d_in=784, hidden=256, classes=10):
    """Matrix products of the batched mlp gradient step, 2 FLOPs per multiply-add:
    forward x W1 and h W2; backward dz W2^T; dW2 = h^T dz and dW1 = x^T dh
    contract over the batch, so for b = 1 they are outer products, one
    multiply per entry. No gradient for the input."""
    forward = 2 * b * (d_in * hidden + hidden * classes)
    d_hidden = 2 * b * classes * hidden
    d_weights = (2 * b if b > 1 else 1) * (d_in * hidden + hidden * classes)
    return forward + d_hidden + d_weights


@functools.cache
def init(name):
    """The model and parameters of its shapes, made once for all the tests:
    N(0, 1/fan_in) values from NumPy, the scale of the models' own inits.
    Only the shapes come from Flax (jax.eval_shape): its init, jitted or
    not, compiles for seconds per model, and no test here needs its values."""
    model = get_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(IMAGE_SHAPES[name]))
    rng = np.random.default_rng(0)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[0]
        return jnp.asarray(rng.normal(0.0, fan_in**-0.5, leaf.shape), leaf.dtype)

    return model, jax.tree.map(draw, shapes)


def batch(name, b, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(kx, (b, *IMAGE_SHAPES[name])), jax.random.randint(ky, (b,), 0, 10)


@pytest.mark.parametrize("b", [1, 4, 16])
def test_xla_flops_of_mlp_step_match_the_hand_count(b):
    model, params = init("mlp")
    xs, ys = batch("mlp", b)
    flops = compile_step(make_step("batched", model.apply), params, xs, ys).flops
    hand = mlp_hand_flops(b)
    # XLA also counts the elementwise work (bias, ReLU, softmax): a little above the products.
    assert hand <= flops <= 1.02 * hand, (flops, hand)


# mlp and fc_nobias: every method is held to the batched gradient, under the same precision and
# with a last partial chunk, inside the tiny record (test_record_schema).
@pytest.mark.parametrize("name", ["cnn", "lenet5"])
def test_every_method_computes_the_batched_gradient(name):
    model, params = init(name)
    xs, ys = batch(name, 5)  # 5 = two chunks of 2 and a last one of 1
    # Float32 rounding is the claim: true float32 products (a GPU's default TF32 differs by ~1e-3).
    with highest_precision():
        reference = make_step("batched", model.apply)(params, xs, ys)  # the "batched" method itself
        assert jax.tree.structure(reference) == jax.tree.structure(params)
        for method in METHODS[1:]:
            if method == "loop":
                grad = make_loop_step(model.apply)[0](params, list(xs), list(ys))
            elif method == "per_example_chunked":
                grad = make_chunked_step(model.apply, chunk=2)(params, xs, ys)
            else:
                grad = make_step(method, model.apply)(params, xs, ys)
            assert jax.tree.structure(grad) == jax.tree.structure(params)
            assert rel_diff(grad, reference) < 1e-5, method


@pytest.fixture(scope="module")
def tiny_record():
    # One batch size: 5 = two chunks of 2 and a last one of 1, and the loop runs. (The loop's skip
    # above --loop-max-batch: test_cases_too_big_for_memory_are_skipped_with_the_reason.)
    config = BenchConfig(models=("mlp", "fc_nobias"), batch_sizes=(5,), chunk=2, loop_max_batch=5, **TINY)
    return run_benchmarks(config)


def test_record_schema(tiny_record, tmp_path):
    paths = report.write_results(tiny_record, tmp_path, "tiny")
    assert [p.name for p in paths] == ["tiny.json", "tiny.md", "tiny-throughput.png", "tiny-overhead.png"]
    record = json.loads(paths[0].read_text())
    assert record["schema"] == SCHEMA
    # Timed at the precision in force; the cross-method check at the highest, where it means float32 rounding.
    assert record["precision"] == matmul_precision()
    assert record["check_precision"]["matmul_precision"] == "highest"
    for key in ("platform", "name", "device_kind", "device_count", "host_cpu", "host_cores", "memory_bytes"):
        assert key in record["device"]
    assert record["software"]["jax"] == jax.__version__ and record["software"]["jaxlib"]
    assert record["software"]["torch"] is None  # PyTorch was not timed, so not even imported
    assert record["matmul_peak"]["jax"]["flops_per_s"] > 0
    assert len(record["matmul_peak"]["jax_runs"]) == 3  # before the first model and after each
    assert record["epochs"] == []
    rows = record["results"]
    assert {(r["model"], r["batch_size"], r["method"]) for r in rows if r["framework"] == "jax"} == {
        (m, 5, meth) for m in ("mlp", "fc_nobias") for meth in METHODS}
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("compile_s", "step_s", "step_s_min", "repeats", "examples_per_s", "flops",
                    "flops_per_s", "fraction_of_peak", "peak_memory_bytes", "max_rel_diff_vs_batched"):
            assert isinstance(r[key], (int, float)) and r[key] >= 0, (key, r)
        assert r["step_s_min"] <= r["step_s"]
        assert r["examples_per_s"] == pytest.approx(r["batch_size"] / r["step_s"])
        assert r["max_rel_diff_vs_batched"] < 1e-5
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths[1].read_text()
    assert "## mlp" in md and "## fc_nobias" in md and "## Targets" in md
    assert "checked against `batched` at `highest`" in md


def test_record_flops_for_mlp_follow_the_hand_count(tiny_record):
    model, params = init("mlp")
    rows = {(r["batch_size"], r["method"]): r for r in tiny_record["results"] if r["model"] == "mlp"}
    assert mlp_hand_flops(5) <= rows[5, "batched"]["flops"] <= 1.02 * mlp_hand_flops(5)
    # the chunked and loop methods do per_example's arithmetic, counted once per example
    assert rows[5, "per_example_chunked"]["flops"] == rows[5, "per_example"]["flops"]
    assert rows[5, "loop"]["flops"] == rows[5, "per_example"]["flops"]


def test_cases_too_big_for_memory_are_skipped_with_the_reason():
    config = BenchConfig(models=("mlp",), batch_sizes=(2,), methods=("batched", "loop"), memory_fraction=1e-9,
                         loop_max_batch=1, **TINY)
    memory, loop = run_benchmarks(config)["results"]
    assert memory["status"] == "skipped" and "GiB" in memory["reason"]
    # and the Python loop above --loop-max-batch, before compiling anything
    assert loop["status"] == "skipped" and loop["reason"] == "the Python loop runs up to batch 1"


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("shapes do not match"))


@pytest.mark.parametrize("field, value, message", [
    ("models", ("resnet",), "unknown model 'resnet'"),
    ("batch_sizes", (32, 0), "^batch_sizes must be 1 or more, got 0$"),
    ("batch_sizes", (2.5,), "batch_sizes expected a whole number, got 2.5"),
    ("batch_sizes", (), "batch_sizes must list at least one batch size"),
    ("methods", ("magic",), "unknown method 'magic'"),
    ("torch_threads", (0,), "^torch_threads must be 1 or more, got 0$"),
    ("epochs", ("no-such-recipe",), "unknown recipe"),
    ("memory_fraction", 2.0, "^memory_fraction must be 1 or less, got 2$"),
    ("chunk", 0, "^chunk must be 1 or more, got 0$"),
])
def test_bad_configs_fail_before_compiling(field, value, message):
    with pytest.raises(JaxbatchError, match=message):
        validate(BenchConfig(**{field: value}))


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet"], "unknown model 'resnet'; choose one of: mlp"),
    (["--batch-sizes", "32,0"], "argument --batch-sizes: must be 1 or more, got 0"),
    (["--batch-sizes", "8,big"], "argument --batch-sizes: expected comma-separated int values, got '8,big'"),
    (["--batch-sizes", "0,4"], "argument --batch-sizes: must be 1 or more, got 0"),
    (["--memory-fraction", "2"], "argument --memory-fraction: must be 1 or less, got 2"),
    (["--memory-fraction", "0"], "argument --memory-fraction: must be greater than 0, got 0"),
    (["--min-time", "-1"], "argument --min-time: must be 0 or more, got -1"),
    (["--devices", "0"], "argument --devices: impossible device count '0': must be 1 or more, got 0"),
    (["--epochs", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
])
def test_cli_errors_are_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "results"
    try:
        code = main(["bench", "--out", str(out), *argv])
    except SystemExit as stop:  # argparse's errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not out.exists()


def test_empty_tuples_mean_none_and_quick_sets_its_values():
    from jaxbatch.bench.run import QUICK
    from jaxbatch.cli import build_parser
    from jaxbatch.cli.bench import build_config

    validate(BenchConfig(models=("mlp",), torch_threads=(), devices=(), epochs=()))
    config = build_config(build_parser().parse_args(["bench", "--quick", "--epochs", "none", "--min-time", "0"]))
    assert config.epochs == () and config.min_time_s == 0 and config.batch_sizes == QUICK["batch_sizes"]
    assert build_config(build_parser().parse_args(["bench"])) == BenchConfig()


def test_cli_writes_json_markdown_and_plots(tmp_path, capsys):
    # --devices 1: the scaling section's path through the command line, on the one device
    # this process has (tests/test_bench_devices.py: K = 2 in a child process).
    code = main(["bench", "--models", "mlp", "--batch-sizes", "2", "--methods", "batched,per_example",
                 "--min-repeats", "1", "--min-time", "0.001", "--epochs", "none", "--quiet", "--devices", "1",
                 "--out", str(tmp_path), "--name", "t"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-overhead.png", "t-throughput.png", "t.json", "t.md"]
    out = capsys.readouterr().out
    assert "per-example gradients / batched gradient" in out
    record = report.load_record(tmp_path / "t.json")
    assert [r["method"] for r in record["results"]] == ["batched", "per_example"]
    assert record["settings"]["devices"] == [1] and record["scaling"]["devices"] == [1]
    assert [(r["method"], r["mode"], r["devices"], r["efficiency"]) for r in record["scaling"]["rows"]] == [
        (m, mode, 1, 1.0) for m in ("batched", "per_example") for mode in ("weak", "strong")]
    assert all(r["max_rel_diff_vs_batched"] < 1e-5 for r in record["scaling"]["rows"])
    md = (tmp_path / "t.md").read_text()
    assert "## Scaling across devices" in md and "| mlp | per_example | 2 | strong | 1 | 2 | 2 |" in md
    assert "host devices (JAX_NUM_CPU_DEVICES) share the same cores, so CPU figures check the harness" in md


def test_load_record_refuses_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    with pytest.raises(JaxbatchError, match="not a jaxbatch bench result"):
        report.load_record(path)


def _row(model, b, method, step_s, framework="jax", **extra):
    return dict(framework=framework, model=model, batch_size=b, method=method, status="ok", step_s=step_s,
                step_s_min=extra.pop("step_s_min", step_s), **extra)


def test_targets_are_read_from_the_right_rows():
    record = {"device": {"platform": "cpu", "name": "test CPU"}, "results": [
        _row("mlp", 256, "batched", 2e-3, fraction_of_peak=0.8), _row("mlp", 256, "vmap", 2.2e-3),
        _row("mlp", 256, "per_example", 2.4e-3, step_s_min=2.1e-3), _row("mlp", 8, "vmap", 9e-3), _row("mlp", 8, "batched", 1e-3),
        _row("mlp", 256, "per_example", 48e-3, "torch"), _row("mlp", 256, "batched", 1e-3, "torch")]}
    targets = {t["target"].split(",")[0]: t for t in report.check_targets(record)}
    vmap = targets["mlp: vmap-mean step / batched step"]
    assert vmap["measured"] == pytest.approx(1.1) and vmap["met"] is False  # B = 8 is not counted
    assert targets["mlp: per-example gradients / batched gradient"]["measured"] == pytest.approx(1.2)
    assert targets["mlp: per-example gradients / batched gradient"]["met"] is True
    assert targets["mlp: per-example gradients / batched gradient"]["measured_min"] == pytest.approx(1.05)
    assert targets["mlp: per-example gradients"]["measured"] == pytest.approx(20.0)  # over torch.func
    assert targets["mlp: batched step"]["met"] is False  # torch twice as fast
    assert targets["mlp: batched step FLOP/s / measured matmul peak"]["met"] is True


def test_device_slug_names_the_device():
    assert device_slug({"platform": "cpu", "name": "AMD EPYC", "host_cores": 2}) == "cpu-amd-epyc-2core"
    assert device_slug({"platform": "gpu", "name": "NVIDIA H100 80GB HBM3"}) == "gpu-nvidia-h100-80gb-hbm3"


def test_missing_dataset_skips_the_epoch(tmp_path):
    row = run_epoch("mlp-fashion", str(tmp_path))
    assert row["status"] == "skipped" and "fashion_mnist" in row["reason"]


@pytest.mark.realdata
def test_epoch_on_real_data(real_data_dir):
    row = run_epoch("mlp-fashion", str(real_data_dir))
    assert row["status"] == "ok" and row["train_examples"] == 60_000
    assert row["examples_per_s"] == pytest.approx(60_000 / row["epoch_s"])
    assert row["test_accuracy"] > 0.75


# ---- the PyTorch twins (skipped without PyTorch) ------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet5", "fc_nobias"])
def test_torch_twins_compute_the_jax_gradient(name):
    torch = pytest.importorskip("torch")
    from jaxbatch.bench import torch_twins as tt

    model, params = init(name)
    xs, ys = batch(name, 4)
    shape = IMAGE_SHAPES[name]
    dev = torch.device("cpu")
    twin = tt.torch_twin(name, params, shape, dev)
    x, y = tt.to_torch_batch(xs, ys, dev)
    np.testing.assert_allclose(twin(x).detach().numpy(), model.apply(params, xs), rtol=1e-4, atol=1e-5)
    reference = make_step("batched", model.apply)(params, xs, ys)["params"]
    # PyTorch in float32 on the CPU; JAX at its default, which is TF32 on an NVIDIA GPU (unit roundoff
    # 2^-11 ~ 4.9e-4): there the conv models' gradients differ by about 1e-3.
    tolerance = 2e-3 if tt.tf32_like_jax() else 1e-4
    for method in tt.TORCH_METHODS:
        grads = tt.grads_to_jax_layout(name, twin, tt.make_torch_step(method, twin)(x, y), shape)
        assert rel_diff(grads, reference) < tolerance, method


def test_twins_take_tf32_where_jax_does(monkeypatch):
    from jaxbatch.bench import torch_twins as tt

    assert tt.tf32_like_jax() is (jax.default_backend() == "gpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert tt.tf32_like_jax() is True
    with highest_precision():
        assert tt.tf32_like_jax() is False
    with jax.default_matmul_precision("float32"):
        assert tt.tf32_like_jax() is False
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert tt.tf32_like_jax() is False


def test_torch_rows_sit_beside_the_jax_rows():
    torch = pytest.importorskip("torch")
    config = BenchConfig(models=("cnn",), batch_sizes=(2,), methods=("batched", "per_example"), torch=True,
                         torch_threads=(1, 2), **TINY)
    record = run_benchmarks(config)
    rows = {(r["framework"], r["method"]): r for r in record["results"]}
    assert set(rows["torch", "batched"]["step_s_by_threads"]) == {"1", "2"}
    assert rows["torch", "batched"]["torch_threads"] in (1, 2)
    assert set(rows) == {(f, m) for f in ("jax", "torch") for m in ("batched", "per_example")}
    assert rows["torch", "per_example"]["max_rel_diff_vs_batched"] < 1e-4
    assert rows["torch", "batched"]["flops"] == rows["jax", "batched"]["flops"]
    assert record["matmul_peak"]["torch"]["flops_per_s"] > 0
    assert record["software"]["torch"] == torch.__version__
    assert "torch / jax" in report.to_markdown(record)
