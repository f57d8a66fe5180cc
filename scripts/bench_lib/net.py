"""Addresses and sockets for the bench, with the one rule that matters most: no vsock connect on the host.

This machine's kernel has AF_VSOCK but no loopback transport, so a vsock
``connect()`` here would reach the hypervisor host, which is not ours.  Every
client connection of the bench goes through :func:`connect`, which refuses
AF_VSOCK unless ``VSOCKPROXY_IN_VM=1`` says we run inside ``scripts/vsock-vm``.
"""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

VMADDR_CID_LOCAL = 1  # the guest itself, through the vsock loopback transport
VMADDR_CID_ANY = socket.VMADDR_CID_ANY
VMADDR_PORT_ANY = 0xFFFFFFFF


class VsockForbidden(RuntimeError):
    """A vsock client connection was attempted outside the nested VM."""


def in_vm() -> bool:
    return os.environ.get("VSOCKPROXY_IN_VM") == "1"


def require_vm(what: str = "connect an AF_VSOCK socket") -> None:
    if not in_vm():
        raise VsockForbidden(f"refusing to {what} outside scripts/vsock-vm (VSOCKPROXY_IN_VM is not 1): "
                             "on this host vsock connects would reach the hypervisor")


class Addr(NamedTuple):
    """A stream socket address: ``family`` and the ``sockaddr`` that socket.connect/bind take."""

    family: int
    sockaddr: tuple

    def __str__(self) -> str:
        if self.family == socket.AF_VSOCK:
            return f"vsock:{self.sockaddr[0]}:{self.sockaddr[1]}"
        return f"tcp:{self.sockaddr[0]}:{self.sockaddr[1]}"

    @property
    def port(self) -> int:
        return self.sockaddr[1]


def parse_addr(text: str) -> Addr:
    """``tcp:HOST:PORT`` (HOST a loopback literal) or ``vsock:CID:PORT`` (CID may be ``any``)."""
    kind, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if kind == "tcp" and host and port.isdigit():
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return Addr(family, (host, int(port)))
    if kind == "vsock" and host and port.isdigit():
        cid = VMADDR_CID_ANY if host == "any" else int(host)
        return Addr(socket.AF_VSOCK, (cid, int(port)))
    raise ValueError(f"bad address {text!r}: expected tcp:HOST:PORT or vsock:CID:PORT")


def tcp(port: int, host: str = "127.0.0.1") -> Addr:
    return Addr(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))


def vsock(port: int, cid: int = VMADDR_CID_LOCAL) -> Addr:
    return Addr(socket.AF_VSOCK, (cid, port))


def new_client_socket(addr: Addr, socket_module=socket):
    """An unconnected stream socket for ``addr``; refuses AF_VSOCK outside the VM."""
    if addr.family == socket.AF_VSOCK:
        require_vm()
    return socket_module.socket(addr.family, socket.SOCK_STREAM)


def connect(addr: Addr, timeout: float, socket_module=socket):
    """A connected client socket (blocking with ``timeout``, or gevent's if ``socket_module`` is gevent.socket)."""
    sock = new_client_socket(addr, socket_module)
    try:
        sock.settimeout(timeout)
        sock.connect(addr.sockaddr)
        if addr.family != socket.AF_VSOCK:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def listen(addr: Addr, backlog: int = 4096) -> socket.socket:
    """A listening socket bound to ``addr`` (port 0 / VMADDR_PORT_ANY picks a free one)."""
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        if addr.family != socket.AF_VSOCK:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sockaddr = addr.sockaddr
        if addr.family == socket.AF_VSOCK and sockaddr[1] == 0:
            sockaddr = (sockaddr[0], VMADDR_PORT_ANY)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bound_addr(sock: socket.socket) -> Addr:
    name = sock.getsockname()
    return Addr(sock.family, tuple(name[:2]))


def free_port(family: int) -> int:
    """A port nobody listens on right now (bound, then released) for a proxy to listen on."""
    if family == socket.AF_VSOCK:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:
            probe.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
            return probe.getsockname()[1]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return probe.getsockname()[1]
