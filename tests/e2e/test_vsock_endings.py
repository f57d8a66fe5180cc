"""How connections end over real vsock, where vsock differs from TCP.

- An enclave that closes with replies unread: vsock never reports the proxy's socket writable again,
  nor an error, so a write parked on it must find out some other way (issue 14, defect 1).
- A slow reader under --idle-timeout: every byte it takes is activity, so a transfer that is
  still moving is never cut (defect 2); an idle cut resets the TCP target, while the enclave, on
  vsock, can only see EOF.

One ``vsock-proxy`` process serves all of it, one service per case, since every interpreter start
costs seconds in the TCG-emulated VM.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.helpers import cli_env, echo
from tests.e2e.vsock import (IO_TIMEOUT, ProxyProcess, ThreadedTarget, free_vsock_port, recv_all,
                                recv_exactly, vsock_connect, vsock_proxy_command)

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

MIB = 1 << 20
SLOW_PAYLOAD = os.urandom(3 * MIB // 2)
IDLE_TIMEOUT = 2.0
#: Well past the proxy's 1 s peer check, and well short of the targets' own 60 s socket timeouts.
ENDS_WITHIN = 30.0


@dataclass
class Endings:
    """How each target connection ended, as the target saw it."""

    seen: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def add(self, how: str) -> None:
        self.seen.append(how)
        self.ready.set()


def send_then_wait(payload: bytes, endings: Endings):
    """Target: send ``payload``, then wait for the other side's end and record how it came."""
    def handle(sock: socket.socket) -> None:
        try:
            sock.sendall(payload)
            endings.add("eof" if recv_all(sock) == b"" else "data")
        except ConnectionResetError:
            endings.add("reset")
    return handle


@dataclass
class Rig:
    process: ProxyProcess
    ports: dict[str, int]
    endings: Endings


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """Services: ``echo`` (-w 1), ``slow`` and ``idle`` (both with a short idle timeout)."""
    endings = Endings()
    targets = {"echo": ThreadedTarget(echo), "slow": ThreadedTarget(send_then_wait(SLOW_PAYLOAD, endings)),
               "idle": ThreadedTarget(send_then_wait(b"", endings))}
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(targets):
        ports = {name: free_vsock_port() for name in targets}
    options = {"echo": "num_workers: 1", "slow": f"idle_timeout: {IDLE_TIMEOUT}",
               "idle": f"idle_timeout: {IDLE_TIMEOUT}"}
    config = tmp_path_factory.mktemp("endings") / "vsock-proxy.yaml"
    config.write_text("allowlist:\n"
                      + "".join(f"- {{address: 127.0.0.1, port: {t.port}}}\n" for t in targets.values())
                      + "services:\n"
                      + "".join(f"- {{listen_port: {ports[name]}, address: 127.0.0.1, port: {t.port}, "
                                f"{options[name]}}}\n" for name, t in targets.items()))
    process = ProxyProcess([*vsock_proxy_command(), "--config", str(config)], cli_env())
    try:
        process.wait_listening(count=len(ports))
        yield Rig(process, ports, endings)
        assert process.stop() == 0
    finally:
        process.kill()
        for target in targets.values():
            target.stop()


def closed_line(process: ProxyProcess, client_port: int, timeout: float = ENDS_WITHIN) -> str:
    return process.wait_for(f":{client_port} target=", timeout=timeout)


def test_an_enclave_that_closes_with_replies_unread_frees_its_worker(rig):
    """Stream into an echo target, never read the echo, close once sending blocks."""
    client = vsock_connect(rig.ports["echo"])
    client_port = client.getsockname()[1]
    block = os.urandom(256 * 1024)
    client.settimeout(3.0)
    sent = 0
    try:
        while sent < 512 * MIB:
            sent += client.send(block)
    except socket.timeout:
        pass  # every buffer between here and the target, and back, is full
    finally:
        client.close()
    closed_at = time.monotonic()
    line = closed_line(rig.process, client_port)
    assert line.endswith(" end=enclave-error(Broken pipe)"), line
    print(f"\nclosed {time.monotonic() - closed_at:.1f} s after the enclave went, having sent {sent} B: {line}")
    # The only worker is free again: the next enclave connection is served.
    with vsock_connect(rig.ports["echo"]) as next_client:
        next_client.sendall(b"next")
        assert recv_exactly(next_client, 4) == b"next"


def test_idle_timeout_spares_a_slow_reader_that_keeps_reading(rig):
    """48 KiB every 0.2 s: the transfer takes about three idle timeouts, and must arrive whole."""
    with vsock_connect(rig.ports["slow"]) as client:
        client_port = client.getsockname()[1]
        received = bytearray()
        while True:
            chunk = client.recv(48 * 1024)
            if not chunk:
                break
            received += chunk
            time.sleep(0.2)
            if len(received) == len(SLOW_PAYLOAD):
                client.shutdown(socket.SHUT_WR)  # the target's cue to close
    assert hashlib.sha256(received).digest() == hashlib.sha256(SLOW_PAYLOAD).digest(), len(received)
    line = closed_line(rig.process, client_port)
    assert f" down={len(SLOW_PAYLOAD)} " in line and line.endswith(" end=eof"), line


def test_an_idle_cut_resets_the_target_and_ends_the_enclave(rig):
    rig.endings.seen.clear()
    rig.endings.ready.clear()
    with vsock_connect(rig.ports["idle"]) as client:
        client_port = client.getsockname()[1]
        started = time.monotonic()
        assert client.recv(100) == b""  # vsock has no reset: the enclave sees EOF
        waited = time.monotonic() - started
    line = closed_line(rig.process, client_port)
    assert line.endswith(" end=idle-timeout"), line
    assert waited >= IDLE_TIMEOUT * 0.9, waited
    assert rig.endings.ready.wait(IO_TIMEOUT)
    assert rig.endings.seen == ["reset"]
