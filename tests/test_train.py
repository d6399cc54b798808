import json

import jax
import numpy as np
import pytest
from flax import serialization

from jaxbatch import train
from jaxbatch.errors import JaxbatchError
from jaxbatch.precision import relative_difference as rel_diff
from jaxbatch import Diverged, TrainConfig, get_model, init_key, init_params, train_and_evaluate


def test_default_training_on_digits_reaches_090(tmp_path):
    result = train_and_evaluate(TrainConfig(out=str(tmp_path)))
    accuracies = [r["test_accuracy"] for r in result.history]
    assert len(accuracies) == 10
    assert accuracies[-1] >= 0.9
    assert accuracies[-1] > accuracies[0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 11))
    saved = serialization.from_bytes(result.params, (tmp_path / "params.msgpack").read_bytes())
    assert rel_diff(saved, result.params) == 0.0
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "mlp"


def test_same_seed_same_numbers_and_other_seed_other_numbers():
    config = TrainConfig(epochs=2)
    a, b = train_and_evaluate(config), train_and_evaluate(config)
    assert [r["test_loss"] for r in a.history] == [r["test_loss"] for r in b.history]
    assert rel_diff(a.params, b.params) == 0.0
    c = train_and_evaluate(TrainConfig(epochs=2, seed=1))
    assert rel_diff(c.params, a.params) > 1e-3


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_vmap_and_batched_training_end_equal(model):
    kw = dict(model=model, epochs=1, batch_size=50)
    vmapped = train_and_evaluate(TrainConfig(loss="vmap", **kw))
    batched = train_and_evaluate(TrainConfig(loss="batched", **kw))
    assert rel_diff(vmapped.params, batched.params) < 1e-5


def test_last_partial_batch_counts_every_example_once():
    # 1347 digits in batches of 100: 13 full batches and one of 47.
    result = train_and_evaluate(TrainConfig(epochs=2, batch_size=100))
    assert [r["examples_seen"] for r in result.history] == [1347, 1347]
    assert [r["steps"] for r in result.history] == [14, 28]


def test_max_steps_stops_mid_epoch():
    result = train_and_evaluate(TrainConfig(epochs=5, batch_size=100, max_steps=20))
    assert [r["steps"] for r in result.history] == [14, 20]
    assert result.history[-1]["examples_seen"] == 600


def test_sum_loss_with_lr_over_b_equals_mean_loss_with_lr():
    # text E: `param -= lr * grad / batch_size` on the summed loss is SGD with lr on the mean loss
    kw = dict(model="mlp_scratch", epochs=1, batch_size=64, momentum=0.0)
    summed = train_and_evaluate(TrainConfig(loss_reduction="sum", lr=0.1 / 64, **kw))
    mean = train_and_evaluate(TrainConfig(loss_reduction="mean", lr=0.1, **kw))
    # The last batch holds 1347 - 21 * 64 = 3 examples: lr / 64 on its sum is not lr on its mean,
    # so compare with max_steps on whole batches only.
    kw["max_steps"] = 21
    summed = train_and_evaluate(TrainConfig(loss_reduction="sum", lr=0.1 / 64, **kw))
    mean = train_and_evaluate(TrainConfig(loss_reduction="mean", lr=0.1, **kw))
    assert rel_diff(summed.params, mean.params) < 1e-5
    assert summed.history[-1]["train_loss"] == pytest.approx(mean.history[-1]["train_loss"], rel=1e-5)


def test_given_params_replace_the_initialisation():
    config = TrainConfig(epochs=1)
    params = init_params(get_model(config.model), init_key(config.seed), (8, 8, 1))
    scaled = jax.tree.map(lambda p: p * 0.0, params)
    result = train_and_evaluate(config, params=scaled)
    # all-zero weights: the hidden layer stays dead and only the output bias learns
    assert float(np.abs(result.params["params"]["hidden"]["kernel"]).max()) == 0.0


def test_divergence_stops_with_one_clear_error(tmp_path):
    # text C's failure mode: inputs x255 with a learning rate meant for [0, 1] inputs
    config = TrainConfig(model="fc_nobias", input_scale=255.0, lr=0.05, momentum=0.9, batch_size=250, epochs=3,
                         out=str(tmp_path / "run"))
    with pytest.raises(Diverged) as info:
        train_and_evaluate(config)
    err = info.value
    assert err.epoch == 1 and err.step >= 1
    message = str(err)
    assert "\n" not in message and "diverged at epoch 1" in message and "--lr" in message
    assert not (tmp_path / "run" / "params.msgpack").exists()


