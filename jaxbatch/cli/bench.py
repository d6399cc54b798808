"""`jaxbatch bench`: per-example vs batched gradients, against the matmul peak and PyTorch."""

from __future__ import annotations

import argparse
import sys

from jaxbatch.cli import positive_float, positive_int


def comma_list(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def batch_sizes_like(what: str):
    """A parser of comma-separated whole numbers >= 1, naming `what` in errors."""

    def parse(text: str) -> tuple[int, ...]:
        values = []
        for item in comma_list(text):
            try:
                values.append(positive_int(item))
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"impossible {what} {item!r}: {err}")
        return tuple(values)

    return parse


batch_sizes = batch_sizes_like("batch size")


def add_parser(sub) -> None:
    from jaxbatch.bench.methods import METHODS
    from jaxbatch.bench.run import DEFAULT_BATCH_SIZES, DEFAULT_MODELS, EPOCH_RECIPES

    p = sub.add_parser(
        "bench", help="time per-example vs batched gradients (and PyTorch with --torch)",
        description="For each model, batch size and method, time the loss + gradient step (compile time, "
        "median step time, examples/s, XLA's FLOPs as a share of the measured matmul peak, compiled peak "
        "memory), then whole training epochs. Writes <name>.json, <name>.md and two PNG plots. "
        "Runs unchanged on CPU, GPU and TPU.")
    p.add_argument("--models", type=comma_list, default=DEFAULT_MODELS,
                   help=f"comma-separated (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--batch-sizes", type=batch_sizes, default=None,
                   help=f"comma-separated (default {','.join(map(str, DEFAULT_BATCH_SIZES))}; --quick: 32,256)")
    p.add_argument("--methods", type=comma_list, default=METHODS, help=f"comma-separated from {','.join(METHODS)}")
    p.add_argument("--devices", type=batch_sizes_like("device count"), default=(),
                   help="device counts K for weak scaling (each batch size per device) and strong scaling (each "
                   "batch size split over K), e.g. 1,2,4; K = 1, the reference, is always measured "
                   "(default: no scaling)")
    p.add_argument("--quick", action="store_true", help="batch sizes 32,256, fewer repeats, no epochs: a few minutes")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch twins (needs torch installed)")
    p.add_argument("--torch-threads", type=batch_sizes_like("thread count"), default=(),
                   help="PyTorch thread counts to try per case, keeping the fastest, e.g. 1,2 "
                   "(default: PyTorch's own)")
    p.add_argument("--epochs", type=comma_list, default=None,
                   help=f"training recipes to time one epoch of, or 'none' (default {','.join(EPOCH_RECIPES)}; "
                   "--quick: none); needs the datasets")
    p.add_argument("--data-dir", help="folder holding <dataset>/ files, for the epochs")
    p.add_argument("--chunk", type=positive_int, default=32, help="examples per chunk in per_example_chunked")
    p.add_argument("--loop-max-batch", type=positive_int, default=32, help="largest batch for the Python loop")
    p.add_argument("--min-repeats", type=positive_int, help="timed calls per case at least (default 5; --quick 3)")
    p.add_argument("--min-time", type=positive_float, help="seconds of timed calls per case at least (default 1)")
    p.add_argument("--out", default="runs/bench", help="folder for the results (default runs/bench)")
    p.add_argument("--name", help="file name stem (default: the device, e.g. cpu-amd-epyc-2core)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no line per case")
    p.set_defaults(run=run)


def build_config(args):
    from jaxbatch.bench.run import BenchConfig, quick_config

    fields = dict(models=args.models, methods=args.methods, torch=args.torch, torch_threads=args.torch_threads,
                  data_dir=args.data_dir, devices=args.devices,
                  chunk=args.chunk, loop_max_batch=args.loop_max_batch)
    if args.batch_sizes is not None:
        fields["batch_sizes"] = args.batch_sizes
    if args.epochs is not None:
        fields["epochs"] = () if args.epochs == ("none",) else args.epochs
    if args.min_repeats is not None:
        fields["min_repeats"] = args.min_repeats
    if args.min_time is not None:
        fields["min_time_s"] = args.min_time
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

    config = build_config(args)
    validate(config)  # bad flags fail before the first compile
    progress = None if args.quiet else (lambda event: print(describe(event), file=sys.stderr, flush=True))
    record = run_benchmarks(config, on_progress=progress)
    name = args.name or device_slug(record["device"])
    paths = write_results(record, args.out, name, plots=not args.no_plots)
    print("\n".join(format_targets(record)))
    for path in paths:
        print(f"wrote {path}")
    return 0
