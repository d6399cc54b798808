"""What every experiment shares: checking its output folder, filling it, and
its printed table. (Its input is checked by its settings' declarations:
jaxbatch/settings.py.)

An experiment writes `result.json` and its PNG plots into one folder. All of
them are written under temporary names first and renamed into place only
when every one is ready (`atomic.write_all_atomic`), so a failure leaves
nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from jaxbatch.atomic import make_folder, remove_made, write_all_atomic
from jaxbatch.errors import JaxbatchError
from jaxbatch.figures import new_figure  # noqa: F401  (the experiments' plots: one import for their kit)


# The five texts jaxbatch re-implements (README.md, "The five texts"), by the letter output refers to them.
TEXTS = {
    "A": "one example at a time?",
    "B": "building a network in PyTorch",
    "C": "scaling a network's inputs",
    "D": "understanding batch size",
    "E": "an MLP from scratch",
}
QUICK_NOTE = "quick run: targets not judged (a small run on digits; run without --quick to judge them)"


def text_name(letter: str) -> str:
    """How output names a text, so a newcomer knows which: "text A (one example at a time?)"."""
    return f"text {letter} ({TEXTS[letter]})"


def name_texts(line: str) -> str:
    """`line` with a leading "Text A:" named: "text A (one example at a time?):"."""
    head, sep, rest = line.partition(":")
    if sep and head.startswith("Text ") and head[5:] in TEXTS:
        return text_name(head[5:]) + sep + rest
    return line


def is_quick(result: dict) -> bool:
    """Whether `result` comes from a --quick run (`jaxbatch experiment` marks it before the summary)."""
    return bool(result.get("quick"))


def check_out_dir(out) -> Path:
    """Refuse an output folder that cannot be one, before any work is done."""
    path = Path(out)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"cannot be created: {parent} is a file"
                raise JaxbatchError(f"output folder {path} {where}; pass --out a folder path")
            if not os.access(parent, os.W_OK):
                raise JaxbatchError(f"output folder {path} cannot be written: {parent} is read-only")
            break
    return path


def jsonable(value):
    """numpy scalars and arrays as plain Python; NaN and infinities as None
    (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_results(out, result: dict, figures: dict) -> list[Path]:
    """result.json and one PNG per figure ({name: matplotlib Figure}) in `out`.
    Returns the paths written."""
    out = check_out_dir(out)
    try:
        made = make_folder(out)
    except OSError as err:
        raise JaxbatchError(f"cannot create output folder {out}: {err.strerror}") from None
    text = json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n"
    writes = {out / "result.json": lambda tmp: tmp.write_text(text)}
    writes.update({out / f"{name}.png": lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100)
                   for name, fig in figures.items()})
    try:
        return write_all_atomic(writes)
    except BaseException:  # nothing written: no empty folder left either
        remove_made(made)
        raise


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)
