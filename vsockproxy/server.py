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
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

import gevent
import gevent.socket
from gevent.pool import Pool

from vsockproxy.handshake import CONNECTED, NOT_ALLOWED, REFUSED, TIMED_OUT, UNREACHABLE, Parser, Refusal
from vsockproxy.hostnames import host_port
from vsockproxy.listen import AcceptingServer, accept_batch, describe_peer
from vsockproxy.metrics import ServiceMetrics
from vsockproxy.pipe import Flow, PeerError, pipe
from vsockproxy.resolver import Endpoint, ResolveError
from vsockproxy.routing import (HandshakeTimeout, answer, answer_and_close, client_hello_check, read_request,
                                send_all)

log = logging.getLogger("vsockproxy")

#: The connections_failed reason of a connection from an enclave the service's from_cids does not list.
WRONG_CID = "cid-not-allowed"
#: SO_LINGER on with a zero timeout: close() sends a reset instead of a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class Admission:
    """A requested target that the allowlist admits: its name, the entry that admitted it, its addresses now."""

    target: str                                 # host:port
    allowed_by: str                             # the allowlist entry, as the file spells it
    endpoints: Callable[[], list[Endpoint]]     # raises ResolveError, or NotAdmitted if every address is refused


class NotAdmitted(Exception):
    """The allowlist does not admit a requested target (or any of its addresses); the message says why.

    ``outcome`` names the rule that refused it, for the metrics: not-allowed, denied, internal-address.
    """

    def __init__(self, message: str, outcome: str = NOT_ALLOWED, allowed_by: str = "") -> None:
        super().__init__(message)
        self.outcome = outcome
        self.allowed_by = allowed_by


@dataclass(frozen=True)
class Route:
    """Where a service's new connections go and how; a reload swaps in a new one whole.

    Each connection reads the route once, so established connections keep the
    route they started with.  A fixed route names its target; a request-routed
    one reads it from each connection with a fresh ``parser()`` and asks ``admit``.
    """

    target: str                                 # host:port (or the mode), as the log names it
    endpoints: Callable[[], list[Endpoint]] | None  # a fixed target's addresses now; raises ResolveError
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0
    mode: str = "fixed"
    parser: Callable[[], Parser] | None = None  # None: the fixed target
    admit: Callable[[str, int], Admission] | None = None  # raises NotAdmitted
    handshake_timeout: float = 10.0
    verify_sni: bool = False
    from_cids: frozenset[int] | None = None  # the enclaves that may connect; None: any


class ConnectError(Exception):
    """No allowed address of the target accepted a connection."""

    def __init__(self, message: str, outcome: str = UNREACHABLE) -> None:
        super().__init__(message)
        self.outcome = outcome  # what a request-routed client is told: refused, timed-out or unreachable


class Refused(Exception):
    """A connection that will not be relayed: counted, and logged with this message (a request was answered)."""

    def __init__(self, message: str, failure: str, outcome: str, allowed_by: str = "") -> None:
        super().__init__(message)
        self.failure = failure          # the connections_failed reason
        self.outcome = outcome          # the requests outcome
        self.allowed_by = allowed_by    # the admitting entry, if the allowlist got to say


