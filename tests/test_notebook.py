"""The notebook runs top to bottom, so it cannot rot: executed with nbclient
on the python3 kernel of this environment, every cell without error, the
plots inline, and its own asserts (the equality and slope targets) passing."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "per_example_vs_batched.ipynb"


def test_notebook_executes_with_plots_inline():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel spec's "python" is replaced by this interpreter (jupyter_client does so for
    # kernels launched with the current Python), so the notebook sees this environment's jaxbatch.
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the equality plot and the variance plot
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "float64" in text and "B_noise" in text
