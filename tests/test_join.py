"""Joining several processes (jaxbatch/devices.py) before JAX does: a bad
address is one line before any connection, and every wait for process 0
goes through one connect-and-retry helper, bounded by its deadline."""

import socket
import threading
import time

import pytest
from cli_helpers import cli, one_error_line

from jaxbatch import devices
from jaxbatch.errors import JaxbatchError


@pytest.mark.parametrize("port", ["99999", "65536", "0"])
def test_a_port_out_of_range_is_refused_before_connecting(monkeypatch, port):
    def no_connection(*args, **kwargs):
        raise AssertionError("connected to a port out of range")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket, "create_server", no_connection)
    for process_id in (0, 1):  # process 0 listens, the others connect
        with pytest.raises(JaxbatchError, match=f"port {int(port)} is out of range; pass a port from 1 to 65535"):
            devices.join_cluster(f"127.0.0.1:{port}", 2, process_id, timeout=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_helper_retries_until_process_0_listens_and_returns_the_exchange():
    port = free_port()

    def listen_late():  # process 0 comes after the peer, as it may
        time.sleep(1.0)
        with socket.create_server(("127.0.0.1", port)) as server:
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"go 2")

    server = threading.Thread(target=listen_late)
    server.start()
    try:
        reply = devices.until_answered("127.0.0.1", port, time.monotonic() + 20, 20,
                                       lambda connection: connection.recv(32).decode())
    finally:
        server.join(timeout=25)
    assert reply == "go 2"


def test_the_helper_gives_up_at_its_deadline_with_one_line():
    port = free_port()  # nobody listens there
    started = time.monotonic()
    with pytest.raises(JaxbatchError, match=f"no coordinator answered at 127.0.0.1:{port} within 1 s"):
        devices.until_answered("127.0.0.1", port, started + 1, 1)
    assert time.monotonic() - started < 10


def test_both_waits_of_a_peer_go_through_the_helper(monkeypatch):
    calls = []

    def answered(host, port, deadline, timeout, exchange=None):
        calls.append((host, port, exchange is not None))
        return 2  # process 0's count, for check_in

    monkeypatch.setattr(devices, "until_answered", answered)
    devices.check_in("10.0.0.1", 1234, 2, 1, time.monotonic() + 1, 1)
    devices.wait_for_coordinator("10.0.0.1", 1234, 1)
    assert calls == [("10.0.0.1", 1234, True), ("10.0.0.1", 1234, False)]


@pytest.mark.parametrize("args,message", [
    (("127.0.0.1:1234", 2, None), "--coordinator, --num-processes and --process-id go together; pass all three"),
    ((None, 2, 0), "--coordinator, --num-processes and --process-id go together; pass all three"),
    (("127.0.0.1", 2, 0), "--coordinator '127.0.0.1' is not HOST:PORT, e.g. 10.0.0.1:1234"),
    ((":1234", 2, 0), "--coordinator ':1234' is not HOST:PORT"),
    (("127.0.0.1:http", 2, 0), "--coordinator '127.0.0.1:http' is not HOST:PORT"),
    (("127.0.0.1:1234", 2, 2), r"--process-id 2 is outside 0 \.\. 1"),
    (("127.0.0.1:1234", 2, -1), r"--process-id -1 is outside 0 \.\. 1"),
])
def test_a_bad_join_is_one_line_before_any_connection(monkeypatch, args, message):
    def no_connection(*a, **kw):
        raise AssertionError("connected with bad arguments")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket, "create_server", no_connection)
    with pytest.raises(JaxbatchError, match=message):
        devices.join_cluster(*args, timeout=1)


def test_a_lone_process_joins_nothing(monkeypatch):
    def no_join(*a, **kw):
        raise AssertionError("joined a cluster without being asked")

    monkeypatch.setattr(devices.jax.distributed, "initialize", no_join)
    devices.join_cluster()  # no coordinator, no --distributed: nothing to do


def test_a_port_taken_by_another_program_is_one_line_for_process_0():
    with socket.create_server(("", 0)) as taken:  # listening: process 0 cannot listen there too
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(JaxbatchError, match=f"cannot listen on port {port} for the other processes .*; "
                                                "pass a free port in --coordinator"):
            devices.join_cluster(f"127.0.0.1:{port}", 2, 0, timeout=5)
    assert time.monotonic() - started < 5  # refused at once, not after the join's timeout


def test_distributed_outside_a_cluster_jax_detects_is_one_line(monkeypatch):
    # --distributed calls jax.distributed.initialize() with no arguments; off a
    # TPU pod or SLURM, JAX cannot find a coordinator and says so in many lines.
    seen = {}

    def initialize(**kwargs):
        seen.update(kwargs)
        raise ValueError("coordinator_address should be defined.\nmore lines from JAX")

    monkeypatch.setattr(devices.jax.distributed, "initialize", initialize)
    with pytest.raises(JaxbatchError) as caught:
        devices.join_cluster(timeout=7, detect=True)
    line = str(caught.value)
    assert "\n" not in line and "could not join the cluster's coordinator (coordinator_address should be defined.)" \
        in line and devices.DETECT_HINT in line
    assert seen == {"initialization_timeout": 7}


def test_distributed_on_one_machine_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    # The real call, no stand-in: on a machine that is no TPU pod or SLURM job, JAX finds no coordinator.
    out = tmp_path / "run"
    assert cli("train", "--distributed", "--join-timeout", "5", "--epochs", "1", "--out", str(out)) == 2
    line = one_error_line(capsys)
    assert line.startswith("jaxbatch train: error: could not join the cluster's coordinator") and \
        devices.DETECT_HINT in line, line
    assert not out.exists()