class VsockProxyServer(AcceptingServer):
    """Accepts enclave connections on ``listener`` and forwards each along ``route``.

    The listener is vsock in production; any listening stream socket (TCP, Unix) serves in tests.
    """

    def __init__(self, listener: socket.socket, route: Route, *, num_workers: int,
                 metrics: ServiceMetrics) -> None:
        super().__init__(listener, spawn=Pool(num_workers))
        self.max_accept = 1  # until the first accept shows how many descriptors are free
        self.route = route
        self.metrics = metrics
        self._retired_pools: list[Pool] = []

    def handle(self, enclave: socket.socket, address: object) -> None:
        """Serve one enclave connection; gevent closes ``enclave`` when this returns."""
        route = self.route
        peer = describe_peer(address)
        started = time.monotonic()
        metrics = self.metrics
        metrics.opened()
        if route.from_cids is not None and _peer_cid(address) not in route.from_cids:
            # Before anything is read or connected: another enclave's connection costs nothing more.
            cid = _peer_cid(address)
            log.warning("refused enclave=%s %s: %s in the service's from_cids (%s)", peer, _subject(route),
                        "not a vsock peer, so not" if cid is None else f"CID {cid} is not",
                        ", ".join(str(cid) for cid in sorted(route.from_cids)))
            metrics.closed(WRONG_CID)
            return
        try:
            if route.parser is None:
                upstream, endpoint = _connect_fixed(route)
                names, sent, received = f"enclave={peer} target={endpoint}", 0, 0
            else:
                upstream, names, sent, received = self._open_requested(enclave, peer, route, started)
        except Refused as exc:
            log.warning("refused enclave=%s %s: %s", peer, _subject(route), exc)
            if route.parser is not None:
                metrics.request(route.mode, exc.outcome, exc.allowed_by)
            metrics.closed(exc.failure)
            return
        except BaseException as exc:
            metrics.closed("shutdown" if isinstance(exc, gevent.GreenletExit) else "internal-error")
            if not isinstance(exc, Exception):
                raise
            # A bug must cost one connection, never the server.
            log.error("refused enclave=%s %s: internal error: %r", peer, _subject(route), exc)
            return
        self._relay(enclave, upstream, route, names, started, sent, received)

    def _relay(self, enclave: socket.socket, upstream: socket.socket, route: Route, names: str,
               started: float, up_bytes: int = 0, down_bytes: int = 0) -> None:
        """Relay until both directions end, then close the target and log the connection's one line."""
        up = Flow(enclave, "enclave", upstream, "target")
        up.bytes = up_bytes  # what already went to the target: a request's early data
        down = Flow(upstream, "target", enclave, "enclave")
        down.bytes = down_bytes  # what the target sent while verify_sni waited
        metrics = self.metrics
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
            log.info("closed %s up=%d down=%d duration=%.3fs end=%s",
                     names, up.bytes, down.bytes, time.monotonic() - started, ending)

    def _open_requested(self, enclave: socket.socket, peer: str, route: Route, started: float
                        ) -> tuple[socket.socket, str, int, int]:
        """Read the request and connect where it asks, if the allowlist admits it; raises Refused.

        Returns the target's socket, the connection's names for its log line, and
        how many bytes went to the target and came from it already.
        """
        parser = route.parser()
        deadline = started + route.handshake_timeout
        outcome = read_request(enclave, parser, deadline)
        if isinstance(outcome, Refusal):
            answer_and_close(enclave, outcome.reply, deadline)
            raise Refused(f"bad request: {outcome.reason}", "handshake", outcome.outcome)
        requested = host_port(outcome.host, outcome.port)
        try:
            admission = route.admit(outcome.host, outcome.port)
        except NotAdmitted as exc:
            answer_and_close(enclave, parser.reply(NOT_ALLOWED), deadline)
            raise Refused(f"request={requested}: {exc}", exc.outcome, exc.outcome, exc.allowed_by) from None
        try:
            upstream, endpoint = _connect(admission.endpoints, route.connect_timeout)
        except NotAdmitted as exc:  # every address it has now is refused
            answer_and_close(enclave, parser.reply(NOT_ALLOWED), deadline + route.connect_timeout)
            raise Refused(f"request={requested}: {exc}", exc.outcome, exc.outcome, admission.allowed_by) from None
        except ResolveError as exc:
            answer_and_close(enclave, parser.reply(UNREACHABLE), deadline + route.connect_timeout)
            raise Refused(f"request={requested}: {exc}", "dns", UNREACHABLE, admission.allowed_by) from None
        except ConnectError as exc:
            answer_and_close(enclave, parser.reply(exc.outcome), deadline + route.connect_timeout)
            raise Refused(f"request={requested}: {exc}", "connect", exc.outcome, admission.allowed_by) from None
        try:
            early_data, received = outcome.early_data, 0
            # The enclave has its answer at once; the ClientHello check gets a fresh handshake timeout.
            if answer(enclave, parser.reply(CONNECTED), time.monotonic() + route.handshake_timeout) \
                    and route.verify_sni:
                refusal, early_data, received = client_hello_check(enclave, upstream, outcome.host, early_data,
                                                                   time.monotonic() + route.handshake_timeout)
                if refusal is not None:
                    _reset_on_close(upstream)
                    raise Refused(f"request={requested}: verify_sni: {refusal}", "handshake", "sni-mismatch",
                                  admission.allowed_by)
            if early_data:
                try:
                    send_all(upstream, early_data, time.monotonic() + route.connect_timeout)
                except (OSError, HandshakeTimeout) as exc:
                    _reset_on_close(upstream)
                    raise Refused(f"request={requested}: the target did not take the request's first bytes: "
                                  f"{getattr(exc, 'strerror', None) or 'timed out'}", "target-error",
                                  "target-error", admission.allowed_by) from None
        except BaseException:
            upstream.close()
            raise
        self.metrics.request(route.mode, CONNECTED, admission.allowed_by)
        names = (f"enclave={peer} mode={route.mode} request={requested} allowed_by={admission.allowed_by} "
                 f"target={endpoint}")
        return upstream, names, len(early_data), received

    @property
    def num_workers(self) -> int:
        return self.pool.size

    @property
    def active_connections(self) -> int:
        return len(self.pool) + sum(len(pool) for pool in self._retired_pools)

    def resize(self, num_workers: int) -> None:
        """Serve new connections from a pool of the new size; open ones finish in the old pool.

        A slot freed in an old pool still calls start_accepting(), which then finds
        the current pool full and keeps the listener paused.
        """
        if num_workers == self.pool.size:
            return
        self._retired_pools = [pool for pool in self._retired_pools if len(pool)]
        self._retired_pools.append(self.pool)
        self.set_spawn(Pool(num_workers))
        if self.started:
            self.start_accepting()

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
        if self.full():
            return
        self.metrics.pool_resumed()
        super().start_accepting()

    def accept_connection(self) -> tuple[socket.socket, object]:
        """Accept one connection as a plain non-blocking socket.

        The listener is the standard library's socket, not gevent's: the pipes drive
        raw descriptors with their own io watchers, so gevent's socket wrapper (and
        its two watchers) would be built only to be closed.
        """
        enclave, address = self.socket.accept()
        enclave.setblocking(False)
        self.max_accept = accept_batch(enclave.fileno(), 2 * self.active_connections)
        return enclave, address


