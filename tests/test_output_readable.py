"""Output a newcomer reads right (issue 22, item 7) and plots that show what
they say (item 8). The plots are drawn from the committed results/*.json
(no experiment is run) or from small hand-made results, and checked by their
layout: one legend, titles inside the figure, tick labels that do not overlap."""

import copy
import importlib.util
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxbatch.bench import report as bench_report
from jaxbatch.cli import StopSignals, main, suggest_flag
from jaxbatch.cli.train import bar_showing, epoch_line
from jaxbatch.experiments import clipping, equality, input_scale, lr_scaling
from jaxbatch.experiments.report import QUICK_NOTE, name_texts, text_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
BENCH = ROOT / "benchmarks" / "results" / "cpu-amd-epyc-2core.json"


def result_of(folder: str) -> dict:
    return json.loads((RESULTS / folder / "result.json").read_text())


def drawn(fig):
    """`fig` laid out and drawn by Agg; returns its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def inside(box, outer, slack=1.0) -> bool:
    return (box.x0 >= outer.x0 - slack and box.x1 <= outer.x1 + slack and box.y0 >= outer.y0 - slack
            and box.y1 <= outer.y1 + slack)


def overlapping_tick_labels(fig, renderer) -> list:
    """Pairs of visible tick labels of one axis whose boxes overlap."""
    found = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            ticks = [t for t in axis.get_majorticklabels() + axis.get_minorticklabels()
                     if t.get_visible() and t.get_text()]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ticks]
            found += [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
                      if box_a.overlaps(box_b)]
    return found


# ---- item 7: the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("typed, meant", [
    ("--learning-rate", "--lr"), ("--learning_rate", "--lr"), ("--batch_size", "--batch-size"),
    ("--num-epochs", "--epochs"), ("--n-epochs", "--epochs"), ("--output-dir", "--out"), ("--output_dir", "--out"),
    ("--epoch", "--epochs"),
])
def test_unknown_flags_suggest_the_flag_meant(typed, meant, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", typed, "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {typed} 1; did you mean {meant}?" in err
    assert len(err.strip().splitlines()) == 1


def test_a_synonym_is_suggested_only_where_its_flag_exists():
    assert suggest_flag("--learning-rate", ["--lr", "--epochs"]) == "--lr"
    assert suggest_flag("--learning-rate", ["--epochs"]) is None
    assert suggest_flag("--data_dir", ["--data-dir"]) == "--data-dir"  # "_" for "-", any flag


def test_the_stop_notice_starts_on_its_own_line_while_a_bar_shows(capfd):
    stop = StopSignals()
    try:
        stop.bar_showing = True
        stop._handle(signal.SIGINT, None)
        err = capfd.readouterr().err
        assert err.startswith("\njaxbatch: SIGINT: stopping at the next safe point")
        assert stop() == "SIGINT"
    finally:
        stop.restore()
    quiet = StopSignals()
    try:
        quiet._handle(signal.SIGTERM, None)  # no bar: no empty line before the notice
        assert capfd.readouterr().err.startswith("jaxbatch: SIGTERM: stopping")
    finally:
        quiet.restore()


def test_train_tells_the_handler_when_a_bar_shows():
    stop = StopSignals()
    try:
        args = SimpleNamespace(stop_requested=stop)
        bar_showing(args, True)
        assert stop.bar_showing
        bar_showing(args, False)
        assert not stop.bar_showing
        bar_showing(SimpleNamespace(stop_requested=lambda: None), True)  # a plain callable: nothing to tell
    finally:
        stop.restore()


def test_the_first_epoch_line_says_its_time_includes_compilation():
    event = dict(epoch=1, train_loss=0.5, train_accuracy=0.8, test_loss=0.4, test_accuracy=0.9, epoch_time_s=3.2)
    first = epoch_line(event, first=True)
    assert first.startswith("epoch   1") and "including compilation" in first
    assert "compil" not in epoch_line({**event, "epoch": 2})


def quick_record(**extra) -> dict:
    """The committed CPU benchmark cut to --quick's batch sizes, marked as a quick run."""
    record = json.loads(BENCH.read_text())
    record["results"] = [r for r in record["results"] if r["batch_size"] in (32, 256)]
    return {**record, **extra}


