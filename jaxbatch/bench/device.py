"""What the benchmark ran on: the device, its memory, the software versions.

Nothing here assumes a CPU: the device is `jax.devices()[0]`, whatever the
backend; the host CPU is named too, because on a CPU backend it *is* the
device and on a GPU it still feeds it (`jaxbatch.machine` reads its name
and flags).
"""

from __future__ import annotations

import os
import re
import sys

from jaxbatch.machine import cpu_flags, cpu_model


def describe_device() -> dict:
    """Platform, name and count of the JAX devices, plus the host CPU."""
    import jax

    device = jax.devices()[0]
    name = cpu_model() if device.platform == "cpu" else device.device_kind
    return {
        "platform": device.platform,
        "name": name,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "host_cpu": cpu_model(),
        "host_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_bytes": device_memory_bytes(device),
    }


def device_memory_bytes(device=None) -> int | None:
    """Memory the device can hold: the accelerator's allocator limit, or the
    host's RAM for a CPU device; None when unknown."""
    import jax

    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def software_versions(with_torch: bool = False) -> dict:
    """Versions of what timed the run; PyTorch's only when it was timed too
    (importing it takes seconds, and its version says nothing about a JAX-only run)."""
    import flax
    import jax
    import jaxlib
    import numpy
    import optax

    versions = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    versions["torch"] = None
    if with_torch:
        import torch

        versions["torch"] = torch.__version__
        versions["torch_threads"] = torch.get_num_threads()
    return versions


def device_slug(device: dict) -> str:
    """A file-name stem naming the device: 'cpu-amd-epyc-2core', 'gpu-nvidia-h100-80gb-hbm3'."""
    name = device["name"].lower()
    name = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor", " ", name)
    words = re.findall(r"[a-z0-9]+", name)
    # Keep the vendor and model words, drop the long tail of speed grades.
    stem = "-".join(words[:4]) or "unknown"
    if device["platform"] == "cpu":
        return f"cpu-{stem}-{device['host_cores']}core"
    return f"{device['platform']}-{stem}"
