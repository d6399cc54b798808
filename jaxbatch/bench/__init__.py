"""Benchmarks: per-example against batched gradients, against the hardware and PyTorch.

    methods.py      the six ways to get a minibatch's mean gradient
    measure.py      how a figure is measured (compile time, FLOPs, memory, matmul peak) and on what
    torch_twins.py  the same models in PyTorch eager (optional)
    scaling.py      weak and strong scaling over K devices
    run.py          BenchConfig and run_benchmarks: every case, then training epochs
    report.py       JSON, markdown, PNG plots and the targets

`jaxbatch bench` (jaxbatch/cli/bench.py) and scripts/bench.py call these.
"""

from jaxbatch.bench.methods import METHODS  # noqa: F401
from jaxbatch.bench.run import BenchConfig, quick_config, run_benchmarks  # noqa: F401
