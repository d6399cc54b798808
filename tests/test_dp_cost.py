"""scripts/dp_cost.py, small (digits, the mlp, one timed epoch), so the script behind the README's
DP-SGD cost figures cannot rot unseen: every way is timed against plain training, the noise floor
and the peak memory of a logical batch whole and in physical batches are printed."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # about 30 s on 2 busy cores


def test_dp_cost_prints_every_figure():
    proc = subprocess.Popen([sys.executable, "scripts/dp_cost.py", "--dataset", "digits", "--models", "mlp",
                             "--batch-size", "64", "--epochs", "1", "--rounds", "1", "--logical", "256"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    ratios = dict(re.findall(r"mlp B=64 (plain|dp poisson|dp shuffle)\s+epoch\s+[0-9.]+ s\s+x([0-9.]+) plain", output))
    assert set(ratios) == {"plain", "dp poisson", "dp shuffle"}, output
    assert float(ratios["plain"]) == 1.0 and float(ratios["dp poisson"]) > 0, output
    assert re.search(r"the noise draws alone: [0-9.]+ s per epoch \(x[0-9.]+ of a plain epoch\)", output), output
    memory = re.findall(r"logical batch 256, (whole|physical \d+)\s+peak memory\s+([0-9.]+) MiB", output)
    assert [label for label, _ in memory] == ["whole", "physical 64", "physical 16"], output
    assert all(float(mib) > 0 for _, mib in memory), output
