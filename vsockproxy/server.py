"""The vsock listener: one pooled greenlet per enclave connection, relaying to the allowed target.

Modelled on gevent's ``examples/portforwarder.py``: a small StreamServer
subclass whose ``handle`` connects out and joins two pipe greenlets.  The
spawn pool is sized to ``num_workers``; when it is full gevent stops calling
``accept()``, so further enclave connections wait in the kernel's listen
backlog and are taken in order as slots free up.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from typing import Iterable

import gevent
import gevent.socket
from gevent.event import Event
from gevent.hub import get_hub
from gevent.pool import Pool
from gevent.server import StreamServer

from vsockproxy.allowlist import Target
from vsockproxy.pipe import Flow, PeerError, pipe
from vsockproxy.resolver import Endpoint, ResolveError, Resolver

log = logging.getLogger("vsockproxy")

VMADDR_CID_ANY = socket.VMADDR_CID_ANY
#: Errors from accept() that mean "out of resources for now", not "the listener is broken".
TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                     errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class ListenError(Exception):
    """The vsock listener could not be set up; the message says why in one line."""


class AcceptDeferred(Exception):
    """accept() failed transiently; gevent's server backs off and retries (already logged)."""


def vsock_listener(cid: int, port: int, backlog: int) -> socket.socket:
    """A non-blocking AF_VSOCK stream socket listening on ``(cid, port)``."""
    where = f"vsock {'any CID' if cid == VMADDR_CID_ANY else f'CID {cid}'} port {port}"
    try:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenError(f"cannot create a vsock socket: {exc.strerror} "
                          "(does this kernel have the vsock module loaded?)") from None
    try:
        listener.bind((cid, port))
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {where}: it is already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ListenError(f"cannot listen on {where}: CID {cid} is not this machine's") from None
        raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None
    return listener


def describe_peer(address: object) -> str:
    """``cid:port`` for vsock (and ``ip:port`` for stand-in TCP) peers."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "local"


class VsockProxyServer(StreamServer):
    """Accepts enclave connections on vsock and forwards each to ``target``.

    ``listener`` replaces the vsock socket in tests: any listening stream
    socket (Unix or TCP) will do.
    """

    def __init__(
        self,
        target: Target,
        resolver: Resolver,
        *,
        port: int = 0,
        cid: int = VMADDR_CID_ANY,
        num_workers: int = 4,
        backlog: int = 4096,
        connect_timeout: float = 10.0,
        listener: socket.socket | None = None,
    ) -> None:
        if listener is None:
            listener = vsock_listener(cid, port, backlog)
        super().__init__(listener, spawn=Pool(num_workers))
        self.target = target
        self.resolver = resolver
        self.connect_timeout = connect_timeout

    def start(self) -> None:
        hub = get_hub()
        if AcceptDeferred not in hub.NOT_ERROR:
            hub.NOT_ERROR = hub.NOT_ERROR + (AcceptDeferred,)
        super().start()

    def do_read(self):
        """Survive accept() running out of fds or memory: log once per try, let gevent back off."""
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                raise
            log.warning("accept failed: %s; retrying in %.2f s", exc.strerror, self.delay)
            raise AcceptDeferred(exc.strerror) from None

    @property
    def active_connections(self) -> int:
        return len(self.pool)

    def handle(self, enclave: socket.socket, address: object) -> None:
        """Serve one enclave connection; gevent closes ``enclave`` when this returns."""
        peer = describe_peer(address)
        started = time.monotonic()
        try:
            upstream, endpoint = self._connect()
        except (ResolveError, ConnectError) as exc:
            log.warning("refused enclave=%s target=%s: %s", peer, self.target, exc)
            return
        except Exception as exc:  # a bug must cost one connection, never the server
            log.error("refused enclave=%s target=%s: internal error: %r", peer, self.target, exc)
            return
        up = Flow(enclave, "enclave", upstream, "target")
        down = Flow(upstream, "target", enclave, "enclave")
        ending = "shutdown"
        try:
            ending = relay(up, down)
        finally:
            upstream.close()
            log.info("closed enclave=%s target=%s up=%d down=%d duration=%.3fs end=%s",
                     peer, endpoint, up.bytes, down.bytes, time.monotonic() - started, ending)

    def _connect(self) -> tuple[socket.socket, Endpoint]:
        """Try each allowed address in turn; the first that accepts wins."""
        failures = []
        for endpoint in self.target.endpoints(self.resolver):
            upstream = gevent.socket.socket(endpoint.family, socket.SOCK_STREAM)
            try:
                upstream.settimeout(self.connect_timeout)
                upstream.connect(endpoint.sockaddr)
                upstream.settimeout(None)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError as exc:
                upstream.close()
                reason = "timed out" if isinstance(exc, socket.timeout) else exc.strerror or str(exc)
                failures.append(f"{endpoint}: {reason}")
                continue
            return upstream, endpoint
        raise ConnectError("; ".join(failures))


class ConnectError(Exception):
    """No allowed address of the target accepted a connection."""


def relay(up: Flow, down: Flow) -> str:
    """Run both directions until each has ended; the first failure ends both.

    Returns how the connection ended, for the log: ``eof`` when both sides
    finished cleanly, otherwise the failure.
    """
    pipes = [gevent.spawn(_pipe_outcome, up), gevent.spawn(_pipe_outcome, down)]
    try:
        for finished in gevent.iwait(pipes):
            if finished.value is not None:
                return finished.value
        return "eof"
    finally:
        gevent.killall(pipes)


def _pipe_outcome(flow: Flow) -> str | None:
    """Run one pipe and turn its failure into a log phrase, so greenlets never print tracebacks."""
    try:
        pipe(flow)
    except PeerError as exc:
        return f"{exc.side}-error({exc.error.strerror or exc.error})"
    except Exception as exc:  # pragma: no cover - a bug; keep the server alive and say so
        log.error("internal error in %s->%s pipe: %r", flow.source_name, flow.sink_name, exc)
        return "internal-error"
    return None


def serve_until_signalled(servers: Iterable[VsockProxyServer], grace: float) -> None:
    """Serve until SIGTERM or SIGINT, then drain open connections for up to ``grace`` seconds.

    A second signal during the drain ends the remaining connections at once.
    """
    servers = list(servers)
    stopping = Event()
    handlers = [gevent.signal_handler(signum, stopping.set) for signum in (signal.SIGTERM, signal.SIGINT)]
    try:
        for server in servers:
            server.start()
        stopping.wait()
        for handler in handlers:
            handler.cancel()
        handlers = [gevent.signal_handler(signum, _kill_all, servers)
                    for signum in (signal.SIGTERM, signal.SIGINT)]
        active = sum(server.active_connections for server in servers)
        log.info("stopping: listener closed, waiting up to %gs for %d open connection(s)", grace, active)
        gevent.joinall([gevent.spawn(server.stop, grace) for server in servers])
        log.info("stopped")
    finally:
        for handler in handlers:
            handler.cancel()


def _kill_all(servers: list[VsockProxyServer]) -> None:
    log.info("second signal: closing open connections now")
    for server in servers:
        server.pool.kill(block=False)
