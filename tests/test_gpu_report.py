"""scripts/gpu_report.py's dry run (--tiny, on the CPU), so the script a GPU loan depends on cannot
rot unseen: every section ends ok or with its reason, in the JSON and in the markdown, run as on the
GPU machine's image, where dp-accounting, tensorflow-datasets and array_record are not installed."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxbatch.recipes import get_recipe

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_report.py"
TIMEOUT_S = 240  # the dry run takes 30-60 s on 2 busy cores; its own budget stops it at 150 s
ABSENT_ON_THE_IMAGE = "dp_accounting,tensorflow_datasets,array_record"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_report = load_script()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(output folder, its report, the script's output) of one --tiny run in a child process, which
    is killed with its process group if it outlives TIMEOUT_S."""
    out = tmp_path_factory.mktemp("gpu_report")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT would take precedence over --out
    env.update(JAX_PLATFORMS="cpu", GPU_REPORT_PRETEND_MISSING=ABSENT_ON_THE_IMAGE)
    with open(out.parent / "gpu_report.out", "w+") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--tiny", "--wheels", "", "--out", str(out)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output
    return out, json.loads((out / "gpu_report.json").read_text()), output


def test_every_section_is_ok_or_says_why(dry_run):
    out, report, _ = dry_run
    assert report["schema"] == gpu_report.SCHEMA and report["tiny"] is True
    assert list(report["sections"]) == list(gpu_report.SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "ok" or section["reason"], name
    markdown = (out / "gpu_report.md").read_text()
    for name, section in report["sections"].items():
        assert f"| {name} | {section['status']} |" in markdown
    for heading in ("Dense matmul peaks", "Backend-dependent tests", "Training epochs", "Gradient step",
                    "Convolution norms", "Gradient ways", "Issue 23's targets"):
        assert f"## {heading}" in markdown, heading


def test_on_a_cpu_every_section_is_ok(dry_run):
    _, report, output = dry_run
    failed = {n: (s["reason"], s.get("log_tail")) for n, s in report["sections"].items() if s["status"] != "ok"}
    assert not failed, output
    tests = report["sections"]["tests"]["result"]
    assert tests["counts"]["passed"] == len(gpu_report.TINY_TESTS) and tests["not_run"] == []
    # The GPU's list is checked here: a renamed test would be found missing now, not during a loan.
    assert tests["not_found_in_gpu_list"] == [] and tests["not_found"] == []
    peaks = report["sections"]["device"]["result"]["matmul_peak"]["jax"]
    assert peaks["fp32"]["flops_per_s_median"] > 0 and "error" in peaks["tf32"]  # no TF32 on a CPU, said so
    rows = [r for r in report["sections"]["bench"]["result"]["record"]["results"] if r["framework"] == "jax"]
    assert {(r["method"], r["status"]) for r in rows} == {(m, "ok") for m in gpu_report.BENCH_METHODS}
    assert all(r["max_rel_diff_vs_batched"] < 1e-5 for r in rows)
    rows = report["sections"]["conv_norms"]["result"]["rows"]
    assert rows and all(r["status"] == "ok" and r["max_rel_diff_vs_batched"]["ghost"] < 1e-4 for r in rows)
    assert report["sections"]["equality"]["result"]["all_within_target"]


def test_without_dp_accounting_the_dp_epoch_clips_only_and_says_so(dry_run):
    _, report, _ = dry_run
    assert set(ABSENT_ON_THE_IMAGE.split(",")) == set(report["missing_modules"])
    assert report["data"]["source"] == "synthetic" and "synthetic" in report["data"]["note"]
    rows = {r["label"]: r for r in report["sections"]["epochs"]["result"]["rows"]}
    dp, plain = rows["dp-mnist DP"], rows["dp-mnist plain"]
    assert dp["status"] == plain["status"] == "ok" and dp["batch_size"] == plain["batch_size"]
    assert dp["dp"]["dp_clip"] == get_recipe("dp-mnist")["dp_clip"] and "dp_noise" not in dp["dp"]
    assert "clipping only" in dp["note"]
    assert "dp_clip" not in plain["dp"] and plain["model"] == dp["model"]
    assert all(r["epoch_s"] > 0 and r["step_flops"] > 0 for r in rows.values())


def test_the_output_folder_fits_what_the_device_tool_brings_back(dry_run):
    out, report, output = dry_run
    names = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(names) <= 8  # flat, at most 8 files
    assert {"gpu_report.json", "gpu_report.md", "gpu_report.log"} <= set(names)
    assert set(report["sections"]["bench"]["result"]["files"]) <= set(names)
    assert "== gpu_report summary ==" in output


def test_node_ids_are_checked_against_the_files():
    found, missing = gpu_report.node_ids_found([("tests/test_chunks.py", "a module"),
                                                ("tests/test_chunks.py::test_chunked_sum_is_the_whole_sum", "a test"),
                                                ("tests/test_chunks.py::test_renamed_long_ago", "gone"),
                                                ("tests/test_nowhere.py", "no file")])
    assert [n for n, _ in found] == ["tests/test_chunks.py", "tests/test_chunks.py::test_chunked_sum_is_the_whole_sum"]
    assert [n for n, _ in missing] == ["tests/test_chunks.py::test_renamed_long_ago", "tests/test_nowhere.py"]


def test_a_test_is_as_bad_as_its_worst_phase():
    lines = [{"nodeid": "t.py::a", "when": "setup", "outcome": "passed", "seconds": 0.1, "message": None},
             {"nodeid": "t.py::a", "when": "call", "outcome": "failed", "seconds": 1.0, "message": "assert 1 == 2"},
             {"nodeid": "t.py::a", "when": "teardown", "outcome": "passed", "seconds": 0.1, "message": None},
             {"nodeid": "t.py::b[x]", "when": "setup", "outcome": "skipped", "seconds": 0.0, "message": "no torch"},
             {"nodeid": "t.py::c", "when": "setup", "outcome": "failed", "seconds": 0.2, "message": "fixture"}]
    tests = gpu_report.outcomes_by_test(lines, [("t.py::b", "what b checks")])
    assert [(t["nodeid"], t["outcome"], t["message"]) for t in tests] == [
        ("t.py::a", "failed", "assert 1 == 2"), ("t.py::b[x]", "skipped", "no torch"), ("t.py::c", "error", "fixture")]
    assert tests[0]["seconds"] == pytest.approx(1.2) and tests[1]["checks"] == "what b checks"