def test_a_quick_bench_does_not_judge_its_targets():
    full = json.loads(BENCH.read_text())
    full["load_average_start"] = [0.1, 0.1, 0.1]
    assert any("MISSED" in line for line in bench_report.format_targets(full))  # a full run judges them
    record = quick_record(quick=True, load_average_start=[0.1, 0.1, 0.1])
    lines = bench_report.format_targets(record)
    assert lines[0] == bench_report.QUICK_NOTE and "quick run: targets not judged" in lines[0]
    assert not any("MISSED" in line or " met " in f" {line} " for line in lines)
    assert sum("not judged" in line for line in lines) > 5
    md = bench_report.to_markdown(record)
    assert "quick run: targets not judged" in md and "**no**" not in md and "| yes |" not in md


def test_a_loaded_machine_is_warned_of():
    record = quick_record(quick=False, load_average_start=[4.7, 4.6, 4.4])
    record["results"][0] = {**record["results"][0], "status": "ok", "fraction_of_peak": 2.33}
    notes = bench_report.reliability_notes(record)
    assert any("busy (load average 4.7 on 2 cores" in n and "unreliable" in n for n in notes)
    assert any("above 100% of the matmul peak (up to 233%)" in n for n in notes)
    quiet = quick_record(quick=False, load_average_start=[0.2, 0.2, 0.2])
    quiet["results"] = [{**r, "fraction_of_peak": 0.5} for r in quiet["results"]]
    assert bench_report.reliability_notes(quiet) == []


def test_output_names_the_texts():
    assert text_name("A") == "text A (one example at a time?)"
    assert name_texts("Text C: what multiplying the inputs by 255 does to SGD.").startswith(
        "text C (scaling a network's inputs): what")
    assert name_texts("DP-SGD: clipping") == "DP-SGD: clipping"
    result = result_of("input-scale")
    assert "text C (scaling a network's inputs)'s outcome" in input_scale.summary(result)
    assert "text A (one example at a time?)" in equality.WAY_NAMES["loop"]


