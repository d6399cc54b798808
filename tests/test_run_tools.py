"""Around a run: `jaxbatch info`, TensorBoard event files in the run folder,
`jaxbatch plot` and `train --plot`, and `train --config` reproducing a run
from its config.json. Offline; the runs are two-epoch mlp runs on digits."""

import json
import struct
import warnings

import pytest
from cli_helpers import cli, one_error_line

from jaxbatch.cli import main

QUICK = ["--quiet", "--epochs", "2"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The README's two runs: the vmap loss and the batched one."""
    base = tmp_path_factory.mktemp("runs")
    vmap, batched = base / "vmap", base / "batched"
    assert main(["train", *QUICK, "--out", str(vmap)]) == 0
    assert main(["train", *QUICK, "--loss", "batched", "--out", str(batched)]) == 0
    return vmap, batched


# ---- jaxbatch info ----------------------------------------------------------------


def test_info_on_cpu_names_versions_devices_precision_extras_and_data(capsys):
    assert cli("info") == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) <= 25, "one screen"
    assert lines[0].startswith("jaxbatch ") and "jax " in lines[0] and "flax " in lines[0] and "optax " in text
    assert "backend cpu: 1 x cpu" in text
    assert "float32 matmul precision: default = float32" in text
    for extra in ("dp", "torch", "tfds", "tensorboard", "notebook"):
        assert any(line.split()[:1] == [extra] for line in lines), extra
    assert "($JAXBATCH_DATA_DIR) (does not exist)" in text  # conftest's empty data folder
    assert "digits         bundled with jaxbatch" in text and "mnist          not here" in text


def test_info_json_and_what_it_checks_of_data_files(tmp_path, capsys):
    from jaxbatch.data import get_spec

    folder = tmp_path / "mnist"
    folder.mkdir()
    for remote in get_spec("mnist").downloads:  # official names and sizes, wrong bytes
        with open(folder / remote.name, "wb") as f:
            f.truncate(remote.size)
    assert cli("info", "--json", "--data-dir", str(tmp_path)) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "cpu" and info["devices"]["count"] == 1
    assert info["precision"]["matmul_precision"] == "default"
    assert set(info["versions"]) >= {"jaxbatch", "jax", "jaxlib", "flax", "optax"}
    assert info["extras"]["dp"]["installed"] is True  # dp-accounting is a base dependency
    mnist = info["data"]["datasets"]["mnist"]
    assert mnist["present"] and "by name and size" in mnist["checked"]  # sizes only: no hashing by default
    assert cli("info", "--json", "--sha256", "--data-dir", str(tmp_path)) == 0
    mnist = json.loads(capsys.readouterr().out)["data"]["datasets"]["mnist"]
    assert mnist["checked"].startswith("SHA-256 differs: train-images-idx3-ubyte.gz")


def test_info_says_when_the_tensorboard_writer_is_missing(monkeypatch, capsys):
    import jaxbatch.cli.info as info

    real = info.package_version
    monkeypatch.setattr(info, "package_version", lambda name: None if name == "tensorboardX" else real(name))
    assert cli("info") == 0
    line = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["tensorboard"]][0]
    assert "not installed" in line and "pip install tensorboardX" in line


# ---- TensorBoard events -------------------------------------------------------------


