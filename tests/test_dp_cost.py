"""scripts/dp_cost.py, small (digits, the mlp, one timed epoch), so the script behind the README's
DP-SGD cost figures cannot rot unseen: every way is timed against plain training, the noise floor
and the peak memory of a logical batch whole and in physical batches are printed."""

import importlib.util
import re

import jax
import pytest
from cli_helpers import REPO, run_script

TIMEOUT_S = 300  # about 30 s on 2 busy cores


def dp_cost(*flags: str) -> str:
    """The script's output on digits' mlp at B = 64, one epoch timed; it must exit 0."""
    return run_script("scripts/dp_cost.py", "--dataset", "digits", "--models", "mlp", "--batch-size", "64", "--epochs",
                      "1", "--rounds", "1", *flags, timeout=TIMEOUT_S)


def test_dp_cost_prints_every_figure():
    output = dp_cost("--logical", "256")
    ways = r"mlp B=64 (plain|dp poisson|dp shuffle|dp poisson, cut per chunk)\s+epoch\s+[0-9.]+ s\s+x([0-9.]+) plain"
    ratios = dict(re.findall(ways, output))
    # the mlp on one CPU device cuts its Poisson padding in each step, and is timed cut per chunk beside it
    assert set(ratios) == {"plain", "dp poisson", "dp shuffle", "dp poisson, cut per chunk"}, output
    assert re.search(r"mlp B=64 its padding cut per chunk instead, x[0-9.]+ a shuffled one", output), output
    assert float(ratios["plain"]) == 1.0 and float(ratios["dp poisson"]) > 0, output
    assert re.search(r"the noise draws alone: [0-9.]+ s per epoch \(x[0-9.]+ of a plain epoch\)", output), output
    assert re.search(r"mlp B=64 a Poisson DP epoch takes x[0-9.]+ a shuffled one \(target <= 1.15\)", output), output
    memory = re.findall(r"logical batch 256, (whole|physical \d+)\s+peak memory\s+([0-9.]+) MiB", output)
    assert [label for label, _ in memory] == ["whole", "physical 64", "physical 16"], output
    assert all(float(mib) > 0 for _, mib in memory), output


def test_dp_cost_times_the_opacus_twins_beside_jaxbatch():
    pytest.importorskip("opacus")
    output = dp_cost("--logical", "64", "--opacus")
    assert re.search(r"torch \S+ on 1 thread\(s\), opacus \S+", output), output
    twins = r"mlp B=64 (torch plain|opacus hooks|opacus ghost)\s+epoch\s+[0-9.]+ s\s+x([0-9.]+) plain"
    ratios = dict(re.findall(twins, output))
    assert set(ratios) == {"torch plain", "opacus hooks", "opacus ghost"}, output
    assert all(float(r) > 0 for r in ratios.values()), output
    faster = r"Opacus's faster mode \((hooks|ghost)\) takes x[0-9.]+ jaxbatch's private epoch \(target >= 2\)"
    assert re.search(faster, output), output


def load_dp_cost():
    spec = importlib.util.spec_from_file_location("dp_cost", REPO / "scripts" / "dp_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_epochs_that_compiled_are_left_out_of_the_figure():
    dp_cost = load_dp_cost()
    # A Poisson run's second padded size compiles in whichever epoch first needs it.
    assert dp_cost.steady([(1.2, 0.0), (2.9, 1.6), (1.3, 0.0)]) == ([1.2, 1.3], [(2.9, 1.6)], False)
    assert dp_cost.steady([(2.9, 1.6), (3.1, 1.7)]) == ([2.9, 3.1], [], True)  # kept, and said so
    # The counter sees a compile when there is one, and none for a call that reuses the program.
    before = dict(dp_cost.compiling)
    f = jax.jit(lambda x: x * 3 + 1)
    f(2.0)
    after_first = dict(dp_cost.compiling)
    f(5.0)
    assert after_first["events"] > before["events"] and after_first["seconds"] > before["seconds"]
    assert dp_cost.compiling == after_first