@pytest.mark.parametrize("change,match", [
    (dict(batch_size=5000), "larger than the 1347 training examples"),
    (dict(model="lenet5"), "32x32"),
    (dict(lr=-0.1), "learning rate"),
    (dict(batch_size=0), "batch_size must be 1 or more"),
    (dict(record_steps=-1), "record_steps must be 0 or more"),
    (dict(schedule="warmup"), "warmup_steps of 1 or more"),
    (dict(loss="perexample"), "unknown loss mode"),
    (dict(dataset="imagenet"), "unknown dataset"),
])
def test_bad_settings_raise_before_anything_is_written(tmp_path, change, match):
    out = tmp_path / "run"
    with pytest.raises(JaxbatchError, match=match):
        train_and_evaluate(TrainConfig(out=str(out), **change))
    assert not out.exists()


def test_output_folder_that_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    with pytest.raises(JaxbatchError, match="is a file"):
        train_and_evaluate(TrainConfig(out=str(f), epochs=1))
    assert f.read_text() == "keep me"


def test_standardize_and_schedules_train():
    result = train_and_evaluate(TrainConfig(epochs=3, standardize=True, schedule="warmup-cosine",
                                            warmup_steps=20, optimizer="adamw", lr=3e-3, weight_decay=1e-4))
    assert result.history[-1]["test_accuracy"] >= 0.9
    assert result.history[-1]["lr_end"] < 3e-3


def test_nan_loss_is_divergence_too():
    config = TrainConfig(model="mlp", lr=1e30, epochs=1, max_loss=float("inf"))
    with pytest.raises(Diverged) as info:
        train_and_evaluate(config)
    assert not np.isfinite(info.value.loss)


def test_chunk_plan_is_decided_by_the_backend():
    from jaxbatch.train import chunk_plan

    # XLA:CPU: a model with a convolution scans 8 steps at a time, unrolled (jaxbatch/backends.py)
    assert chunk_plan(TrainConfig(model="cnn"), 1200, True, backend="cpu") == (8, True)
    assert chunk_plan(TrainConfig(), 235, False, backend="cpu") == (24, False)
    # GPU and TPU: the plain path, rolled scans of about a tenth of an epoch
    for backend in ("gpu", "tpu"):
        assert chunk_plan(TrainConfig(model="cnn"), 1200, True, backend=backend) == (120, False)
    assert chunk_plan(TrainConfig(unroll=False, steps_per_chunk=50), 1200, True, backend="cpu") == (50, False)
    assert chunk_plan(TrainConfig(steps_per_chunk=500), 43, False) == (43, False)


def test_models_with_a_convolution_are_found_from_their_program():
    import jax.numpy as jnp

    from jaxbatch.backends import has_convolution
    from jaxbatch.models import MODELS, get_model

    found = {}
    for name in MODELS:
        shape = (32, 32, 1) if name == "lenet5" else (28, 28, 1)
        model = get_model(name)
        params = init_params(model, init_key(0), shape)
        found[name] = has_convolution(model.apply, params, jnp.zeros(shape))
    assert found == {"mlp": False, "mlp_scratch": False, "cnn": True, "cnn_tanh": True, "lenet5": True,
                     "fc_nobias": False}


def test_unrolled_and_rolled_chunks_compute_the_same_training():
    kw = dict(model="cnn", epochs=1, batch_size=64, max_steps=12)
    rolled = train_and_evaluate(TrainConfig(unroll=False, steps_per_chunk=5, **kw))
    unrolled = train_and_evaluate(TrainConfig(unroll=True, steps_per_chunk=4, **kw))
    assert rel_diff(rolled.params, unrolled.params) < 1e-6
    assert rolled.history[-1]["examples_seen"] == unrolled.history[-1]["examples_seen"] == 12 * 64


