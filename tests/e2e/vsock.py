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

import hashlib
import os
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from tests.helpers import LoggedProcess, free_vsock_port  # noqa: F401  (free_vsock_port: for the tests)

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


def sha256_of_stream(sock: socket.socket) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    buffer = bytearray(1 << 20)
    while True:
        count = sock.recv_into(buffer)
        if not count:
            return digest.hexdigest(), total
        digest.update(memoryview(buffer)[:count])
        total += count


class ThreadedTarget:
    """A real TCP server (one thread per connection) running ``handler(sock)``."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(self.family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.peers: list[tuple] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            self.peers.append(peer)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(IO_TIMEOUT)
        try:
            self.handler(sock)
        except Exception as exc:  # kept for the test to inspect
            self.errors.append(exc)
        finally:
            sock.close()

    def stop(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


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
