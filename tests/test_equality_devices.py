"""The equality experiment's fifth way, text D's data parallelism, on 4 CPU
devices in a child process (tests/test_parallel.py's `run_child`): K = 1, 2
and 4 devices, each the batched gradient of B/K examples, averaged, equal to
the other four ways."""

import pytest

from jaxbatch.experiments import equality
from test_parallel import run_child


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    # 48 splits over 1, 2 and 4 devices; mlp only, float64 only: the strictest target, 1e-12.
    return run_child("""
        import json
        from jaxbatch.experiments import equality, make_config

        config = make_config("equality", quick=True, models=("mlp",), batch_size=48,
                             comparisons=("float64",))
        result = equality.run(config)
        print(json.dumps({"result": result, "summary": equality.summary(result)}))
    """, 4, tmp_path_factory.mktemp("equality4"))


def test_data_parallel_on_1_2_and_4_devices_is_the_batch_gradient(four_devices):
    result = four_devices["result"]
    dp = result["data_parallel"]
    assert dp["device_count"] == 4 and dp["ks"] == [1, 2, 4] and dp["skipped"] == {}
    mlp = result["models"]["mlp"]
    for comparison, target in (("float64", 1e-12),):
        assert set(mlp[comparison]["data_parallel"]) == {"1", "2", "4"}
        for k in ("1", "2", "4"):
            assert mlp[comparison]["data_parallel"][k]["max_rel"] <= target, (comparison, k)
            # each K against each of the four ways
            assert {p for p in mlp[comparison]["pairs"] if p.startswith(f"data_parallel_k{k}~")} == {
                f"data_parallel_k{k}~{w}" for w in equality.WAYS}
        assert mlp[comparison]["within_target"] is True
    assert result["all_within_target"]
    # K workers with b = 48/K each: one batch of 48 per step, K-fold fewer steps than one worker with b
    steps = dp["steps_per_epoch"]
    assert [steps[k]["per_device_batch"] for k in ("1", "2", "4")] == [48, 24, 12]
    assert [steps[k]["one_worker"] for k in ("1", "2", "4")] == [-(-1347 // b) for b in (48, 24, 12)]
    assert {steps[k]["k_workers"] for k in ("1", "2", "4")} == {-(-1347 // 48)}
    assert "K = 1, 2, 4 of the 4 devices here" in four_devices["summary"]


def test_k_values_are_the_divisors_the_batch_splits_over():
    assert equality.data_parallel_ks(50, 1) == ([1], {})
    ks, skipped = equality.data_parallel_ks(50, 4)  # text A's batch of 50 on 4 devices
    assert ks == [1, 2] and list(skipped) == [4] and "batch size 50 does not split evenly over 4" in skipped[4]
    assert equality.data_parallel_ks(48, 16)[0] == [1, 2, 4, 8]  # capped at 8
    assert equality.data_parallel_ks(60, 6) == ([1, 2, 3, 6], {})
