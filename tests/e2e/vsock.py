"""Helpers for the end-to-end suite: the real ``vsock-proxy`` command over real AF_VSOCK.

These tests connect AF_VSOCK sockets to CID 1, which only works, and is only
safe, inside the VM that ``scripts/vsock-vm`` boots (it sets
VSOCKPROXY_IN_VM=1).  Anywhere else they are skipped (see conftest.py), and
``vsock_connect`` refuses outright, because on a host without a vsock loopback
transport a connect to CID 1, 2 or 3 leaves the machine.

Targets are plain threaded TCP servers, since the test process itself uses
blocking sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

from tests.helpers import LoggedProcess, ThreadedTarget, free_vsock_port, sha256_of_stream  # noqa: F401  (for the tests)

IN_VM = os.environ.get("VSOCKPROXY_IN_VM") == "1"
VMADDR_CID_LOCAL = 1
#: Generous: the VM runs under TCG, where one interpreter start takes seconds.
START_TIMEOUT = 90.0
IO_TIMEOUT = 60.0


def vsock_connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A client connected to vsock (CID 1, ``port``): the enclave's side of the proxy."""
    if not IN_VM:
        raise RuntimeError("refusing to connect AF_VSOCK outside the test VM (VSOCKPROXY_IN_VM is not 1)")
    client = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect((VMADDR_CID_LOCAL, port))
    except BaseException:
        client.close()
        raise
    return client


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(min(1 << 20, size - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)


def vsock_proxy_command() -> list[str]:
    """The installed console script when there is one, so the e2e suite runs the real command."""
    script = Path(sys.executable).parent / "vsock-proxy"
    if script.exists():
        return [str(script)]
    found = shutil.which("vsock-proxy")
    return [found] if found else [sys.executable, "-m", "vsockproxy"]


class ProxyProcess(LoggedProcess):
    """A running ``vsock-proxy`` with its stderr collected."""

    def wait_listening(self, count: int = 1) -> None:
        self.wait_for("listening on vsock port", timeout=START_TIMEOUT, count=count)

    def stop(self, timeout: float = 60) -> int:
        self.signal()
        return self.finish(timeout=timeout)


def refused(port: int) -> bool:
    """Whether a vsock connect to ``port`` (CID 1, inside the VM) is refused."""
    try:
        vsock_connect(port, timeout=10).close()
    except OSError:
        return True
    return False
