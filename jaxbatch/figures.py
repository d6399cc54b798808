"""Matplotlib figures for library code: no pyplot, so no global state.

pyplot keeps every figure it makes open until closed and draws through the
process's backend; a library that calls `matplotlib.use(...)` to get a
backend without a display changes it for a notebook that imported it too.
A bare `matplotlib.figure.Figure` needs neither: it renders itself on
`savefig` and is freed like any other object.
"""

from __future__ import annotations


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure and its (nrows, ncols) array of axes, `width` x
    `height` inches per panel, laid out by matplotlib's constrained layout."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes
