"""Runs every configured service in one process and changes them only when asked.

SIGHUP re-reads the YAML file and re-checks every target against the new
allowlist; nothing changes unless all of it is valid and every new listener
binds.  SIGTERM/SIGINT drain, SIGUSR1 logs a one-line summary.  Open
connections never notice a reload: each one keeps the route it started with.
Once the drain has begun, no reload commits: nothing new may open then.

The signal handlers only enqueue; one greenlet dispatches.  SIGHUPs that arrive while a
reload is pending or running fold into one more reload.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.queue import Queue
from prometheus_client import CollectorRegistry

from vsockproxy.allowlist import Allowlist, NotAllowed, Target
from vsockproxy.config import (FIXED, ConfigError, FileConfig, Options, Service, configure, load_file,
                               parse_bind_address)
from vsockproxy.handshake import Parser
from vsockproxy.http_connect import HttpConnectParser
from vsockproxy.listen import Listen, ListenError
from vsockproxy.loader import load_file_in_child
from vsockproxy.metrics import Metrics, ServiceMetrics
from vsockproxy.metrics_server import MetricsServer, metrics_listener
from vsockproxy.notify import Notifier
from vsockproxy.resolver import Endpoint, ResolveError, Resolver
from vsockproxy.server import Admission, NotAdmitted, Route, VsockProxyServer
from vsockproxy.sni import SniParser
from vsockproxy.socks5 import Socks5Parser

log = logging.getLogger("vsockproxy")

STATUS_INTERVAL = 5.0
#: A service whose workers have all been busy this long, with connections waiting, gets a warning...
POOL_FULL_WARNING_AFTER = 10.0
#: ...at most this often.
POOL_FULL_WARNING_EVERY = 60.0
POOL_FULL_CHECK_INTERVAL = 1.0


class StartupError(Exception):
    """The configuration cannot be served; the message says why in one line."""


@dataclass(frozen=True)
class Authorized:
    """A service the allowlist allows: its settings, its target (None when each request names one), its route."""

    service: Service
    target: Target | None
    resolver: Resolver
    route: Route

    def __str__(self) -> str:
        if self.target is None:
            return f"what each {self.service.mode} request names and the allowlist admits"
        return f"{self.target} (allowed by {self.target.allowed_by})"


class Supervisor:
    """Owns the listeners, the metrics endpoint and the signal handling of one process.

    ``listen`` makes each service's listening socket from its port: vsock in
    production (see cli.py), TCP in tests and benchmarks.
    """

    def __init__(self, options: Options, listen: Listen, notifier: Notifier | None = None,
                 metrics: Metrics | None = None) -> None:
        self.options = options
        self.listen = listen
        self.notifier = notifier if notifier is not None else Notifier()
        self.metrics = metrics if metrics is not None else Metrics()
        self.servers: dict[int, VsockProxyServer] = {}
        self._authorized: dict[int, Authorized] = {}
        self._retiring: list[VsockProxyServer] = []
        self._reload_lock = Semaphore()
        self._reload_requested = False
        self._reloader: gevent.Greenlet | None = None
        self._stopping = Event()
        self._metrics_server: MetricsServer | None = None
        self._pool_watcher: gevent.Greenlet | None = None

    # -- configuration -------------------------------------------------------------------------

    def authorize(self, read: Callable[[str], FileConfig] = load_file) -> dict[int, Authorized]:
        """Read the file with ``read`` and authorize every service; raises ConfigError or NotAllowed.

        Start-up reads it in this process (nothing to stall yet), a reload in a child process.
        """
        config = configure(read(self.options.config_path), self.options)
        authorized = {}
        for service in config.services:
            resolver = self._resolver_for(service)
            if service.mode != FIXED:
                authorized[service.listen_port] = Authorized(service, None, resolver,
                                                             _request_route(service, config.allowlist, resolver))
                continue
            try:
                target = config.allowlist.authorize(service.address, service.port, resolver)
                _refuse_if_no_address_may_be_used(target, resolver)
            except NotAllowed as exc:
                raise NotAllowed(f"{service}: {exc}", exc.rule, exc.allowed_by) from None
            route = Route(str(target), partial(_screened_endpoints, target, resolver), service.connect_timeout,
                          service.idle_timeout, from_cids=service.from_cids)
            authorized[service.listen_port] = Authorized(service, target, resolver, route)
        return authorized

    def _resolver_for(self, service: Service) -> Resolver:
        """The service's resolver (and its cache) carries over a reload unless its address family changed."""
        running = self._authorized.get(service.listen_port)
        if running is not None and running.service.family == service.family:
            return running.resolver
        return Resolver(service.family, self.options.dns_ttl, on_lookup=self._dns_counter(str(service.listen_port)))

    def _dns_counter(self, service: str) -> Callable[[bool], None]:
        """Counts into the service's figures of the moment: a resolver outlives reloads, and they may renew them."""
        return lambda ok: self.metrics.service(service).dns(ok)

    def _serve(self, authorized: Authorized) -> VsockProxyServer:
        port = authorized.service.listen_port
        return VsockProxyServer(self.listen(port), authorized.route, num_workers=authorized.service.num_workers,
                                metrics=self.metrics.service(str(port)))

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, announce: bool = True) -> None:
        """Bind every listener (all or none), start serving, then tell systemd we are ready.

        ``announce=False`` leaves the "listening" lines to whoever logs them once for many
        processes (workers.py).
        """
        authorized = self.authorize()
        servers = self._bind_all(authorized.values())
        if self.options.metrics_address:
            try:
                self._start_metrics(self.options.metrics_address)
            except StartupError:
                for server in servers.values():
                    server.close()
                raise
        self._authorized, self.servers = authorized, servers
        self.metrics.serving(str(port) for port in servers)
        for port, server in servers.items():
            server.start()
            if announce:
                log_listening(port, authorized[port])
        self._pool_watcher = gevent.spawn(self._watch_pools)
        self.notifier.ready(self.status())

    def _bind_all(self, services: Iterable[Authorized]) -> dict[int, VsockProxyServer]:
        """A server for each service (all or none), not yet started."""
        servers: dict[int, VsockProxyServer] = {}
        try:
            for authorized in services:
                servers[authorized.service.listen_port] = self._serve(authorized)
        except ListenError:
            for server in servers.values():
                server.close()
            raise
        return servers

    def _start_metrics(self, address: str) -> None:
        self._metrics_server = start_metrics_server(address, self.metrics.registry)

    def reload(self) -> bool:
        """Apply the file as it is now, or change nothing; returns whether it was applied."""
        return reload_once(self._reload_lock, self._stopping, self.notifier, self._reload, self.status)

    def _reload(self) -> bool:
        try:
            authorized = self.authorize(load_file_in_child)
            added = self._bind_all(new for port, new in authorized.items() if port not in self.servers)
        except (ConfigError, NotAllowed, StartupError, ListenError) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            return False
        if self._stopping.is_set():  # the drain began while authorize() waited on DNS
            for server in added.values():
                server.close()
            log.warning("reload refused: shutting down")
            return False
        for port in [port for port in self.servers if port not in authorized]:
            server = self.servers.pop(port)
            server.close()
            self._retiring.append(server)
            log.info("reload: vsock port %d no longer served (%d open connection(s) continue)",
                     port, server.active_connections)
        for port, server in self.servers.items():
            new, old = authorized[port], self._authorized[port]
            server.route = new.route
            server.resize(new.service.num_workers)
            if (new.service, new.target) != (old.service, old.target):
                log.info("reload: vsock port %d now forwards to %s", port, new)
        for port, server in added.items():
            server.start()
            self.servers[port] = server
            log.info("reload: listening on vsock port %d, forwarding to %s", port, authorized[port])
        self._authorized = authorized
        self._retiring = [server for server in self._retiring if server.active_connections]
        self.metrics.serving(str(port) for port in self.servers)
        log.info("reload applied: %d service(s)", len(self.servers))
        return True

    def drain(self, grace: float) -> None:
        """Stop accepting everywhere, give open connections ``grace`` seconds, then end them.

        From here on no reload commits, so the servers closed here are all there will be.
        """
        self._stopping.set()
        servers = [*self.servers.values(), *self._retiring]
        for server in servers:
            server.close()
        active = sum(server.active_connections for server in servers)
        log.info("stopping: listeners closed, waiting up to %gs for %d open connection(s)", grace, active)
        self.notifier.stopping(f"draining {active} connection(s)")
        gevent.joinall([gevent.spawn(server.stop, grace) for server in servers])
        if self._pool_watcher is not None:
            self._pool_watcher.kill()
        if self._metrics_server is not None:
            self._metrics_server.stop(timeout=0)
        log.info("stopped")

    def kill_connections(self) -> None:
        log.info("second signal: closing open connections now")
        for server in [*self.servers.values(), *self._retiring]:
            server.kill_connections()

    # -- reporting -----------------------------------------------------------------------------

    def status(self) -> str:
        active = sum(server.active_connections for server in [*self.servers.values(), *self._retiring])
        return f"{len(self.servers)} service(s), {active} active connection(s)"

    def summary(self) -> str:
        return summary_of((port, server.route.target, server.metrics) for port, server in self.servers.items())

    # -- main loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Start, then serve until SIGTERM or SIGINT; a second one during the drain ends connections.

        The handlers go in before anything binds, so a signal that arrives
        while starting still gets a clean drain.  Start-up errors propagate.
        The signals' previous dispositions come back at the end: gevent would
        leave SIG_DFL, and a SIGHUP while exiting would kill the process.
        """
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        previous = {signum: signal.getsignal(signum) for signum in handled}
        signals: Queue = Queue()
        handlers = [gevent.signal_handler(signum, signals.put, signum) for signum in handled]
        dispatcher = gevent.spawn(self._dispatch, signals)
        reporter = None
        try:
            self.start()
            if self._reload_requested:
                self._reload_soon()
            reporter = gevent.spawn(self._report_status) if self.notifier.enabled else None
            self._stopping.wait()
            self.drain(self.options.shutdown_grace)
        finally:
            dispatcher.kill()
            if reporter is not None:
                reporter.kill()
            for handler in handlers:
                handler.cancel()
            for signum, disposition in previous.items():
                if disposition is not None:  # None: not set from Python, nothing to restore
                    signal.signal(signum, disposition)
            self.notifier.close()

    def _dispatch(self, signals: Queue) -> None:
        """The one place that acts on signals, in the order they came."""
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self._stopping.is_set():  # the second one: the drain ends connections now
                    self.kill_connections()
                self._stopping.set()
            elif signum == signal.SIGHUP:
                self._reload_when_started()
            elif signum == signal.SIGUSR1:
                log.info("%s", self.summary())

    def _reload_when_started(self) -> None:
        """SIGHUP: reload now; while starting, once started (the file may have changed since it was read)."""
        if self._stopping.is_set():
            log.warning("reload refused: shutting down")
        elif self._authorized:
            self._reload_soon()
        elif not self._reload_requested:
            self._reload_requested = True
            log.info("reload requested while starting: reloading once started")

    def _reload_soon(self) -> None:
        """Reload, once more than any reload under way, however many times this is asked meanwhile."""
        self._reload_requested = True
        if self._reloader is None or self._reloader.dead:
            self._reloader = gevent.spawn(self._reload_while_requested)

    def _reload_while_requested(self) -> None:
        while self._reload_requested:
            self._reload_requested = False
            self.reload()

    def _report_status(self) -> None:
        while True:
            gevent.sleep(STATUS_INTERVAL)
            self.notifier.send(STATUS=self.status())

    def _watch_pools(self) -> None:
        """Say when a service's workers have all been busy for long while connections wait for one.

        The default of four workers lets four clients that keep their connections
        open block everyone else, silently but for this warning.
        """
        quiet_until: dict[int, float] = {}
        while True:
            gevent.sleep(POOL_FULL_CHECK_INTERVAL)
            for port, server in list(self.servers.items()):
                busy_for, now = server.metrics.pool_full_for(), time.monotonic()
                if (busy_for < POOL_FULL_WARNING_AFTER or now < quiet_until.get(port, 0.0)
                        or not _connections_waiting(server.socket)):
                    continue
                quiet_until[port] = now + POOL_FULL_WARNING_EVERY
                log.warning("vsock port %d: all %d worker(s) have been busy for %.0f s while connections wait "
                            "in the listen backlog; raise --num_workers (or the service's num_workers), or set "
                            "--idle-timeout so that idle connections give their worker up",
                            port, server.num_workers, busy_for)


def log_listening(port: int, authorized: Authorized) -> None:
    log.info("listening on vsock port %d, forwarding to %s, %d worker(s)", port, authorized,
             authorized.service.num_workers)


def summary_of(services: Iterable[tuple[int, str, ServiceMetrics]]) -> str:
    """SIGUSR1's line: each service's figures, by port."""
    parts = []
    for port, target, metrics in sorted(services, key=lambda service: service[0]):
        counts = " ".join(f"{key}={value}" for key, value in metrics.snapshot().items())
        parts.append(f"port {port}->{target}: {counts}")
    return "summary: " + ("; ".join(parts) or "no services")


def reload_once(lock: Semaphore, stopping: Event, notifier: Notifier, apply: Callable[[], bool],
                status: Callable[[], str]) -> bool:
    """One reload at a time, none once the drain has begun, told to systemd as RELOADING then READY."""
    with lock:
        if stopping.is_set():
            log.warning("reload refused: shutting down")
            return False
        notifier.reloading()
        try:
            return apply()
        finally:
            if not stopping.is_set():  # after STOPPING=1, READY=1 would be a lie
                notifier.ready(status())


def start_metrics_server(address: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` at http://ADDRESS/metrics; raises StartupError."""
    host, port = parse_bind_address(address)
    try:
        listener = metrics_listener(host, port)
    except OSError as exc:  # socket.gaierror too: its strerror is the resolver's message
        raise StartupError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    server = MetricsServer(listener, registry)
    server.start()
    log.info("metrics on http://%s/metrics", address)
    return server


