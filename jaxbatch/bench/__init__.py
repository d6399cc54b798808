"""Benchmarks: per-example against batched gradients, against the hardware and PyTorch.

    methods.py      the five ways to get a minibatch's mean gradient
    measure.py      how a figure is measured: step time, compile time, FLOPs, memory, matmul peak
    device.py       what it ran on: device, host CPU, memory, software versions
    torch_twins.py  the same models in PyTorch eager (optional)
    run.py          BenchConfig and run_benchmarks: every case, then training epochs
    report.py       JSON, markdown, PNG plots and the targets

`jaxbatch bench` (jaxbatch/cli/bench.py) and scripts/bench.py call these.
"""

from jaxbatch.bench.methods import METHODS  # noqa: F401
from jaxbatch.bench.run import BenchConfig, quick_config, run_benchmarks  # noqa: F401
