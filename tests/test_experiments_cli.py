"""`jaxbatch experiment`: bad input ends in one line and nothing written; the
scripts under scripts/ are the same command."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from jaxbatch.cli import main
from jaxbatch.experiments import EXPERIMENTS, make_config
from jaxbatch.experiments.report import write_results
from jaxbatch.errors import JaxbatchError

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv) -> str:
    """Run the command; it must exit 2 with one line on stderr (argparse raises
    SystemExit, the library's errors come back as the return code)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["experiment", "nope", "--quick"], "invalid choice: 'nope'"),
    (["experiment", "equality", "--quick", "--models", "mlp,resnet"], "unknown model 'resnet'"),
    (["experiment", "variance", "--quick", "--model", "resnet"], "unknown model 'resnet'"),
    (["experiment", "lr-scaling", "--quick", "--batch-sizes", "32,5000"],
     "batch size 5000 is larger than the 1347 training examples of digits"),
    (["experiment", "equality", "--quick", "--batch-size", "2000"],
     "batch size 2000 is larger than the 1347 training examples"),
    (["experiment", "variance", "--quick", "--batch-sizes", "1,2048"], "batch size 2048 is larger"),
    (["experiment", "input-scale", "--quick", "--batch-size", "1348"], "batch size 1348 is larger"),
    (["experiment", "activations", "--quick", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["experiment", "variance", "--quick", "--batch-sizes", "1,x"], "expected comma-separated int values"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    err = one_line_error(capsys, [*argv, "--out", str(out)])
    assert message in err
    assert not out.exists()


def test_output_folder_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    err = one_line_error(capsys, ["experiment", "activations", "--quick", "--out", str(target)])
    assert "is a file" in err
    assert target.read_text() == "not a folder"
    err = one_line_error(capsys, ["experiment", "activations", "--quick", "--out", str(target / "below")])
    assert "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failing_plot_leaves_nothing_behind(tmp_path):
    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_results(tmp_path, {"x": 1.0}, {"broken": Broken()})
    assert list(tmp_path.iterdir()) == []
    # All or nothing: an earlier run's result.json is not replaced by half of a new run.
    write_results(tmp_path, {"x": 1.0}, {})
    with pytest.raises(RuntimeError):
        write_results(tmp_path, {"x": 2.0}, {"broken": Broken()})
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert json.loads((tmp_path / "result.json").read_text()) == {"x": 1.0}


def test_result_json_has_no_nan(tmp_path):
    write_results(tmp_path, {"loss": float("nan"), "values": [1.0, float("inf")]}, {})
    assert json.loads((tmp_path / "result.json").read_text()) == {"loss": None, "values": [1.0, None]}


def test_quick_run_prints_a_table_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "act"
    assert main(["experiment", "activations", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max|two - one|" in printed and "float64" in printed
    assert sorted(p.name for p in out.iterdir()) == ["activations.png", "result.json"]
    assert json.loads((out / "result.json").read_text())["config"]["dataset"] == "digits"


def test_flags_override_the_quick_preset():
    config = make_config("lr-scaling", quick=True, batch_sizes=(16, 64), epochs=None)
    assert config.dataset == "digits" and config.batch_sizes == (16, 64) and config.epochs == 4
    assert make_config("lr-scaling").dataset == "fashion_mnist"
    with pytest.raises(JaxbatchError, match="no setting 'batch'"):
        make_config("lr-scaling", batch=3)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_has_a_script(name, monkeypatch, capsys):
    script = ROOT / "scripts" / f"experiment_{name.replace('-', '_')}.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert f"jaxbatch experiment {name}" in capsys.readouterr().out


def test_script_runs_as_a_program(tmp_path):
    out = tmp_path / "act"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "experiment_activations.py"),
                           "--quick", "--quiet", "--out", str(out), "--grid-points", "11"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "result.json").read_text())["config"]["grid_points"] == 11
