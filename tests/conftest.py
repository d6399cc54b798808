import os
from pathlib import Path

import pytest

# Keep tests off any user cache or data folder.
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Caches and the default data folder go to a per-session temp dir unless CI set them."""
    base = tmp_path_factory.getbasetemp()
    if "JAXBATCH_CACHE" not in os.environ:
        monkeypatch.setenv("JAXBATCH_CACHE", str(base / "cache"))
    if "JAXBATCH_DATA" not in os.environ:
        monkeypatch.setenv("JAXBATCH_DATA", str(base / "no-data-here"))


@pytest.fixture(scope="session")
def real_data_dir():
    """The folder of real datasets (CI: ../shared/data); skip when unset."""
    path = os.environ.get("JAXBATCH_DATA_DIR")
    if not path:
        pytest.skip("JAXBATCH_DATA_DIR is not set: real-data test skipped")
    return Path(path)
