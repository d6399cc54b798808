"""The notebook runs top to bottom, so it cannot rot: executed with nbclient
on the python3 kernel of this environment, every cell without error, the
plots inline, and its own asserts (the equality and slope targets) passing.

The experiment tests already run the equality and variance experiments, so
here the notebook runs them small: the settings below go in after its
parameters cell, as papermill injects parameters."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "per_example_vs_batched.ipynb"
# The MLP's gradients compile in about half the CNN's time; three batch sizes still fit a slope.
QUICK_PARAMETERS = """\
equality_config = equality.Config(**equality.QUICK, models=("mlp",))
variance_config = variance.Config(**dict(variance.QUICK, batch_sizes=(1, 16, 256), samples=1024))"""


def with_parameters(nb, source):
    """nb with a cell of `source` after its cell tagged "parameters"."""
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def test_notebook_executes_with_plots_inline():
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), QUICK_PARAMETERS)
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
