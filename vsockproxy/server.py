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
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass

import gevent
import gevent.socket
from gevent.hub import get_hub
from gevent.pool import Pool
from gevent.server import StreamServer

from vsockproxy.allowlist import Target
from vsockproxy.metrics import Metrics, ServiceMetrics
from vsockproxy.pipe import Flow, PeerError, pipe
from vsockproxy.resolver import Endpoint, ResolveError, Resolver

log = logging.getLogger("vsockproxy")

VMADDR_CID_ANY = socket.VMADDR_CID_ANY
#: Errors from accept() that mean "out of resources for now", not "the listener is broken".
TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                     errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


#: Connections accepted per loop pass while descriptors are plentiful, so that a burst leaves
#: the kernel's accept queue quickly: vsock refuses a connect outright when that queue is full.
ACCEPT_BATCH = 32


def _far_from_fd_limit(newest_fd: int, in_use: int) -> bool:
    """Whether a whole batch of connections (two fds each) still fits under RLIMIT_NOFILE.

    Linux hands out the lowest free descriptor, so the newest one is a lower bound,
    at no cost, on how many are open.  Near the limit the server takes one connection
    per loop pass, so each handler opens its target socket before the next accept
    takes another descriptor; otherwise all of them could be left without one.
    """
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(newest_fd, in_use) + 4 * ACCEPT_BATCH < soft_limit


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


@dataclass(frozen=True)
class Route:
    """Where a service's new connections go and how; a reload swaps in a new one whole.

    Each connection reads the route once, so established connections keep the
    route they started with.
    """

    target: Target
    resolver: Resolver
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0


class ConnectError(Exception):
    """No allowed address of the target accepted a connection."""