#: The request reader of each request-routed mode; a fresh one per connection.
_PARSERS: dict[str, Callable[[Service], Callable[[], Parser]]] = {
    "http-connect": lambda service: HttpConnectParser,
    "socks5": lambda service: Socks5Parser,
    "sni": lambda service: partial(SniParser, service.port),
}


def _request_route(service: Service, allowlist: Allowlist, resolver: Resolver) -> Route:
    """The route of a service whose connections each name their target, judged by ``allowlist``."""

    def admit(host: str, port: int) -> Admission:
        try:
            target = allowlist.authorize(host, port, resolver, by_address=False)
        except NotAllowed as exc:
            raise NotAdmitted(str(exc), exc.rule, exc.allowed_by) from None
        return Admission(str(target), str(target.allowed_by), partial(_screened_endpoints, target, resolver))

    return Route(service.mode, None, service.connect_timeout, service.idle_timeout, mode=service.mode,
                 parser=_PARSERS[service.mode](service), admit=admit,
                 handshake_timeout=service.handshake_timeout, verify_sni=service.verify_sni,
                 from_cids=service.from_cids)


def _screened_endpoints(target: Target, resolver: Resolver) -> list[Endpoint]:
    """The addresses a connection to ``target`` may try now, screened afresh each time (no DNS rebinding)."""
    try:
        return target.endpoints(resolver)
    except NotAllowed as exc:
        raise NotAdmitted(str(exc), exc.rule, exc.allowed_by) from None


def _refuse_if_no_address_may_be_used(target: Target, resolver: Resolver) -> None:
    """At start-up (and reload), NotAllowed for a fixed target whose every address is denied or internal.

    A name that does not resolve yet may start: each connection resolves and screens again.
    """
    if target.screens_addresses:
        try:
            target.endpoints(resolver)
        except ResolveError:
            pass


def _connections_waiting(listener: socket.socket) -> bool:
    """Whether the listen backlog holds a connection, i.e. the listener is readable now."""
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    return bool(poller.poll(0))
