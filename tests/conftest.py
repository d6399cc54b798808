import os
from pathlib import Path

import pytest

# Keep tests off any user cache or data folder.
os.environ.setdefault("MPLBACKEND", "Agg")

# Compiled programs go to JAX's persistent compilation cache, in
# .pytest_cache/xla (delete it for a cold run): many tests compile a program
# another test or an earlier run already compiled (the same training step,
# the same child-process run), and on a 2-core CPU compiling is most of a
# test's time. Set here, before anything imports jax, so the processes the
# tests start inherit it too. Programs and results are the same either way.
# A size limit turns on JAX's least-recently-used eviction and, with it, a file
# lock around every read and write, so that pytest-xdist's workers and their
# child processes never read an entry another one is still writing.
# Only programs that took 0.3 s or more to compile are kept: each write
# under eviction reads every entry's size and access time, so thousands of
# one-operation programs (eager Flax init, eager jnp calls, ~40 ms each to
# compile) made every write slower than compiling them again. A cold fast
# tier took 204 s keeping every program, 178 s keeping these, 208 s with no
# cache (2-core AMD EPYC without AVX-512, pytest -n auto).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))

# One host device unless a test asks for more: on CPU the command line would
# otherwise give a model with a convolution one device per core
# (jaxbatch/backends.py), and the child processes the tests start would
# depend on the machine's cores. tests/test_host_devices.py lifts it to test
# that default.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")

# The real datasets (CI: ../shared/data), read once, before any test runs: the
# tests themselves see no default data folder, so a test that expects "no
# data here" means it; the real-data tests pass this folder by name.
REAL_DATA_DIR = os.environ.get("JAXBATCH_DATA_DIR")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Caches go to a per-session temp dir unless CI set them; the default
    data folder is always an empty one."""
    base = tmp_path_factory.getbasetemp()
    if "JAXBATCH_CACHE" not in os.environ:
        monkeypatch.setenv("JAXBATCH_CACHE", str(base / "cache"))
    monkeypatch.setenv("JAXBATCH_DATA_DIR", str(base / "no-data-here"))
    monkeypatch.delenv("JAXBATCH_DATA", raising=False)


@pytest.fixture(scope="session")
def real_data_dir():
    """The folder of real datasets (CI: ../shared/data); skip when unset."""
    path = REAL_DATA_DIR
    if not path:
        pytest.skip("JAXBATCH_DATA_DIR is not set: real-data test skipped")
    return Path(path)


# The modules that take longest (child processes, several devices) go first:
# with `-n auto --dist loadscope` each module runs whole on one worker, in
# collection order, so one of them starting last would leave the other
# workers idle at the end.
# Ordered by their time in a full run (2026-12-07, 2 cores: test_privacy.py 290 s of the workers' time,
# the real-data modules 277 s and 231 s, test_parallel.py 213 s, ...).
LONGEST_FIRST = ("test_privacy.py", "test_experiments_realdata.py", "test_recipes_real.py", "test_parallel.py",
                 "test_bench.py", "test_experiments.py", "test_dp_sampling.py", "test_gpu_report.py",
                 "test_bad_input.py", "test_resume.py")


# The fast tier leaves these out: tests/slow_tests.txt names each test (or
# whole module) measured at 3 s or more in a cold run.
SLOW_LIST = Path(__file__).resolve().parent / "slow_tests.txt"


def slow_ids() -> set[str]:
    lines = (line.strip() for line in SLOW_LIST.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def pytest_configure(config):
    # pytest-xdist 3.7+ hands out the modules with the most tests first under --dist loadscope
    # (--loadscope-reorder, on by default), which put LONGEST_FIRST's modules, few tests each but
    # minutes of child processes, at the end of the run with one worker left to run them.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    slow, used = slow_ids(), set()
    for item in items:
        module = item.nodeid.split("::")[0]
        for key in (item.nodeid, item.nodeid.split("[")[0], module):  # a test, all its parameters, a module
            if key in slow:
                item.add_marker(pytest.mark.slow)
                used.add(key)
    # A renamed or removed test must not leave a line that silently marks nothing.
    modules = {item.nodeid.split("::")[0] for item in items}
    stale = sorted(key for key in slow - used if key.split("::")[0] in modules)
    if stale and not config.getoption("keyword") and not config.getoption("-k", default=""):
        raise pytest.UsageError(f"tests/slow_tests.txt names tests that do not exist: {', '.join(stale[:5])}")