def _subject(route: Route) -> str:
    """What a refused connection asked for, as its log line names it."""
    return f"target={route.target}" if route.parser is None else f"mode={route.mode}"


def _connect_fixed(route: Route) -> tuple[socket.socket, Endpoint]:
    """Connect to a fixed route's target; raises Refused."""
    try:
        return _connect(route.endpoints, route.connect_timeout)
    except NotAdmitted as exc:
        raise Refused(str(exc), exc.outcome, exc.outcome) from None
    except ResolveError as exc:
        raise Refused(str(exc), "dns", UNREACHABLE) from None
    except ConnectError as exc:
        raise Refused(str(exc), "connect", exc.outcome) from None


def _peer_cid(address: object) -> int | None:
    """The CID of a vsock peer address ``(cid, port)``; None for any other kind (a TCP peer's host is a str)."""
    if isinstance(address, tuple) and address and isinstance(address[0], int):
        return address[0]
    return None


def _connect(endpoints: Callable[[], list[Endpoint]], timeout: float) -> tuple[socket.socket, Endpoint]:
    """Try each allowed address in turn; the first that accepts wins."""
    failures = []
    outcomes = set()
    for endpoint in endpoints():
        try:
            # Non-blocking from birth (what the pipes want): one system call fewer than setblocking().
            upstream = socket.socket(endpoint.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # out of fds or memory: this connection fails, the server does not
            raise ConnectError(f"cannot open a socket: {exc.strerror}") from None
        try:
            _connect_within(upstream, endpoint.sockaddr, timeout)
        except OSError as exc:
            upstream.close()
            timed_out = isinstance(exc, socket.timeout)
            outcomes.add(TIMED_OUT if timed_out else REFUSED if exc.errno == errno.ECONNREFUSED else UNREACHABLE)
            failures.append(f"{endpoint}: {'timed out' if timed_out else exc.strerror or str(exc)}")
            continue
        except BaseException:  # killed while connecting: the socket must not outlive its greenlet
            upstream.close()
            raise
        return upstream, endpoint
    raise ConnectError("; ".join(failures), outcomes.pop() if len(outcomes) == 1 else UNREACHABLE)


def _connect_within(upstream: socket.socket, address: tuple, timeout: float) -> None:
    """Connect a plain non-blocking socket, parking the greenlet meanwhile.

    gevent's socket wrapper would do the same wait, but builds two io watchers
    per socket that the pipes, which make their own, never use.
    """
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    error = upstream.connect_ex(address)
    if error == errno.EINPROGRESS:
        gevent.socket.wait_write(upstream.fileno(), timeout, socket.timeout("timed out"))
        error = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


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