class VsockProxyServer(StreamServer):
    """Accepts enclave connections on vsock and forwards each along ``route``.

    ``listener`` replaces the vsock socket in tests: any listening stream
    socket (Unix or TCP) will do.
    """

    def __init__(
        self,
        route: Route,
        *,
        port: int = 0,
        cid: int = VMADDR_CID_ANY,
        num_workers: int = 4,
        backlog: int = 4096,
        metrics: ServiceMetrics | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        if listener is None:
            listener = vsock_listener(cid, port, backlog)
        super().__init__(listener, spawn=Pool(num_workers))
        self.max_accept = 1  # until the first accept shows how many descriptors are free
        # Read once: each read of socket.family and .type builds an IntEnum.
        self._accepted_kind = (listener.family, listener.type, listener.proto)
        self.route = route
        self.metrics = metrics if metrics is not None else Metrics().service(str(port))
        self._retired_pools: list[Pool] = []

    @property
    def num_workers(self) -> int:
        return self.pool.size

    @property
    def active_connections(self) -> int:
        return len(self.pool) + sum(len(pool) for pool in self._retired_pools)

    def resize(self, num_workers: int) -> None:
        """Serve new connections from a pool of the new size; open ones finish in the old pool."""
        if num_workers == self.pool.size:
            return
        self._retired_pools = [pool for pool in self._retired_pools if len(pool)]
        self._retired_pools.append(self.pool)
        self.pool._semaphore.unlink(self._start_accepting_if_started)
        self.set_spawn(Pool(num_workers))
        if not self.closed and not self.full():
            self._start_accepting_if_started()

    def start(self) -> None:
        hub = get_hub()
        if AcceptDeferred not in hub.NOT_ERROR:
            hub.NOT_ERROR = hub.NOT_ERROR + (AcceptDeferred,)
        super().start()

    def stop(self, timeout: float | None = None) -> None:
        """Close the listener, let open connections finish for ``timeout`` seconds, then end them."""
        self.close()
        pools = [self.pool, *self._retired_pools]
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        for pool in pools:
            pool.join(timeout=max(0.0, deadline - time.monotonic()))
        for pool in pools:
            pool.kill(block=True, timeout=1)

    def kill_connections(self) -> None:
        for pool in (self.pool, *self._retired_pools):
            pool.kill(block=False)

    def stop_accepting(self) -> None:
        if not self.started:  # closing: a listener that is gone keeps no pause open
            self.metrics.pool_resumed()
        elif self.full():
            self.metrics.pool_paused()
        super().stop_accepting()

    def start_accepting(self) -> None:
        self.metrics.pool_resumed()
        super().start_accepting()

    def do_read(self):
        """Accept one connection as a plain non-blocking socket.

        The pipes drive raw descriptors with their own io watchers, so gevent's
        socket wrapper (and its two watchers) would be built only to be closed.
        accept() running out of fds or memory is logged once per try, and
        gevent's server backs off.
        """
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                raise
            log.warning("accept failed: %s; retrying in %.2f s", exc.strerror, self.delay)
            raise AcceptDeferred(exc.strerror) from None
        self.max_accept = ACCEPT_BATCH if _far_from_fd_limit(fd, 2 * self.active_connections) else 1
        enclave = socket.socket(*self._accepted_kind, fileno=fd)
        enclave.setblocking(False)
        return enclave, address

    def handle(self, enclave: socket.socket, address: object) -> None:
        """Serve one enclave connection; gevent closes ``enclave`` when this returns."""
        route = self.route
        peer = describe_peer(address)
        started = time.monotonic()
        metrics = self.metrics
        metrics.opened()
        try:
            upstream, endpoint = _connect(route)
        except ResolveError as exc:
            log.warning("refused enclave=%s target=%s: %s", peer, route.target, exc)
            metrics.closed("dns")
            return
        except ConnectError as exc:
            log.warning("refused enclave=%s target=%s: %s", peer, route.target, exc)
            metrics.closed("connect")
            return
        except BaseException as exc:
            metrics.closed("shutdown" if isinstance(exc, gevent.GreenletExit) else "internal-error")
            if not isinstance(exc, Exception):
                raise
            # A bug must cost one connection, never the server.
            log.error("refused enclave=%s target=%s: internal error: %r", peer, route.target, exc)
            return
        up = Flow(enclave, "enclave", upstream, "target")
        down = Flow(upstream, "target", enclave, "enclave")
        metrics.relaying(up, down)
        ending = "shutdown"
        try:
            ending = relay(up, down, route.idle_timeout)
        finally:
            if ending != "eof":
                _reset_on_close(enclave)
                _reset_on_close(upstream)
            upstream.close()
            metrics.closed(None if ending == "eof" else ending.split("(")[0], up, down)
            log.info("closed enclave=%s target=%s up=%d down=%d duration=%.3fs end=%s",
                     peer, endpoint, up.bytes, down.bytes, time.monotonic() - started, ending)


def _connect(route: Route) -> tuple[socket.socket, Endpoint]:
    """Try each allowed address in turn; the first that accepts wins."""
    failures = []
    for endpoint in route.target.endpoints(route.resolver):
        try:
            upstream = socket.socket(endpoint.family, socket.SOCK_STREAM)
        except OSError as exc:  # out of fds or memory: this connection fails, the server does not
            raise ConnectError(f"cannot open a socket: {exc.strerror}") from None
        try:
            _connect_within(upstream, endpoint.sockaddr, route.connect_timeout)
        except OSError as exc:
            upstream.close()
            reason = "timed out" if isinstance(exc, socket.timeout) else exc.strerror or str(exc)
            failures.append(f"{endpoint}: {reason}")
            continue
        except BaseException:  # killed while connecting: the socket must not outlive its greenlet
            upstream.close()
            raise
        return upstream, endpoint
    raise ConnectError("; ".join(failures))


def _connect_within(upstream: socket.socket, address: tuple, timeout: float) -> None:
    """Connect a plain socket, left non-blocking for the pipes, parking the greenlet meanwhile.

    gevent's socket wrapper would do the same wait, but builds two io watchers
    per socket that the pipes, which make their own, never use.
    """
    upstream.setblocking(False)
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    error = upstream.connect_ex(address)
    if error == errno.EINPROGRESS:
        gevent.socket.wait_write(upstream.fileno(), timeout, socket.timeout("timed out"))
        error = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


#: SO_LINGER on with a zero timeout: close() sends a reset instead of a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset_on_close(sock: socket.socket) -> None:
    """Make the coming close a TCP reset, so that a peer still receiving sees an error, not a clean end.

    vsock has no such signal: an enclave sees EOF however its connection ends.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass


def relay(up: Flow, down: Flow, idle_timeout: float = 0.0) -> str:
    """Run both directions until each has ended; the first failure ends both.

    Returns how the connection ended, for the log: ``eof`` when both sides
    finished cleanly, ``idle-timeout`` when neither moved a byte for
    ``idle_timeout`` seconds (0 disables it), otherwise the failure.
    """
    pending = [gevent.spawn(_pipe_outcome, up), gevent.spawn(_pipe_outcome, down)]
    pipes = list(pending)
    try:
        while pending:
            timeout = None
            if idle_timeout > 0:
                timeout = max(up.last_active, down.last_active) + idle_timeout - time.monotonic()
                if timeout <= 0:
                    return "idle-timeout"
            for finished in gevent.wait(pending, timeout=timeout, count=1):
                pending.remove(finished)
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