def test_a_run_writes_event_files_holding_its_epochs(two_runs):
    tensorboardX = pytest.importorskip("tensorboardX")
    from tensorboardX.record_writer import masked_crc32c

    from jaxbatch.events import event_files, read_scalars

    run = two_runs[0]
    files = event_files(run)
    assert len(files) == 1
    data = files[0].read_bytes()  # TFRecord framing with valid CRCs, as TensorBoard's reader demands
    at = 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        body = data[at + 12:at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(body)
        at += 16 + length
    assert tensorboardX.__version__
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(run)
    expected = {"loss/train": "train_loss", "loss/test": "test_loss", "accuracy/train": "train_accuracy",
                "accuracy/test": "test_accuracy", "learning_rate": "lr_end", "epoch_time_s": "epoch_time_s"}
    assert set(scalars) == set(expected)
    for tag, key in expected.items():
        assert [step for step, _ in scalars[tag]] == [1, 2]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_a_private_record_gives_only_what_it_holds():
    from jaxbatch.events import scalars

    record = {"epoch": 3, "steps": 99, "test_loss": 0.5, "test_accuracy": 0.9, "epoch_time_s": 1.0, "lr_end": 0.1,
              "epsilon": 1.5, "epsilon_rdp": 2.0, "delta": 1e-5, "devices": 1, "device_kind": "cpu"}
    assert set(scalars(record)) == {"loss/test", "accuracy/test", "epoch_time_s", "learning_rate",
                                    "privacy/epsilon", "privacy/epsilon_rdp"}
    nonprivate = scalars({**record, "nonprivate": {"train_loss": 0.4, "clipped_fraction": 0.3}})
    assert nonprivate["loss/train_nonprivate"] == 0.4 and nonprivate["clipping/clipped_fraction_nonprivate"] == 0.3
    assert scalars({"epoch": 1, "test_loss": 1.0, "noise_scale": 300.0})["noise_scale/B_simple"] == 300.0


def test_an_events_error_is_one_warning_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboardX")
    import tensorboardX.event_file_writer as efw

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(efw, "EventsWriter", broken)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert cli("train", *QUICK, "--out", str(out)) == 0
    assert one_error_line(capsys).startswith(f"jaxbatch train: warning: TensorBoard events in {out} stopped")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and (out / "params.msgpack").exists()


def test_resume_and_overwrite_leave_each_epoch_once_in_the_events(tmp_path):
    pytest.importorskip("tensorboardX")
    from jaxbatch.events import event_files, read_scalars
    from jaxbatch.train import Interrupted, TrainConfig, train_and_evaluate

    base = dict(epochs=2, batch_size=16, steps_per_chunk=9, out=str(tmp_path))  # 85 steps per epoch
    asked = []

    def stop_in_epoch_2():  # asked once before the first file, then after each chunk: epoch 1 has 10
        asked.append(1)
        return "SIGINT" if len(asked) == 12 else None

    with pytest.raises(Interrupted):
        train_and_evaluate(TrainConfig(**base), stop_requested=stop_in_epoch_2)
    assert [step for step, _ in read_scalars(tmp_path)["loss/test"]] == [1]
    train_and_evaluate(TrainConfig(**base, resume=True))
    assert len(event_files(tmp_path)) == 1  # epoch 1's event rewritten from metrics.jsonl, then epoch 2
    assert [step for step, _ in read_scalars(tmp_path)["loss/test"]] == [1, 2]
    train_and_evaluate(TrainConfig(**{**base, "epochs": 1}, overwrite=True))
    assert [step for step, _ in read_scalars(tmp_path)["loss/test"]] == [1]  # the replaced run's events went


def test_without_tensorboardx_a_run_writes_no_events(tmp_path, monkeypatch, capsys):
    from jaxbatch import events

    monkeypatch.setattr(events, "writer_version", lambda: None)
    out = tmp_path / "run"
    assert cli("train", *QUICK, "--out", str(out)) == 0
    assert capsys.readouterr().err == "" and events.event_files(out) == []
    assert (out / "params.msgpack").exists()


# ---- jaxbatch plot, train --plot -----------------------------------------------------------


def test_plot_compares_runs_named_by_their_settings(two_runs, tmp_path, capsys):
    from jaxbatch.curves import labels, read_run

    assert labels([read_run(r) for r in two_runs]) == ["loss=vmap", "loss=batched"]
    assert labels([read_run(two_runs[0])]) == [str(two_runs[0])]
    png = tmp_path / "compare.png"
    assert cli("plot", *map(str, two_runs), "--out", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {png}"


def test_a_private_run_plots_only_the_lines_it_holds(tmp_path):
    from jaxbatch.curves import draw, read_run

    run = tmp_path / "private"
    run.mkdir()
    records = [{"epoch": e, "test_loss": 1.0 / e, "test_accuracy": 0.9, "epsilon": 0.5 * e, "delta": 1e-5}
               for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = draw([read_run(run)])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [f"{run} test"]  # no "train" entry for lines that are not there
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "epsilon (PLD)"]


@pytest.mark.parametrize("case,message", [
    ("no metrics", "holds no metrics.jsonl"),
    ("torn", "metrics.jsonl, line 2: not an epoch record"),
    ("not png", "name a .png file"),
    ("no runs", "the following arguments are required: RUN"),
])
def test_plot_bad_input_is_one_line_and_exit_2(two_runs, tmp_path, capsys, case, message):
    run = tmp_path / "run"
    run.mkdir()
    argv = ["plot", str(run)]
    if case == "torn":
        first = (two_runs[0] / "metrics.jsonl").read_text().splitlines()[0]
        (run / "metrics.jsonl").write_text(first + "\n" + first[:40])
    elif case == "not png":
        argv = ["plot", str(two_runs[0]), "--out", str(tmp_path / "x.pdf")]
    elif case == "no runs":
        argv = ["plot"]
    assert cli(*argv) == 2
    assert message in one_error_line(capsys)
    assert not list(tmp_path.rglob("*.png"))


def test_train_plot_draws_the_runs_own_curves(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", *QUICK, "--plot", "--out", str(out)) == 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert f"curves in {out / 'curves.png'}" in capsys.readouterr().out


# ---- train --config ------------------------------------------------------------------------


def test_a_run_reproduced_from_its_config_json_ends_with_the_same_params(two_runs, tmp_path, monkeypatch):
    original = two_runs[1]  # the batched run: a setting the default does not have
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--quiet", "--config", str(original / "config.json")) == 0
    copy = tmp_path / "runs" / "mlp-digits" / "1"  # a new folder: the file's out is not taken
    assert (copy / "params.msgpack").read_bytes() == (original / "params.msgpack").read_bytes()
    a, b = (json.loads((run / "config.json").read_text()) for run in (original, copy))
    assert {k: v for k, v in a.items() if k not in ("out", "environment")} == \
        {k: v for k, v in b.items() if k not in ("out", "environment")}


def test_flags_beside_config_override_it_and_out_resume_overwrite_are_not_taken(two_runs, tmp_path, monkeypatch):
    from jaxbatch.cli import build_parser
    from jaxbatch.cli.train import build_config

    saved = json.loads((two_runs[1] / "config.json").read_text())
    saved.update(resume=True, overwrite=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    config = build_config(build_parser().parse_args(["train", "--config", str(path), "--epochs", "1"]))
    assert (config.loss, config.epochs, config.resume, config.overwrite) == ("batched", 1, False, False)
    assert config.out == "runs/mlp-digits/1"
    from jaxbatch.errors import JaxbatchError

    with pytest.raises(JaxbatchError, match="pass one of them"):
        build_config(build_parser().parse_args(["train", "--config", str(path), "--recipe", "mlp-fashion"]))


@pytest.mark.parametrize("content,message", [
    ('{"model": "mlp", "learning_rate": 0.1}', "unknown setting 'learning_rate'"),
    ("[1, 2]", "holds no settings"),
    ("{torn", "is not JSON"),
    (None, "No such file or directory"),
    ('{"lr": -1}', "--lr must be greater than 0"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    assert cli("train", "--quiet", "--config", str(path), "--out", str(tmp_path / "run")) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
