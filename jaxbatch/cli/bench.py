"""`jaxbatch bench`: per-example vs batched gradients, against the matmul peak and PyTorch."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    from jaxbatch import settings
    from jaxbatch.bench.run import NONE_WHEN_EMPTY, QUICK, BenchConfig

    p = sub.add_parser(
        "bench", help="time per-example vs batched gradients (and PyTorch with --torch)",
        description="For each model, batch size and method, time the loss + gradient step (compile time, "
        "median step time, examples/s, XLA's FLOPs as a share of the measured matmul peak, compiled peak "
        "memory), then whole training epochs. Writes <name>.json, <name>.md and two PNG plots. "
        "Runs unchanged on CPU, GPU and TPU.")
    p.add_argument("--quick", action="store_true", help="batch sizes 32,256, fewer repeats, no epochs: a few minutes")
    # Every setting's flag, help and valid range, from its declaration in BenchConfig; min_time_s keeps
    # its flag --min-time, parsed by the same declaration.
    settings.add_flags(p, BenchConfig, skip=("min_time_s", "devices"), presets={"--quick": QUICK})
    devices = declared_field(BenchConfig, "devices")
    p.add_argument("--devices", default=None, type=each_item(devices.metadata), help=devices.metadata["help"])
    for action in p._actions:  # an empty tuple's default reads "none"
        if action.dest in NONE_WHEN_EMPTY:
            action.help = action.help.replace("; default )", ")").replace("--quick: )", "--quick: none)")
    field = declared_field(BenchConfig, "min_time_s")
    p.add_argument("--min-time", dest="min_time_s", default=None, metavar="SECONDS",
                   type=lambda text: settings.parse(text, field.metadata),
                   help=f"{field.metadata['help']} (default {settings.show(field.default)}; "
                   f"--quick: {settings.show(QUICK['min_time_s'])})")
    p.add_argument("--out", default="runs/bench", help="folder for the results (default runs/bench)")
    p.add_argument("--name", help="file name stem (default: the device, e.g. cpu-amd-epyc-2core)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no line per case")
    p.set_defaults(run=run)


def declared_field(cls, name: str):
    from jaxbatch.settings import declared

    return next(f for f in declared(cls) if f.name == name)


def each_item(meta):
    """A tuple setting's flag parser that names the item at fault: "impossible
    device count '0': must be 1 or more, got 0"."""
    from jaxbatch.settings import parse

    def parse_items(text: str) -> tuple:
        items = [part.strip() for part in text.split(",") if part.strip()]
        for item in items:
            try:
                parse(item, {**meta, "type": meta["item"], "optional": False})
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"impossible {meta['kind']} {item!r}: {err}")
        return parse(text, meta)  # the tuple's own rules (at least one item)

    return parse_items


def build_config(args):
    from jaxbatch.bench.run import BenchConfig, quick_config
    from jaxbatch.settings import given

    fields = given(args, BenchConfig)
    if fields.get("epochs") == ("none",):
        fields["epochs"] = ()
    return quick_config(**fields) if args.quick else BenchConfig(**fields)


def describe(event: dict) -> str:
    if event["kind"] == "peak":
        framework = "jax" if "jax" in event else "torch"
        return f"{framework} matmul: {event[framework]['flops_per_s_median'] / 1e9:.0f} GFLOP/s (median)"
    if event["kind"] == "epoch":
        if event["status"] != "ok":
            return f"epoch {event['recipe']}: skipped ({event['reason']})"
        return (f"epoch {event['recipe']}: {event['epoch_s']:.2f} s, {event['examples_per_s']:,.0f} examples/s, "
                f"test accuracy {event['test_accuracy']:.3f}")
    if event["kind"] == "scaling":
        head = (f"{event['mode']:6} K={event['devices']:<3} {event['model']:9} B={event['global_batch']:<5} "
                f"{event['method']:11}")
        if event["status"] != "ok":
            return f"{head} skipped: {event['reason']}"
        return f"{head} {event['step_s'] * 1e3:9.3f} ms  {event['examples_per_s']:11,.0f} ex/s"
    head = f"{event['framework']:5} {event['model']:9} B={event['batch_size']:<5} {event['method']:19}"
    if event["status"] != "ok":
        return f"{head} skipped: {event['reason']}"
    flops = event.get("flops_per_s")
    return (f"{head} {event['step_s'] * 1e3:9.3f} ms  {event['examples_per_s']:11,.0f} ex/s"
            + (f"  {flops / 1e9:6.1f} GFLOP/s" if flops is not None else ""))


def run(args) -> int:
    from jaxbatch.bench.measure import device_slug
    from jaxbatch.bench.report import format_targets, write_results
    from jaxbatch.bench.run import run_benchmarks, validate
    from jaxbatch.errors import JaxbatchError
    from jaxbatch.rundir import check_folder

    config = build_config(args)
    validate(config)  # bad flags fail before the first compile
    check_folder(args.out)  # and a place the results cannot go, before the benchmark, not after it
    if args.name is not None and (not args.name.strip() or args.name.startswith(".") or "/" in args.name
                                  or "\\" in args.name):
        raise JaxbatchError(f"--name {args.name!r} is not a file name: it names the results' files inside --out "
                            "(e.g. --name h100-run1), without / or a leading dot")
    progress = None if args.quiet else (lambda event: print(describe(event), file=sys.stderr, flush=True))
    record = run_benchmarks(config, on_progress=progress)
    record["quick"] = bool(args.quick)  # a quick run's figures are shown, its targets not judged
    name = args.name or device_slug(record["device"])
    paths = write_results(record, args.out, name, plots=not args.no_plots)
    print("\n".join(format_targets(record)))
    for path in paths:
        print(f"wrote {path}")
    return 0
