"""Run the benchmark and print every target with its measured figure.

    python scripts/bench.py --torch --data-dir ../shared/data --out benchmarks/results
    python scripts/bench.py --from-json benchmarks/results/cpu-amd-epyc-2core.json

Any `jaxbatch bench` flag works (see `jaxbatch bench --help`); the results are
written as <device>.json, <device>.md and two PNG plots. --from-json re-reads
a saved result and prints its targets without running anything. The targets
(docs/bench.md): vmap mean within 5% of the batched step; per-example
gradients within 1.3x (mlp, fc_nobias) or 1.5x (cnn, lenet5) of the batched
gradient at B = 256 on CPU (1.2x on a GPU); per-example gradients 10x faster
than torch.func for the dense models and no slower for the convolutional
ones; the batched step no slower than PyTorch eager; the mlp step at 75% of
the measured matmul peak; on an H100, an mlp-fashion epoch within 30 ms and a
cnn-mnist epoch within 0.3 s. Figures are printed, not asserted.
"""

from __future__ import annotations

import sys

from jaxbatch.cli import main
from jaxbatch.errors import JaxbatchError


def print_targets(path: str) -> int:
    from jaxbatch.bench.report import format_targets, load_record

    try:
        record = load_record(path)
    except JaxbatchError as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2
    device, software = record["device"], record["software"]
    print(f"{device['platform']} {device['name']}, jax {software['jax']}, {record['created_utc']}")
    print("\n".join(format_targets(record)))
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--from-json"] and len(argv) == 2:
        sys.exit(print_targets(argv[1]))
    sys.exit(main(["bench", *argv]))
