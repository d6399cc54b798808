"""Bad input that used to end in a traceback, an abort or silent nonsense:
each is now one line naming the problem, a non-zero exit, and nothing written."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import serialization

from jaxbatch import TrainConfig, train_and_evaluate
from jaxbatch.cli import main
from jaxbatch.precision import relative_difference


def status_and_error(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # refused by the flag parser
        status = exit_.code
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv,message", [
    (["train", "--dp-clip", "1", "--dp-noise", "1e300"], "--dp-noise must be between 0.3 and 10000, got 1e+300"),
    (["train", "--dp-clip", "1", "--dp-noise", "1e-300"], "--dp-noise must be between 0.3 and 10000, got 1e-300"),
    (["train", "--dp-clip", "inf"], "--dp-clip: expected a finite number, got inf"),
    (["train", "--dp-clip", "1", "--dp-noise", "inf"], "--dp-noise: expected a finite number, got inf"),
    (["train", "--schedule", "warmup", "--warmup-steps", "1000000", "--epochs", "1"],
     "--warmup-steps 1000000 is as long as the run (43 steps) or longer"),
    (["bench", "--quick", "--models", "mlp", "--name", "../../x"], "--name '../../x' is not a file name"),
    (["bench", "--quick", "--models", "mlp", "--name", "sub/dir/x"], "--name 'sub/dir/x' is not a file name"),
    (["bench", "--quick", "--models", "mlp", "--out", "{file}"], "is a file, not a folder; pass --out a folder"),
    (["experiment", "equality", "--quick", "--out", "{file}/x"], "sits under"),
    (["experiment", "equality", "--models", ","], "--models: must list at least one model"),
    # an empty --out is refused everywhere, not read as "the default folder"
    (["experiment", "equality", "--quick", "--out", ""], "--out is empty; name a folder"),
    (["bench", "--quick", "--models", "mlp", "--out", ""], "--out is empty; name a folder"),
    (["plot", "{file}", "--out", ""], "--out is empty; name a .png file"),
])
def test_refused_before_any_work_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    argv = [a.format(file=tmp_path / "afile") for a in argv]
    status, err = status_and_error(capsys, *argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else []))
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written, inside or out
    assert (tmp_path / "afile").read_text() == "x"


def test_a_last_batch_of_one_gives_no_nan_noise_scale():
    # digits: 1347 = 2 * 673 + 1, so every epoch's last batch holds one example
    result = train_and_evaluate(TrainConfig(batch_size=673, epochs=2, log_noise_scale=True, noise_scale_every=1))
    for record in result.history:
        assert math.isfinite(record["noise_scale"]) and record["noise_scale"] > 0
        assert record["noise_scale_steps"] == 2  # the one-example step adds nothing


# Adam aside: Optax computes its bias correction 1 - beta^t in JAX's default
# float (optax.tree.bias_correction raises a Python beta to an int32 count),
# float64 under JAX_ENABLE_X64, so an Adam run's float32 parameters differ there
# in their last bits (3e-5 relative after this epoch, measured); still float32.
@pytest.mark.parametrize("flags,same", [
    ([], "bytes"), (["--dp-clip", "0.5", "--dp-noise", "1"], "bytes"),
    (["--optimizer", "adam", "--lr", "1e-3"], "last bits"),
])
def test_jax_enable_x64_trains_a_float32_run_to_the_same_numbers(tmp_path, flags, same):
    # JAX_ENABLE_X64 makes JAX's default float float64; the run's own numbers stay float32
    proc = subprocess.run([sys.executable, "-m", "jaxbatch", "train", "--quiet", "--epochs", "1", *flags,
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["train", "--quiet", "--epochs", "1", *flags, "--out", str(tmp_path / "plain")]) == 0
    x64, plain = ((tmp_path / name / "params.msgpack").read_bytes() for name in ("run", "plain"))
    assert {leaf.dtype for leaf in jax.tree.leaves(serialization.msgpack_restore(x64))} == {np.dtype("float32")}
    if same == "bytes":
        assert x64 == plain
    else:
        assert relative_difference(serialization.msgpack_restore(x64), serialization.msgpack_restore(plain)) < 1e-3


@pytest.mark.parametrize("command,name", [
    (["experiment", "activations", "--quick", "--quiet"], "result.json"),
    (["bench", "--quick", "--quiet", "--models", "mlp", "--methods", "batched", "--batch-sizes", "4", "--no-plots",
      "--name", "r"], "r.json"),
])
def test_a_full_disk_when_results_are_written_is_one_line(tmp_path, capsys, monkeypatch, command, name):
    from jaxbatch import atomic

    def full(tmp):
        raise OSError(28, "No space left on device", str(tmp))

    import jaxbatch.bench.report as bench_report
    import jaxbatch.experiments.report as experiment_report

    real = atomic.write_all_atomic
    for module in (atomic, experiment_report, bench_report):  # the reports hold their own names for it
        monkeypatch.setattr(module, "write_all_atomic", lambda writes: real({path: full for path in writes}))
    status, err = status_and_error(capsys, *command, "--out", str(tmp_path / "out"))
    assert status == 1 and len(err) == 1, err
    assert f"{tmp_path / 'out' / name}: No space left on device" in err[0], err
    assert not (tmp_path / "out").exists()  # nothing half-written, and not the folder made for it
