"""Devices: one program, the batch shared along a "data" mesh axis.

Everything jaxbatch does on several devices goes through this module, as
big_vision keeps its mesh and sharding helpers in one place:

    data_mesh(K)          a one-axis mesh ("data") over the first K devices
    place / fetch         host values -> global arrays laid out on it, and back
    replicated / by_example  the two layouts: everything on every device, or a
                          batch's examples split over the devices
    per_device(fn, mesh)  fn on each device's own examples, with its own copy
                          of the parameters (shard_map)
    join_cluster          several processes (hosts) joined into one JAX runtime

Training needs no more than `data_mesh`, `place` and `fetch`: it jits the
step with the batch split along "data" and XLA inserts the all-reduce that
averages the gradient, so the step's code is the same for 1 device or 256.
`per_device` is for what must stay per device (text D's K gradients, the
per-example norms of clipping), written out with `shard_map`.
"""

from __future__ import annotations

import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch.errors import JaxbatchError

try:
    from jax import shard_map
except ImportError:  # JAX < 0.7
    from jax.experimental.shard_map import shard_map

# per_device's output layouts: one value for all devices (after a psum or
# pmean), or one row per example, each device its own examples' rows.
SHARED = P()
BY_EXAMPLE = P("data")


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh ("data") over the first `devices` devices (default:
    all, across every process). Parameters are replicated on it and each
    step's batch is split along it."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if n > len(available):
        raise JaxbatchError(f"{{setting}} {n} asks for more devices than the {len(available)} "
                            f"{available[0].platform} devices here", setting="devices")
    # Auto axes: XLA propagates the shardings (Explicit is jax.make_mesh's default).
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=available[:n])


def check_divides(batch_size: int, mesh: Mesh) -> None:
    """Each device takes B / K examples of every batch, so K must divide B."""
    if batch_size % mesh.size:
        raise JaxbatchError(f"batch size {batch_size} does not split evenly over {mesh.size} devices; pass a "
                            f"{{setting}} that is a multiple of {mesh.size}, or fewer --devices", setting="batch_size")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def by_example(mesh: Mesh) -> NamedSharding:
    """(steps, B) index and weight arrays: each device gets B / K columns."""
    return NamedSharding(mesh, P(None, "data"))


def place(tree, sharding):
    """Host values -> global arrays laid out by `sharding`. Each process
    supplies only the pieces its own devices hold, so with several processes
    each one feeds its own slice of every global batch."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def fetch(tree):
    """Replicated global arrays -> host numpy, read from this process's first
    copy (with several processes the whole array is not addressable here)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def per_device(fn, mesh: Mesh, out_specs):
    """(params, *batch) -> fn(params, *own_batch) on every device of `mesh`,
    each on its own B / K examples (every batch argument is split along its
    first axis), outputs laid out by `out_specs` (SHARED, BY_EXAMPLE, or a
    tuple of them). `fn` may call `lax.psum`/`lax.pmean` over "data".

    Each device gets its own copy of the parameters (a leading axis of K,
    split over "data", then taken off again inside). Had they been passed
    replicated, autodiff inside shard_map would sum the K devices' gradients
    by itself: text D's pmean would average gradients already summed, and a
    per-example gradient would mix in other devices' examples."""
    def on_device(copies, *batch):
        return fn(jax.tree.map(lambda a: a[0], copies), *batch)

    def run(params, *batch):
        copies = jax.tree.map(lambda a: jnp.broadcast_to(a, (mesh.size, *a.shape)), params)
        return shard_map(on_device, mesh=mesh, in_specs=(BY_EXAMPLE,) * (1 + len(batch)),
                         out_specs=out_specs)(copies, *batch)

    return run


# ---- several processes: one JAX runtime over every host's devices ------------


def join_cluster(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                 timeout: int = 60, detect: bool = False) -> None:
    """Join the other processes before JAX touches a device (one program on
    every process; jax.devices() then lists every process's devices).
    `detect`: jax.distributed.initialize() with no arguments (Cloud TPU pods,
    SLURM: JAX finds the coordinator and this process's number itself).
    With none of these given, a lone process: nothing to do."""
    explicit = (coordinator, num_processes, process_id)
    if not detect and all(v is None for v in explicit):
        return
    if detect:
        _join(jax.distributed.initialize, "the cluster's coordinator", timeout, DETECT_HINT)
        return
    if any(v is None for v in explicit):
        raise JaxbatchError("--coordinator, --num-processes and --process-id go together; pass all three "
                            "(or --distributed on a cluster JAX detects itself)")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise JaxbatchError(f"--coordinator {coordinator!r} is not HOST:PORT, e.g. 10.0.0.1:1234")
    if not 1 <= int(port) <= 65535:  # checked before connecting: a socket reports it as some other failure
        raise JaxbatchError(f"--coordinator {coordinator!r}: port {int(port)} is out of range; pass a port "
                            "from 1 to 65535, e.g. 10.0.0.1:1234")
    if not 0 <= process_id < num_processes:
        raise JaxbatchError(f"--process-id {process_id} is outside 0 .. {num_processes - 1}")
    deadline = time.monotonic() + timeout
    check_in(host, int(port), num_processes, process_id, deadline, timeout)
    if process_id != 0:
        wait_for_coordinator(host, int(port), max(1, int(deadline - time.monotonic())))
    _join(lambda **kw: jax.distributed.initialize(coordinator, num_processes, process_id, **kw),
          f"the coordinator at {coordinator} as process {process_id} of {num_processes}", timeout)
    if jax.process_count() != num_processes:
        # The coordinator's count wins inside XLA; a process started with another
        # one would otherwise train as if nothing were wrong.
        raise JaxbatchError(f"this process was started with --num-processes {num_processes}, but the "
                            f"coordinator at {coordinator} runs {jax.process_count()}; pass the same "
                            "--num-processes to every process", cluster_broken=True)