def test_a_one_step_chunk_runs_its_step_outside_any_loop(monkeypatch):
    # lax.scan keeps a while loop for a single step, even unrolled, and XLA:CPU runs
    # convolutions inside loop bodies about 10x slower (backends.py): one-step chunks
    # (--steps-per-chunk 1, --eval-every 1 or a prime above 8) must not loop.
    programs, run_chunk = [], train.run_chunk

    def lowered(*args, **kwargs):  # the chunk's program, read before the call donates the state
        programs.append((len(args[2]), kwargs["unroll"], "while" in run_chunk.lower(*args, **kwargs).as_text()))
        return run_chunk(*args, **kwargs)

    monkeypatch.setattr(train, "run_chunk", lowered)
    kw = dict(model="cnn", epochs=1, batch_size=64, max_steps=4)
    one = train_and_evaluate(TrainConfig(steps_per_chunk=1, **kw))
    assert set(programs) == {(1, True, False)}
    programs.clear()
    rolled = train_and_evaluate(TrainConfig(steps_per_chunk=2, unroll=False, **kw))
    assert set(programs) == {(2, False, True)}  # the check sees a loop where there is one
    assert rel_diff(one.params, rolled.params) < 1e-6


def test_a_second_identical_run_and_a_learning_rate_sweep_compile_nothing():
    config = TrainConfig(epochs=1, batch_size=64)
    train_and_evaluate(config)
    sizes = (train.run_chunk._cache_size(), train.evaluate_split._cache_size())
    train_and_evaluate(config)
    train_and_evaluate(TrainConfig(epochs=1, batch_size=64, lr=0.01, seed=3, input_scale=2.0))
    assert (train.run_chunk._cache_size(), train.evaluate_split._cache_size()) == sizes


@pytest.mark.parametrize("steps_per_chunk", [1, 3, 7])
def test_divergence_step_is_exact_whatever_the_chunk(steps_per_chunk):
    config = TrainConfig(model="fc_nobias", input_scale=255.0, lr=0.05, momentum=0.9, batch_size=50, epochs=1)
    with pytest.raises(Diverged) as reference:
        train_and_evaluate(TrainConfig(**{**config.__dict__, "steps_per_chunk": 1}))
    with pytest.raises(Diverged) as info:
        train_and_evaluate(TrainConfig(**{**config.__dict__, "steps_per_chunk": steps_per_chunk}))
    got, want = info.value, reference.value
    assert (got.epoch, got.step, got.loss, got.last_finite_loss) == (want.epoch, want.step, want.loss,
                                                                      want.last_finite_loss)
    assert want.step > 1 and want.last_finite_loss is not None


def test_progress_events_in_order():
    events = []
    train_and_evaluate(TrainConfig(epochs=2, batch_size=100), on_progress=events.append)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start"
    for epoch in (1, 2):
        mine = [e for e in events if e.get("epoch") == epoch]
        assert mine[0]["kind"] == "epoch_start" and mine[-1]["kind"] == "epoch"
        steps = [e["step"] for e in mine if e["kind"] == "chunk"]
        assert steps == sorted(steps) and steps[-1] == 14 == mine[0]["steps"]


def test_record_steps_keeps_the_first_steps_gradient_norms():
    result = train_and_evaluate(TrainConfig(model="fc_nobias", epochs=1, batch_size=100, record_steps=5))
    assert len(result.steps) == 5
    assert set(result.steps[0]["grad_norm"]) == {"hidden/kernel", "out/kernel"}
    assert all(s["grad_norm"]["hidden/kernel"] > 0 and s["loss"] > 0 for s in result.steps)
    assert train_and_evaluate(TrainConfig(epochs=1)).steps == []


def test_an_overwriting_run_removes_the_previous_runs_parameters(tmp_path):
    train_and_evaluate(TrainConfig(epochs=1, out=str(tmp_path)))
    assert (tmp_path / "params.msgpack").exists()
    with pytest.raises(Diverged):
        train_and_evaluate(TrainConfig(epochs=1, lr=1e30, max_loss=float("inf"), out=str(tmp_path), overwrite=True))
    assert not (tmp_path / "params.msgpack").exists()
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e30


def test_config_records_the_precision_and_device(tmp_path):
    train_and_evaluate(TrainConfig(epochs=1, out=str(tmp_path)))
    env = json.loads((tmp_path / "config.json").read_text())["environment"]
    assert env["backend"] == jax.default_backend() and env["matmul_precision"] == "default"
    assert env["float32_matmul_means"] and env["device_kind"]
