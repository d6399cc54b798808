"""Joining several processes (jaxbatch/devices.py) before JAX does: a bad
address is one line before any connection, and every wait for process 0
goes through one connect-and-retry helper, bounded by its deadline."""

import socket
import threading
import time

import pytest

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