def check_in(host: str, port: int, num_processes: int, process_id: int, deadline: float, timeout: int) -> None:
    """Every process reports to process 0 on the coordinator's port before
    JAX's own join: XLA's coordination service ends process 0 from C++
    (SIGABRT and a stack trace) when a peer never registers, so a missing
    peer, or one started with another --num-processes, is found here
    instead, as one line on each side. Each peer sends its process count;
    process 0, once all num_processes - 1 have come, answers each with its
    own and frees the port for JAX's coordinator."""
    if process_id != 0:
        return _check_in_peer(host, port, num_processes, deadline, timeout)
    try:
        server = socket.create_server(("", port))
    except OSError as err:
        raise JaxbatchError(f"cannot listen on port {port} for the other processes ({err.strerror or err}); "
                            "pass a free port in --coordinator") from None
    peers, counts = [], []
    with server:
        try:
            while len(peers) < num_processes - 1:
                server.settimeout(max(0.01, deadline - time.monotonic()))
                peer = server.accept()[0]
                peers.append(peer)
                peer.settimeout(max(0.01, deadline - time.monotonic()))
                counts.append(int(peer.recv(32).decode().strip() or -1))
        except (OSError, ValueError):
            for peer in peers:
                peer.close()
            raise JaxbatchError(f"{len(peers)} of the {num_processes - 1} other processes joined within {timeout} s; "
                                "start every process with the same --coordinator and --num-processes, or raise "
                                "--join-timeout") from None
        for peer in peers:
            with peer:
                peer.sendall(f"go {num_processes}".encode())
                try:
                    peer.recv(1)  # the peer closes first, so this port is not left in TIME_WAIT here
                except OSError:
                    pass
    other = next((c for c in counts if c != num_processes), None)
    if other is not None:
        raise JaxbatchError(f"a process started with --num-processes {other} joined this one, started with "
                            f"{num_processes}; pass the same --num-processes to every process")


def _check_in_peer(host: str, port: int, num_processes: int, deadline: float, timeout: int) -> None:
    """A peer's half of check_in: send the count, wait for the go-ahead with process 0's count."""
    def report(connection):
        connection.sendall(f"{num_processes}\n".encode())
        connection.settimeout(max(1.0, deadline - time.monotonic()))
        reply = connection.recv(32).decode().split()
        if len(reply) != 2 or reply[0] != "go" or not reply[1].isdigit():
            raise ConnectionError("process 0 did not answer")
        return int(reply[1])

    count = until_answered(host, port, deadline, timeout, report)
    if count != num_processes:
        raise JaxbatchError(f"this process was started with --num-processes {num_processes}, but the "
                            f"coordinator at {host}:{port} runs {count}; pass the same --num-processes to "
                            "every process")


def wait_for_coordinator(host: str, port: int, timeout: int) -> None:
    """Wait until process 0's coordinator accepts connections. XLA's client,
    when it cannot register in time, ends the process from C++ (SIGABRT and a
    stack trace), so an address nobody answers at is caught here first."""
    until_answered(host, port, time.monotonic() + timeout, timeout)


def until_answered(host: str, port: int, deadline: float, timeout: int, exchange=None):
    """Connect to process 0 at host:port and return `exchange(connection)`
    (None without one), trying again every 0.5 s until `deadline`: process 0
    may not listen yet, or may be between check_in and JAX's coordinator. A
    refused connection, or an exchange raising OSError, counts as no answer;
    at the deadline, one line."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as connection:
                return exchange(connection) if exchange else None
        except OSError as err:
            if time.monotonic() >= deadline:
                raise JaxbatchError(f"no coordinator answered at {host}:{port} within {timeout} s "
                                    f"({err.strerror or err}); start process 0 first, with the same "
                                    "--coordinator, or check the address") from None
            time.sleep(0.5)


JOIN_HINT = "check that process 0 is running at that address and that every process passes the same --num-processes"
DETECT_HINT = ("--distributed is for clusters JAX detects itself (Cloud TPU pods, SLURM); on one machine drop it, "
               "or pass --coordinator, --num-processes and --process-id")


def _join(initialize, what: str, timeout: int, hint: str = JOIN_HINT) -> None:
    """jax.distributed.initialize, bounded in time; a failure is one line."""
    started = time.monotonic()
    try:
        initialize(initialization_timeout=timeout)
    except Exception as err:  # XLA's runtime errors carry many lines; the first says what happened
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        waited = f" within {timeout} s" if time.monotonic() - started >= 0.9 * timeout else ""
        raise JaxbatchError(f"could not join {what}{waited} ({first[:200]}); {hint}") from None


def collective_failed(err: Exception) -> JaxbatchError:
    """A failed collective of a multi-process run, as one line."""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return JaxbatchError(f"a collective with the other processes failed ({first}); another process "
                         "probably stopped: see its output, and check every process passes the same flags",
                         cluster_broken=True)
