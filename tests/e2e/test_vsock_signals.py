"""Signals at awkward moments, over real vsock: SIGHUP during the SIGTERM drain, and during start-up.

The host suite (tests/test_signals.py) runs the same cases on TCP stand-in listeners.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.helpers import echo
from tests.e2e.vsock import IO_TIMEOUT, START_TIMEOUT, free_vsock_port, recv_all, recv_exactly, refused, vsock_connect

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]


def services_yaml(target_port: int, listen_ports: list[int]) -> str:
    lines = ["allowlist:", f"- {{address: 127.0.0.1, port: {target_port}}}", "services:"]
    lines += [f"- {{listen_port: {port}, address: 127.0.0.1, port: {target_port}}}" for port in listen_ports]
    return "\n".join(lines) + "\n"


def test_sighup_during_the_drain_opens_no_listener_and_the_held_connection_finishes(proxy, target):
    """After SIGTERM, a SIGHUP with a service added to the file is refused: its port stays closed.

    The held connection keeps the drain going meanwhile, and still relays both ways to its end.
    """
    server = target(echo)
    served, added = free_vsock_port(), free_vsock_port()
    while added == served:
        added = free_vsock_port()
    process = proxy(["--shutdown-grace", "120"], yaml=services_yaml(server.port, [served]))
    with vsock_connect(served) as held:
        held.sendall(b"before")
        assert recv_exactly(held, 6) == b"before"
        process.config.write_text(services_yaml(server.port, [served, added]))
        process.signal(signal.SIGTERM)
        process.wait_for("stopping", timeout=IO_TIMEOUT)
        process.signal(signal.SIGHUP)
        refusal = process.wait_for("reload refused", timeout=IO_TIMEOUT)
        assert "shutting down" in refusal, refusal
        assert refused(added), f"vsock port {added} accepted a connection during the drain"
        held.sendall(b"after")
        assert recv_exactly(held, 5) == b"after"
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == b""
    assert process.finish(timeout=IO_TIMEOUT) == 0, process.text()
    assert not [line for line in process.lines if f"vsock port {added}" in line], process.text()
    closed = [line for line in process.lines if "closed enclave=" in line]
    assert len(closed) == 1 and "end=eof" in closed[0] and "up=11 down=11" in closed[0], process.text()
    assert any("stopped" in line for line in process.lines)


def runs_python_code(pid: int) -> bool:
    """Past the interpreter's own start, which no Python code can shorten: SIGHUP ignored, or gevent loaded."""
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(ignored & (1 << (signal.SIGHUP - 1))) or "/gevent/" in Path(f"/proc/{pid}/maps").read_text()


def test_sighup_and_sigusr1_throughout_start_up_never_kill_it(proxy, target):
    """The real command, started the way systemd does, survives a reload and a summary asked for while starting.

    Under TCG its imports take seconds, so a reload right after start used to kill it (exit -1 / -10).
    """
    server = target(echo)
    port = free_vsock_port()
    process = proxy([], yaml=services_yaml(server.port, [port]), wait=False)
    pid = process.proc.pid
    deadline = time.monotonic() + START_TIMEOUT
    while process.proc.poll() is None and not runs_python_code(pid):
        assert time.monotonic() < deadline, "the interpreter did not start"
        time.sleep(0.001)
    sent = 0
    while not [line for line in process.drain() if "listening on vsock port" in line]:
        assert process.proc.poll() is None, \
            f"killed during start-up after {sent} SIGHUP+SIGUSR1 pairs: exit {process.proc.returncode}"
        assert time.monotonic() < deadline, f"not listening after {START_TIMEOUT}s: {process.text()}"
        process.signal(signal.SIGHUP)
        process.signal(signal.SIGUSR1)
        sent += 1
        time.sleep(0.01)
    assert sent >= 3, f"start-up was too quick to test: {sent} pairs sent"
    with vsock_connect(port) as client:
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"ping"
    assert process.stop(timeout=IO_TIMEOUT) == 0, process.text()
    assert "Traceback" not in process.text()
