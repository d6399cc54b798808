"""scripts/train_speed.py --host-devices, small (text A's cnn recipe on digits, one timed epoch),
so the script behind the host-device speed table cannot rot unseen: each count runs in its own
process with JAX_NUM_CPU_DEVICES set, reports the devices it really had, and ends at the same
accuracy (the same numbers, to float32 rounding)."""

import os
import re
import subprocess
import sys

from cli_helpers import REPO, run_script

TIMEOUT_S = 300  # about 40 s on 2 quiet cores


def test_each_host_device_count_runs_in_its_own_process_to_the_same_accuracy():
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # the script sets it per child
    output = run_script("scripts/train_speed.py", "--host-devices", "1", "2", "--recipes", "cnn-mnist", "--dataset",
                        "digits", "--epochs", "1", "--rounds", "1", timeout=TIMEOUT_S, env=env)
    rows = re.findall(r"cnn-mnist\s+(\d) host device\(s\)\s+epoch\s+([0-9.]+) s\s+x([0-9.]+) of 1\s+"
                      r"test accuracy ([0-9.]+)", output)
    assert [devices for devices, *_ in rows] == ["1", "2"], output  # the count each child really had
    assert float(rows[0][2]) == 1.0 and all(float(epoch) > 0 for _, epoch, _, _ in rows), output
    accuracies = [float(accuracy) for *_, accuracy in rows]
    assert abs(accuracies[0] - accuracies[1]) <= 2 / 450, output  # at most two of digits' 450 test images


def test_an_unknown_recipe_is_one_line_before_any_run():
    for flags in (["--host-devices", "1", "2"], []):
        out = subprocess.run([sys.executable, "scripts/train_speed.py", *flags, "--recipes", "nope"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stdout == "", out
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and \
            out.stderr.startswith("train_speed.py: unknown recipe 'nope'; choose one of:"), out.stderr