def test_experiment_help_names_the_texts(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    out = capsys.readouterr().out
    assert "text A (one example at a time?): is the batch gradient" in out
    assert "text D (understanding batch size)" in out and "Text A:" not in out


def test_a_quick_experiment_does_not_judge_text_cs_outcome():
    result = result_of("input-scale")
    judged = input_scale.summary(result)
    assert "ii_diverges: yes" in judged
    quick = input_scale.summary({**result, "quick": True})
    assert QUICK_NOTE in quick and "quick run: targets not judged" in quick
    assert "NO" not in quick.split() and "ii_diverges" not in quick


# ---- item 8: the plots --------------------------------------------------------------------------------------


def test_noise_scale_title_fits_in_the_figure():
    spec = importlib.util.spec_from_file_location("noise_scale_script", ROOT / "scripts" / "noise_scale.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fig = script.plot(json.loads((RESULTS / "noise_scale" / "result.json").read_text()))
    renderer = drawn(fig)
    ax = fig.axes[0]
    assert "momentum 0.9" in ax.get_title()
    assert inside(ax.title.get_window_extent(renderer), fig.bbox)
    assert all(inside(legend.get_window_extent(renderer), fig.bbox) for legend in fig.legends)


@pytest.mark.parametrize("sizes", [(32, 256), (1, 8, 32, 128, 256, 512, 2048)])
def test_bench_plots_label_the_batch_sizes_without_overlap(sizes):
    record = json.loads(BENCH.read_text())
    record["results"] = [r for r in record["results"] if r["batch_size"] in sizes]
    for plot in (bench_report.plot_throughput, bench_report.plot_overhead):
        fig = plot(record)
        renderer = drawn(fig)
        assert overlapping_tick_labels(fig, renderer) == [], plot.__name__
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == [str(b) for b in sizes]
            if len(sizes) <= bench_report.FEW_SIZES:  # short lines: markers large enough to see the points
                assert all(line.get_markersize() >= 6 for line in ax.get_lines() if line.get_marker() != "None")


def small_equality() -> dict:
    ways = {"loop": 0.01, "vmap": 1e-3, "grad_vmap": 6e-4, "batched": 5e-4, "data_parallel_k1": 6e-4}
    model = {"float32": {"max_rel": 3e-7}, "float64": {"max_rel": 5e-16},
             "float32_default": {"max_rel": 3e-7, "seconds": ways}}
    return {"config": {"batch_size": 50}, "models": {"mlp": model, "cnn": copy.deepcopy(model)},
            "comparisons": {"float32": {"dtype": "float32", "matmul_precision": "highest"},
                            "float64": {"dtype": "float64", "matmul_precision": "highest"},
                            "float32_default": {"dtype": "float32", "matmul_precision": "default"}}}


@pytest.mark.parametrize("result", [small_equality(), result_of("equality")], ids=["current", "committed"])
def test_equality_legends_sit_below_the_bars(result):
    fig = equality.figures(result)["equality"]
    renderer = drawn(fig)
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        assert legend.get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0 + 1  # below the axes
        assert inside(legend.get_window_extent(renderer), fig.bbox)


def test_input_scale_grad_norms_keep_zeros_and_promise_only_drawn_lines():
    result = result_of("input-scale")
    assert 0 in result["rows"]["ii"]["first_steps"]["grad_norm"]["params/hidden/kernel"]
    fig = input_scale.figures(result)["input_scale_grad_norms"]
    norm_axes = fig.axes[:-1]
    assert all(ax.get_yscale() == "symlog" and ax.get_ylim()[0] == 0 for ax in norm_axes)  # 0 has a place
    assert fig.axes[-1].get_yscale() == "log"  # the loss is never 0
    dotted = [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert "dotted" in fig.get_suptitle() and dotted
    calm = copy.deepcopy(result)
    calm["rows"]["ii"]["diverged"] = None
    fig = input_scale.figures(calm)["input_scale_grad_norms"]
    assert "dotted" not in fig.get_suptitle() and "no run diverged" in fig.get_suptitle()
    assert not [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == ":"]


def test_clipping_batch_has_one_legend():
    fig = clipping.figures(result_of("clipping"))["clipping_batch"]
    renderer = drawn(fig)
    assert len(fig.axes) == 6 and all(ax.get_legend() is None for ax in fig.axes)
    assert len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(set(labels)) and "max ||g_i||" in labels
    assert inside(fig.legends[0].get_window_extent(renderer), fig.bbox)


def test_lr_scaling_points_sit_at_their_batch_sizes_and_one_seed_is_one_seed():
    result = result_of("lr-scaling")
    sizes = sorted(set(result["config"]["batch_sizes"]))
    fig = lr_scaling.figures(result)["lr_scaling"]
    for ax in fig.axes:
        xs = {float(x) for line in ax.get_lines() for x in np.atleast_1d(line.get_xdata())}
        assert xs <= set(map(float, sizes))  # no point offset sideways from its batch size
        assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == [str(b) for b in sizes]
    one = copy.deepcopy(result)
    one["config"]["seeds"] = 1
    assert "1 seeds" not in lr_scaling.summary(one) and "mean over 1 seed)" in lr_scaling.summary(one)
    titles = [ax.get_title() for ax in lr_scaling.figures(one)["lr_scaling"].axes]
    assert all("1 seeds" not in t and "one seed" in t for t in titles)


def test_re_rendered_pngs_are_pngs():
    for png in ("noise_scale/noise_scale.png", "equality/equality.png", "clipping/clipping_batch.png",
                "input-scale/input_scale_grad_norms.png", "lr-scaling/lr_scaling.png"):
        assert (RESULTS / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
