"""The listening side: vsock listening sockets, and taking connections off them without fuss.

Listeners come from a factory (``Listen``: port to listening socket) that the
supervisor is given: the CLI passes vsock's, tests and benchmarks a TCP one, so
the rest of the product runs unchanged on either.

:class:`AcceptingServer` is gevent's StreamServer with one change: when
``accept()`` fails for want of descriptors or memory, it logs one line and lets
gevent's server back off and retry, where gevent would print a multi-line error
report each time.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from typing import Callable

from gevent.hub import get_hub
from gevent.server import StreamServer

log = logging.getLogger("vsockproxy")

VMADDR_CID_ANY = socket.VMADDR_CID_ANY
#: Port to a listening, non-blocking stream socket; raises ListenError.
Listen = Callable[[int], socket.socket]
#: Errors from accept() that mean "out of resources for now", not "the listener is broken".
TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                     errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: Connections accepted per loop pass while descriptors are plentiful, so that a burst leaves
#: the kernel's accept queue quickly: vsock refuses a connect outright when that queue is full.
ACCEPT_BATCH = 32


class ListenError(Exception):
    """A listener could not be set up; the message says why in one line."""


class AcceptDeferred(Exception):
    """accept() failed transiently; gevent's server backs off and retries (already logged)."""


def vsock_listener(port: int, *, cid: int = VMADDR_CID_ANY, backlog: int = 4096) -> socket.socket:
    """A non-blocking AF_VSOCK stream socket listening on ``(cid, port)``."""
    where = f"vsock {'any CID' if cid == VMADDR_CID_ANY else f'CID {cid}'} port {port}"
    try:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenError(f"cannot create a vsock socket: {exc.strerror} "
                          "(does this kernel have the vsock module loaded?)") from None
    return start_listening(listener, (cid, port), backlog, where,
                           {errno.EADDRNOTAVAIL: f"CID {cid} is not this machine's"})


def start_listening(listener: socket.socket, address: tuple, backlog: int, where: str,
                    reasons: dict[int, str] | None = None) -> socket.socket:
    """Bind, listen and go non-blocking, or close ``listener`` and raise a one-line ListenError.

    ``reasons`` words particular errnos for this kind of address.
    """
    try:
        listener.bind(address)
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        reason = {errno.EADDRINUSE: "it is already in use", **(reasons or {})}.get(exc.errno, exc.strerror)
        raise ListenError(f"cannot listen on {where}: {reason}") from None
    return listener


def describe_peer(address: object) -> str:
    """``cid:port`` for vsock (and ``ip:port`` for stand-in TCP) peers."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "local"


def accept_batch(newest_fd: int, in_use: int) -> int:
    """How many connections to accept per loop pass: a batch, or one when descriptors run short.

    Linux hands out the lowest free descriptor, so the newest one is a lower bound,
    at no cost, on how many are open.  Near RLIMIT_NOFILE the server takes one
    connection per loop pass, so that each handler opens its target socket before
    the next accept takes another descriptor; otherwise all of them could be left
    without one.  Each connection costs two descriptors.
    """
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return ACCEPT_BATCH if max(newest_fd, in_use) + 4 * ACCEPT_BATCH < soft_limit else 1


class AcceptingServer(StreamServer):
    """A StreamServer that survives accept() running out of descriptors or memory with one log line.

    Subclasses may take connections their own way by overriding ``accept_connection``.
    """

    #: Put before "accept failed" in the log, to say which listener it was.
    log_prefix = ""

    def start(self) -> None:
        hub = get_hub()
        if AcceptDeferred not in hub.NOT_ERROR:  # documented: exceptions the hub does not report
            hub.NOT_ERROR = hub.NOT_ERROR + (AcceptDeferred,)
        super().start()

    def do_read(self) -> tuple[socket.socket, object] | None:
        try:
            return self.accept_connection()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                raise
            log.warning("%saccept failed: %s; retrying in %.2f s", self.log_prefix, exc.strerror, self.delay)
            raise AcceptDeferred(exc.strerror) from None

    def accept_connection(self) -> tuple[socket.socket, object] | None:
        """One connection and its peer's address, or None when none is waiting."""
        return super().do_read()
