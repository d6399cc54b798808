"""Choices that depend on the XLA backend, in one place, with the measurements
that justify each.

jaxbatch's code is the same on every backend. A few XLA:CPU behaviours were
slow enough to be worth a workaround there, and only there:

1. `mask_max_pool`: the gradient of `flax.linen.max_pool` is XLA's
   `select_and_scatter_add`, which XLA:CPU runs as a scalar loop: 60 ms for
   the cnn's first pool alone at batch 256. Written as a mask
   (`models/conv.py`: same values, same gradient, ties included) a cnn Adam
   step took 75 ms instead of 149 ms at batch 256, 9.9 ms instead of 15.2 ms
   at batch 50; LeNet-5's 38 ms instead of 69 ms (2-core AMD EPYC, jax 0.10).
2. `unrolled_conv_steps`: inside a loop body (lax.scan, lax.map, while)
   XLA:CPU leaves the convolutions that autodiff derives in layouts its fast
   kernels do not take, and runs them as plain loops: a cnn Adam step at
   batch 50 took 152 ms inside a rolled scan against 8 ms alone. A model with
   a convolution therefore trains 8 steps per scan call, fully unrolled:
   a `cnn-mnist` epoch took 9 s instead of 277 s, same numbers. (A scan of
   one step keeps its loop even unrolled, so train.run_chunk runs a
   one-step chunk with no scan: 1.67 s a cnn step at B = 256 otherwise.) A loop over
   chunks of examples inside one step (jaxbatch/chunks.py) unrolls when its
   body has a convolution, for the same reason, where speed is its purpose
   (the benchmark's per_example_chunked): per-example gradients of the cnn in
   chunks of 32 took 538 ms at B = 64 rolled, 21 ms unrolled. Chunks taken to
   bound memory (--dp-chunk, --dp-physical-batch) stay rolled: unrolled, their
   buffers were not reused. Dense models are not affected and scan rolled,
   like every model elsewhere.
3. `conv_devices_per_core`: XLA:CPU runs one convolution on barely more than
   one core: a cnn MNIST epoch at B = 256 took 21.7 s on one thread and 16.0
   s on two. Split by jaxbatch's own data parallelism over two host devices
   (`JAX_NUM_CPU_DEVICES=2`, each device its own core) the same epoch took
   11.1 s, as fast as PyTorch's eager step on both cores, to the same test
   accuracy (0.9839). A model with a convolution therefore starts with one
   host device per core (`start_host_devices`, before JAX's backend starts:
   the count cannot change after), as many as divide the batch. The mlp
   gains nothing (0.41 s an epoch on one device, 0.46 s on two) and stays on
   one (2-core AMD EPYC, quiet, jax 0.10). Per recipe, an epoch on two
   host devices against one (a 2-core AMD EPYC without AVX-512, quiet;
   `scripts/train_speed.py --host-devices 1 2`): cnn-mnist 0.62x, lenet-mnist
   0.91x, dp-mnist-cnn 0.79x, and dp-mnist (cnn_tanh, DP-SGD) 1.02x, nothing
   gained but nothing lost. The user's own count wins:
   JAX_NUM_CPU_DEVICES, jax.config's jax_num_cpu_devices, XLA_FLAGS'
   --xla_force_host_platform_device_count, or --devices.

4. `padding_cut_in_step`: a Poisson batch is padded to the worst case (B
   plus six standard deviations, privacy.py), and a step should compute on
   as few of those slots as its batch needs. Inside the step, B slots, then
   blocks of 8 in a loop only as far as the batch reaches
   (chunks.front_sum, privacy.front_blocks): one program, and 264 slots a
   step on average at B = 256 of MNIST. Cut per chunk on the host instead
   (privacy.trim), a chunk of the mlp's 24 steps takes 296 slots when all
   of them fit and 352 otherwise, 304 on average, and the second size
   compiles again mid-run (3 to 5 s for the mlp). In two runs of five
   interleaved rounds of private mlp epochs at B = 256 on one device
   (`JAX_NUM_CPU_DEVICES=1 python scripts/dp_cost.py --models mlp --rounds
   5`; the 2-core AMD EPYC without AVX-512, quiet), cut in the step a
   Poisson epoch took 1.02x and 1.07x a shuffled one, cut per chunk 1.09x
   and 1.15x. The first private epoch on digits compiles about 2 s longer
   (the loop's block is a second shape), and never again. But XLA:CPU
   runs convolutions inside a loop or a conditional slowly (choice 2; the
   cnn's overflow slots under `lax.cond`: 386 ms a step at B = 256 against
   306 ms cut per chunk), so a model with a convolution keeps the chunk
   cut, as does a run on several devices (a cut inside the step would move
   a sharded batch's examples between them).

GPUs and TPUs take the plain path (`flax.linen.max_pool`; rolled scans over
about a tenth of an epoch; Poisson padding cut per chunk) until a
measurement there says otherwise. Each choice has a test that both paths
compute the same numbers (tests/test_models.py, tests/test_train.py,
tests/test_dp_sampling.py).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import NamedTuple

import jax

from jaxbatch.errors import JaxbatchError


class Choices(NamedTuple):
    mask_max_pool: bool  # max pool with a mask gradient instead of select_and_scatter_add
    unrolled_conv_steps: int | None  # steps per unrolled scan call for models with a convolution
    conv_devices_per_core: bool = False  # a model with a convolution runs data-parallel, one host device per core
    padding_cut_in_step: bool = False  # a Poisson batch's padding cut inside the step, for a model without a convolution


PLAIN = Choices(mask_max_pool=False, unrolled_conv_steps=None)
CHOICES = {
    "cpu": Choices(mask_max_pool=True, unrolled_conv_steps=8, conv_devices_per_core=True, padding_cut_in_step=True),
}

# The backend a program is traced for before any backend has started (the
# device count can be set only until then): `presuming`.
_presumed: list[str] = []


def choices(backend: str | None = None) -> Choices:
    """The choices for `backend` (default: JAX's default backend)."""
    return CHOICES.get(backend or (_presumed[-1] if _presumed else jax.default_backend()), PLAIN)


@contextlib.contextmanager
def presuming(backend: str):
    """Trace as if on `backend`, without asking JAX which one it has
    (asking starts it)."""
    _presumed.append(backend)
    try:
        yield
    finally:
        _presumed.pop()


# ---- host devices: one per core for convolutions (choice 3) -------------------


def host_devices(has_convolution: bool, batch_size: int, cores: int, backend: str = "cpu") -> int:
    """The host devices a run is fastest on: one per core for a model with a
    convolution, where the backend has `conv_devices_per_core`, as many as
    divide the batch evenly (each device takes B / K examples); else 1."""
    if not (has_convolution and choices(backend).conv_devices_per_core):
        return 1
    return max(k for k in range(1, cores + 1) if batch_size % k == 0)


def cores() -> int:
    """The cores this process may run on (its affinity: taskset, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def count_set_by_user() -> str | None:
    """What set the host device count, if the user did: the environment
    variable, jax.config, or XLA's flag."""
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return "JAX_NUM_CPU_DEVICES"
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return "XLA_FLAGS"
    if jax.config.jax_num_cpu_devices not in (None, -1):
        return "jax_num_cpu_devices"
    return None


def wanted_host_devices(config) -> int:
    """`host_devices` for a run of `config` (a TrainConfig), traced for the
    CPU without starting JAX's backend. Per-example gradients formed in
    chunks (--dp-chunk) are computed on one device only, so such a run wants
    one."""
    from jaxbatch.data import catalog
    from jaxbatch.models import get_model

    if config.dp_chunk is not None and (config.dp_clip is not None or config.log_noise_scale):
        return 1
    try:
        shape = catalog.get_spec(config.dataset).image_shape
    except JaxbatchError:  # an image folder or a TFDS name: convolutions do not depend on the size
        shape = (32, 32, 3)
    example = jax.ShapeDtypeStruct(shape, jax.numpy.float32)
    try:
        model = get_model(config.model)
        with presuming("cpu"):
            params = jax.eval_shape(model.init, jax.eval_shape(lambda: jax.random.key(0)), example)
            conv = has_convolution(model.apply, params, example)
    except Exception:  # a model that refuses these inputs: the run's own checks say so, in one line
        return 1
    return host_devices(conv, config.batch_size, cores())


def start_host_devices(config) -> int | None:
    """Before JAX's backend starts: set its CPU device count to
    `wanted_host_devices(config)`, unless the user chose (--devices, or
    `count_set_by_user`); returns the count set, or None. Harmless on a
    machine with an accelerator: only the CPU client gets the devices. Once
    the backend has started (a second run in the same process) the count is
    fixed: None, and `warn_if_few_devices` speaks if it matters."""
    if config.devices is not None or count_set_by_user():
        return None
    count = wanted_host_devices(config)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX: "should be updated before backends are initialized"
        return None
    return count


class DevicesWarning(UserWarning):
    """The backend started with fewer host devices than would help."""


def warn_if_few_devices(config, has_conv: bool) -> None:
    """For the Python API, where JAX started before jaxbatch could choose:
    say (once) when a run would be faster on more host devices, and how to
    get them. Silent where the user chose the count."""
    if jax.default_backend() != "cpu" or config.devices is not None or count_set_by_user() \
            or jax.process_count() > 1:
        return
    if config.dp_chunk is not None and (config.dp_clip is not None or config.log_noise_scale):
        return
    wanted = host_devices(has_conv, config.batch_size, cores())
    if jax.device_count() < wanted:
        warnings.warn(DevicesWarning(
            f"{config.model} has a convolution, and on this {cores()}-core CPU it trains faster over {wanted} host "
            f"devices (data-parallel) than the {jax.device_count()} JAX started with; right after importing jax, "
            f"call jax.config.update('jax_num_cpu_devices', {wanted}) (or set JAX_NUM_CPU_DEVICES={wanted}); "
            "devices=1 in the config keeps one device and this quiet"), stacklevel=4)


def cut_padding_in_step(has_convolution: bool, devices: int) -> bool:
    """Whether a Poisson batch's padding is cut inside each step
    (chunks.front_sum; choice 4) rather than per chunk of steps on the host
    (privacy.trim): where the backend has `padding_cut_in_step`, for a model
    without a convolution on one device."""
    return choices().padding_cut_in_step and not has_convolution and devices == 1


def unroll_loop(body, *args) -> bool:
    """Whether a loop whose body is `body(*args)` should be unrolled here: on
    a backend with `unrolled_conv_steps`, when the body has a convolution."""
    return choices().unrolled_conv_steps is not None and has_convolution(body, *args)


def has_convolution(fn, *args) -> bool:
    """Whether `fn(*args)` computes a convolution: its traced program holds a
    `conv_general_dilated`, at any depth. Asked of the program, so no model
    needs to declare it."""
    return _jaxpr_has(jax.make_jaxpr(fn)(*args).jaxpr, "conv_general_dilated")


def _jaxpr_has(jaxpr, primitive: str) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns") and _jaxpr_has(inner, primitive):
                    return True
    return False
