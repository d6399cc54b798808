"""A benchmark record as files (JSON, markdown, PNG plots), and the targets of
docs/bench.md it is held to. Each file is written to a temporary name and
renamed, so an interrupted run leaves no half-written result.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxbatch.atomic import make_folder, remove_made, write_all_atomic, write_atomic
from jaxbatch.bench.methods import METHODS
from jaxbatch.bench.run import SCHEMA
from jaxbatch.errors import JaxbatchError
from jaxbatch.figures import new_figure

MODEL_ORDER = ("mlp", "mlp_scratch", "cnn", "lenet5", "fc_nobias")
TARGET_BATCH = 256


def _rank(order, name):
    return order.index(name) if name in order else len(order)


def models_of(rows) -> list[str]:
    return sorted({r["model"] for r in rows}, key=lambda m: _rank(MODEL_ORDER, m))


def ok_rows(record: dict, framework: str = "jax") -> list[dict]:
    return [r for r in record["results"] if r["framework"] == framework and r["status"] == "ok"]


def find(record: dict, model: str, batch_size: int, method: str, framework: str = "jax") -> dict | None:
    return next((r for r in ok_rows(record, framework)
                 if (r["model"], r["batch_size"], r["method"]) == (model, batch_size, method)), None)


def ratio(record, model, batch_size, method, base="batched", framework="jax", base_framework="jax", key="step_s"):
    """Step time of `method` / step time of `base` at the same model and batch size, or None;
    key="step_s_min" compares the fastest calls instead of the medians."""
    a = find(record, model, batch_size, method, framework)
    b = find(record, model, batch_size, base, base_framework)
    return a[key] / b[key] if a and b else None


def check_targets(record: dict) -> list[dict]:
    """The targets of docs/bench.md, each with its figure from the median times (`measured_min`
    from the fastest calls) and whether it was met (None when the run did not measure it)."""
    rows, b, platform = [], TARGET_BATCH, record["device"]["platform"]
    models = models_of(ok_rows(record))
    sizes = sorted({r["batch_size"] for r in ok_rows(record)})

    def add(target, limit, at_most, measured, measured_min=None, note=""):
        met = None if measured is None or limit is None else (measured <= limit if at_most else measured >= limit)
        rows.append({"target": target, "measured": measured, "measured_min": measured_min, "limit": limit,
                     "met": met, "note": note})

    def ratios(*case):  # from the medians, from the fastest calls
        return ratio(record, *case), ratio(record, *case, key="step_s_min")

    for m in models:
        vmap = [(r, s) for s in sizes if s >= 32 and (r := ratio(record, m, s, "vmap")) is not None]
        worst, at = max(vmap, key=lambda pair: pair[0], default=(None, None))
        add(f"{m}: vmap-mean step / batched step, worst over B >= 32", 1.05, True, worst,
            ratio(record, m, at, "vmap", key="step_s_min") if at else None, f"at B = {at}" if at else "")
    per_example_limit = {"mlp": 1.3, "fc_nobias": 1.3, "mlp_scratch": 1.3, "cnn": 1.5, "lenet5": 1.5}
    for m in models:
        add(f"{m}: per-example gradients / batched gradient, B = {b}",
            1.2 if platform == "gpu" else per_example_limit.get(m), True, *ratios(m, b, "per_example"))
    if any(r["framework"] == "torch" for r in record["results"]):  # speed-ups: torch time / jax time
        for m in models:
            add(f"{m}: per-example gradients, speed-up over torch.func, B = {b}",
                10.0 if m in ("mlp", "fc_nobias", "mlp_scratch") else 1.0, False,
                *ratios(m, b, "per_example", "per_example", "torch", "jax"), note="torch.func time / jax time")
        for m in models:
            add(f"{m}: batched step, speed-up over PyTorch eager, B = {b}", 1.0, False,
                *ratios(m, b, "batched", "batched", "torch", "jax"), note="torch time / jax time")
    mlp = find(record, "mlp", b, "batched") or {}
    best = None
    if mlp.get("flops") is not None and "matmul_peak" in record:
        best = mlp["flops"] / mlp["step_s_min"] / record["matmul_peak"]["jax"]["flops_per_s"]
    add(f"mlp: batched step FLOP/s / measured matmul peak, B = {b}", 0.75, False, mlp.get("fraction_of_peak"), best)
    if platform == "gpu" and "h100" in record["device"]["name"].lower():
        limits = {"mlp-fashion": 0.030, "cnn-mnist": 0.3}
        for e in record.get("epochs", []):
            if e["recipe"] in limits and e["status"] == "ok":
                add(f"H100: one {e['recipe']} epoch (s)", limits[e["recipe"]], True, e["epoch_s"])
    return rows


QUICK_NOTE = ("quick run: targets not judged (few repeats per case and two batch sizes; "
              "run without --quick to judge them)")


def reliability_notes(record: dict) -> list[str]:
    """Why this record's figures cannot be judged or trusted: a --quick run (`record["quick"]`, set by
    `jaxbatch bench`), a machine busy with other work (a load average at the start of half its cores
    or more), a step measured above 100% of the matmul peak (the peak was measured while something
    else ran)."""
    notes = [QUICK_NOTE] if record.get("quick") else []
    cores = record.get("device", {}).get("host_cores") or 1
    start = record.get("load_average_start") or []
    if start and start[0] >= 0.5 * cores:
        notes.append(f"warning: the machine was busy (load average {start[0]:.1f} on {cores} cores at the "
                     "start): other work shared the cores, so times and their ratios are unreliable")
    above = [r["fraction_of_peak"] for r in ok_rows(record) if (r.get("fraction_of_peak") or 0) > 1]
    if above:
        notes.append(f"warning: {len(above)} case{'s' * (len(above) > 1)} measured above 100% of the matmul "
                     f"peak (up to {max(above):.0%}): the peak was measured while other work ran, so "
                     "ratios to it are unreliable")
    return notes


def _verdict(record: dict, met, markdown: bool = False) -> str:
    if met is None:
        return "not measured"
    if record.get("quick"):
        return "not judged"
    return ("yes" if met else "**no**") if markdown else ("met" if met else "MISSED")


def format_targets(record: dict) -> list[str]:
    """One line per target: met or MISSED (not judged in a quick run), the measured figure, the
    limit; first the notes on why they cannot be judged or trusted (`reliability_notes`)."""
    lines = reliability_notes(record)
    for t in check_targets(record):
        met = _verdict(record, t["met"])
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        fastest = "" if t["measured_min"] is None else f" (fastest calls: {t['measured_min']:.3g})"
        lines.append(f"{met:>12}  {measured:>8} (limit {t['limit']})  {t['target']}{fastest}")
    return lines


_FORMATS = {
    "ms": lambda v: f"{v * 1e3:.3g}" if v * 1e3 < 100 else f"{v * 1e3:.0f}",
    "s": lambda v: f"{v:.2f}",
    "int": lambda v: f"{v:,.0f}",
    "x": lambda v: f"{v:.2f}x",
    "pct": lambda v: f"{v:.0%}",
    "gflop": lambda v: f"{v / 1e9:.3g}",
    "mb": lambda v: f"{v / 2**20:.1f}",
    "load": lambda v: "/".join(f"{x:.1f}" for x in v) if v else "-",
}


def _fmt(value, kind):
    return "-" if value is None else _FORMATS[kind](value)


def to_markdown(record: dict) -> str:
    dev, sw, peak = record["device"], record["software"], record["matmul_peak"]
    torch = f", torch {sw['torch']} ({sw.get('torch_threads')} threads)" if sw.get("torch") else ""
    xla_flags = f"; XLA_FLAGS `{sw['xla_flags']}`" if sw.get("xla_flags") else ""
    peaks = [f"{label} {peak[fw]['flops_per_s_median'] / 1e9:.0f} ({peak[fw]['flops_per_s'] / 1e9:.0f}) GFLOP/s"
             for fw, label in (("jax", "JAX"), ("torch", "PyTorch")) if fw in peak]
    lines = [f"# jaxbatch bench: {dev['platform'].upper()} {dev['name']}", "",
             f"- device: {dev['platform']} `{dev['name']}` x{dev['device_count']}; host CPU `{dev['host_cpu']}`, "
             f"{dev['host_cores']} cores ({', '.join(dev['cpu_flags']) or 'no AVX'})",
             f"- software: jax {sw['jax']}, jaxlib {sw['jaxlib']}, flax {sw['flax']}, optax {sw['optax']}"
             f"{torch}{xla_flags}",
             f"- run: {record['created_utc']}, {record['total_s']:.0f} s; load average at start "
             f"{_fmt(record.get('load_average_start'), 'load')}, at end {_fmt(record.get('load_average_end'), 'load')}"]
    if record.get("precision"):  # records before it was kept lack it
        lines.append(f"- float32 matmul precision: steps timed at `{record['precision']['matmul_precision']}` "
                     f"({record['precision']['float32_matmul_means']}), checked against `batched` at "
                     f"`{record['check_precision']['matmul_precision']}`")
    lines += [f"- dense float32 matmul ({peak['jax']['size']}^3), median (best): {', '.join(peaks)}", "",
              "Step = loss + gradient of the mean loss over the batch (no optimiser update). Times are medians; "
              "`% peak` is XLA's FLOP count per step / median step time, over the JAX matmul's median FLOP/s.", ""]

    has_torch = any(r["framework"] == "torch" for r in record["results"])
    for m in models_of(record["results"]):
        lines += [f"## {m}", "",
                  "| B | method | compile s | step ms | examples/s | GFLOP/step | % peak | memory MB | vs batched |"
                  + (" torch ms | torch / jax |" if has_torch else ""),
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_torch else "")]
        for r in sorted((r for r in ok_rows(record) if r["model"] == m),
                        key=lambda r: (r["batch_size"], _rank(METHODS, r["method"]))):
            cells = [str(r["batch_size"]), r["method"], _fmt(r.get("compile_s"), "s"), _fmt(r["step_s"], "ms"),
                     _fmt(r["examples_per_s"], "int"), _fmt(r.get("flops"), "gflop"),
                     _fmt(r.get("fraction_of_peak"), "pct"), _fmt(r.get("peak_memory_bytes"), "mb"),
                     _fmt(ratio(record, m, r["batch_size"], r["method"]), "x")]
            if has_torch:
                t = find(record, m, r["batch_size"], r["method"], "torch")
                cells += [_fmt(t["step_s"], "ms"), _fmt(t["step_s"] / r["step_s"], "x")] if t else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        skipped = [r for r in record["results"] if r["model"] == m and r["status"] != "ok"
                   and not r.get("reason", "").startswith("the Python loop")]
        if skipped:
            lines += [""] + [f"- skipped: {r['framework']} {r['method']} B = {r['batch_size']}: {r['reason']}"
                             for r in skipped]
        lines.append("")

    if record.get("scaling"):
        lines += scaling_markdown(record["scaling"])
    if record.get("epochs"):
        lines += ["## Training epochs", "", "| recipe | model | dataset | batch | epoch s | examples/s | test acc |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for e in record["epochs"]:
            head = f"| {e['recipe']} | {e['model']} | {e['dataset']} | {e['batch_size']} |"
            lines.append(f"{head} {e['epoch_s']:.2f} | {e['examples_per_s']:,.0f} | {e['test_accuracy']:.3f} |"
                         if e["status"] == "ok" else f"{head} skipped: {e['reason']} | | |")
        lines.append("")

    notes = reliability_notes(record)
    lines += ["## Targets", "", *(f"**{n}**" for n in notes), *([""] if notes else []),
              "Measured from median times (in brackets: from each case's fastest call, "
              "less disturbed by other work on a shared machine); `met` judges the median figure.", "",
              "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for t in check_targets(record):
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        if t["measured_min"] is not None:
            measured += f" ({t['measured_min']:.3g})"
        note = f" ({t['note']})" if t["note"] else ""
        met = _verdict(record, t["met"], markdown=True)
        lines.append(f"| {t['target']}{note} | {measured} | {t['limit']} | {met} |")
    return "\n".join([*lines, ""])


def scaling_markdown(scaling: dict) -> list[str]:
    """The scaling table: one row per (model, method, batch size, mode, K)."""
    lines = ["## Scaling across devices", "",
             f"K = {', '.join(map(str, scaling['devices']))} of the {scaling['device_count']} devices. Weak: each "
             "device takes the batch size B (global batch K*B); strong: the global batch B is split over the K "
             "devices. Speed-up = examples/s on K devices / examples/s on one; efficiency = speed-up / K "
             "(1 = perfect scaling). Each device runs the one-device step on its share of the batch "
             "(split along the mesh axis `data`, parameters replicated) and `lax.pmean` averages the "
             "gradients; `vs batched`: against the one-device batched gradient.", ""]
    if scaling.get("note"):
        lines += [scaling["note"], ""]
    lines += ["| model | method | B | mode | K | batch per device | global batch | step ms | examples/s | speed-up "
              "| efficiency | vs batched |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(scaling["rows"], key=lambda r: (_rank(MODEL_ORDER, r["model"]), r["model"],
                                                     _rank(METHODS, r["method"]), r["batch_size"],
                                                     _rank(("weak", "strong"), r["mode"]), r["devices"])):
        head = (f"| {r['model']} | {r['method']} | {r['batch_size']} | {r['mode']} | {r['devices']} | "
                f"{r['per_device_batch']} | {r['global_batch']} |")
        lines.append(f"{head} skipped: {r['reason']} | | | | |" if r["status"] != "ok" else
                     f"{head} {_fmt(r['step_s'], 'ms')} | {_fmt(r['examples_per_s'], 'int')} | "
                     f"{_fmt(r['speedup'], 'x')} | {_fmt(r['efficiency'], 'pct')} | "
                     f"{r['max_rel_diff_vs_batched']:.1e} |")
    return [*lines, ""]


FEW_SIZES = 4  # with this many batch sizes or fewer, lines are short: larger markers show the points


def batch_size_axis(ax, sizes) -> None:
    """A log2 batch-size axis labelled at the measured sizes only ("32", "256"), so no tick labels
    crowd each other: a log axis spanning about a decade labels its minor ticks, which overlapped."""
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    ax.set_xscale("log", base=2)
    shown = sizes if len(sizes) <= 8 else sizes[::2]  # every other one when there are many
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(sizes) == 1:  # one point: some room either side
        ax.set_xlim(sizes[0] / 2, sizes[0] * 2)


def ratio_axis(ax) -> None:
    """A log y axis whose labels are plain numbers (0.5, 1, 2), few enough not to overlap."""
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5)]))
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _style(sizes, line: str, marker: str) -> dict:
    few = len(sizes) <= FEW_SIZES
    return dict(linestyle=line, marker=marker, markersize=6 if few else 3, linewidth=1.2 if few else 1.5)


def plot_throughput(record: dict, path: Path | None = None):
    """Examples per second against batch size, one panel per model, one line per method.
    Written to `path` when given; returns the Figure."""
    from matplotlib.ticker import LogFormatterSciNotation

    models = models_of(record["results"])
    sizes = sorted({r["batch_size"] for r in record["results"] if r["status"] == "ok"})
    fig, axes = new_figure(ncols=len(models), width=4.2, height=3.6)
    for ax, m in zip(axes[0], models):
        for framework, line, marker in (("jax", "-", "o"), ("torch", "--", "s")):
            rows = [r for r in ok_rows(record, framework) if r["model"] == m]
            for method in sorted({r["method"] for r in rows}, key=lambda name: _rank(METHODS, name)):
                pts = sorted((r["batch_size"], r["examples_per_s"]) for r in rows if r["method"] == method)
                ax.plot(*zip(*pts), label=method if framework == "jax" else f"torch {method}",
                        **_style(sizes, line, marker))
        batch_size_axis(ax, sizes)
        ax.set_yscale("log")
        # Minor labels only where the axis spans under about a decade, and then few of them.
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set(title=m, xlabel="batch size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("examples / s")
    axes[0][-1].legend(fontsize=7)
    few = f" ({len(sizes)} batch size{'s' * (len(sizes) > 1)} measured)" if len(sizes) <= FEW_SIZES else ""
    fig.suptitle(f"{record['device']['platform']} {record['device']['name']}: gradient step throughput{few}")
    if path is not None:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return fig


def plot_overhead(record: dict, path: Path | None = None):
    """Per-example gradients' (and vmap mean's) step time / batched step time against batch size.
    Written to `path` when given; returns the Figure."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    sizes = sorted({r["batch_size"] for r in ok_rows(record)})
    for m in models_of(record["results"]):
        for method, line, marker in (("per_example", "-", "o"), ("vmap", ":", "^")):
            pts = [(b, r) for b in sizes if (r := ratio(record, m, b, method)) is not None]
            if pts:
                ax.plot(*zip(*pts), label=f"{m} {method}", **_style(sizes, line, marker))
    ax.axhline(1.0, color="gray", lw=0.8)
    batch_size_axis(ax, sizes)
    ratio_axis(ax)
    ax.set(xlabel="batch size", ylabel="step time / batched step time",
           title="cost of per-example gradients over the batched gradient")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if path is not None:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return fig


def write_results(record: dict, out_dir, name: str, plots: bool = True) -> list[Path]:
    """<out_dir>/<name>.json, <name>.md and, with plots, <name>-throughput.png and
    <name>-overhead.png. Returns the paths written."""
    out = Path(out_dir).expanduser()
    try:
        made = make_folder(out)
    except OSError as err:
        raise JaxbatchError(f"cannot create the output folder {out}: {err.strerror}; pass another --out")
    paths = [out / f"{name}.json", out / f"{name}.md"]
    try:  # the record and its table together, or neither (and then no empty folder)
        write_all_atomic({paths[0]: lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"),
                          paths[1]: lambda tmp: tmp.write_text(to_markdown(record))})
    except BaseException:
        remove_made(made)
        raise
    if plots:
        paths += [out / f"{name}-throughput.png", out / f"{name}-overhead.png"]
        plot_throughput(record, paths[2])
        plot_overhead(record, paths[3])
    return paths


def load_record(path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise JaxbatchError(f"cannot read benchmark results {path}: {err}")
    if record.get("schema") != SCHEMA:
        raise JaxbatchError(f"{path} is not a jaxbatch bench result (schema {record.get('schema')!r})")
    return record
