"""Runs every configured service in one process and changes them only when asked.

SIGHUP re-reads the YAML file and re-checks every target against the new
allowlist; nothing changes unless all of it is valid and every new listener
binds.  SIGTERM/SIGINT drain, SIGUSR1 logs a one-line summary.  Open
connections never notice a reload: each one keeps the route it started with.
Once the drain has begun, no reload commits: nothing new may open then.
"""

from __future__ import annotations

import argparse
import logging
import select
import signal
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from vsockproxy.allowlist import ConfigError, NotAllowed, ProxyConfig, ServiceSpec, load_config
from vsockproxy.loader import load_config_in_child
from vsockproxy.metrics import Metrics
from vsockproxy.metrics_server import MetricsServer, metrics_listener
from vsockproxy.notify import Notifier
from vsockproxy.resolver import Resolver
from vsockproxy.server import ListenError, Route, VsockProxyServer, vsock_listener

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
class Plan:
    """One service as it should run: its settings with defaults filled in, and its route."""

    spec: ServiceSpec
    route: Route


class Supervisor:
    """Owns the listeners, the metrics endpoint and the signal handling of one process."""

    def __init__(self, settings: argparse.Namespace, notifier: Notifier | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.notifier = notifier if notifier is not None else Notifier()
        self.metrics = metrics if metrics is not None else Metrics()
        self.servers: dict[int, VsockProxyServer] = {}
        self._plans: dict[int, Plan] = {}
        self._retiring: list[VsockProxyServer] = []
        self._reload_lock = Semaphore()
        self._reload_pending = False
        self._stopping = Event()
        self._metrics_server: MetricsServer | None = None
        self._pool_watcher: gevent.Greenlet | None = None

    # -- configuration -------------------------------------------------------------------------

    def plan(self, load: Callable[[str], ProxyConfig] = load_config) -> dict[int, Plan]:
        """Read the file with ``load`` and authorize every service; raises ConfigError, NotAllowed or StartupError.

        Start-up reads it in this process (nothing to stall yet), a reload in a child process.
        """
        settings = self.settings
        config = load(settings.config)
        specs = [self._with_defaults(spec) for spec in config.services]
        if settings.local_port is not None:
            if any(spec.listen_port == settings.local_port for spec in specs):
                raise StartupError(f"vsock port {settings.local_port} is both on the command line "
                                   f"and in {settings.config}")
            specs.insert(0, self._with_defaults(ServiceSpec(settings.local_port, settings.remote_addr,
                                                            settings.remote_port)))
        if not specs:
            raise StartupError(f"nothing to serve: give LOCAL_PORT REMOTE_ADDR REMOTE_PORT "
                               f"or list services in {settings.config}")
        plans = {}
        for spec in specs:
            old = self._plans.get(spec.listen_port)
            family = _family(spec)
            if old is not None and _family(old.spec) == family:
                resolver = old.route.resolver
            else:
                resolver = Resolver(family, settings.dns_ttl, on_lookup=self._dns_counter(str(spec.listen_port)))
            try:
                target = config.allowlist.authorize(spec.address, spec.port, resolver)
            except NotAllowed as exc:
                raise NotAllowed(f"{spec}: {exc}") from None
            plans[spec.listen_port] = Plan(spec, Route(target, resolver, spec.connect_timeout,
                                                       spec.idle_timeout))
        return plans

    def _dns_counter(self, service: str) -> Callable[[bool], None]:
        """Counts into the service's figures of the moment: a resolver outlives reloads, and they may renew them."""
        return lambda ok: self.metrics.service(service).dns(ok)

    def _with_defaults(self, spec: ServiceSpec) -> ServiceSpec:
        settings = self.settings
        explicit_family = spec.ipv4 or spec.ipv6
        return replace(
            spec,
            num_workers=spec.num_workers or settings.num_workers,
            ipv4=spec.ipv4 if explicit_family else settings.ipv4,
            ipv6=spec.ipv6 if explicit_family else settings.ipv6,
            connect_timeout=spec.connect_timeout or settings.connect_timeout,
            idle_timeout=settings.idle_timeout if spec.idle_timeout is None else spec.idle_timeout,
        )

    def _listen(self, plan: Plan) -> VsockProxyServer:
        settings = self.settings
        listener = vsock_listener(settings.cid, plan.spec.listen_port, settings.backlog)
        return VsockProxyServer(plan.route, port=plan.spec.listen_port, num_workers=plan.spec.num_workers,
                                metrics=self.metrics.service(str(plan.spec.listen_port)), listener=listener)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener (all or none), start serving, then tell systemd we are ready."""
        plans = self.plan()
        servers = self._bind_all(plans.values())
        if self.settings.metrics_address:
            try:
                self._start_metrics(self.settings.metrics_address)
            except StartupError:
                for server in servers.values():
                    server.close()
                raise
        self._plans, self.servers = plans, servers
        self.metrics.serving(str(port) for port in servers)
        for port, server in servers.items():
            server.start()
            log.info("listening on vsock port %d, forwarding to %s (allowed by %s), %d worker(s)",
                     port, plans[port].route.target, plans[port].route.target.allowed_by,
                     plans[port].spec.num_workers)
        self._pool_watcher = gevent.spawn(self._watch_pools)
        self.notifier.ready(self.status())

    def _bind_all(self, plans) -> dict[int, VsockProxyServer]:
        servers: dict[int, VsockProxyServer] = {}
        try:
            for plan in plans:
                servers[plan.spec.listen_port] = self._listen(plan)
        except ListenError:
            for server in servers.values():
                server.close()
            raise
        return servers

    def _start_metrics(self, address: str) -> None:
        host, port = parse_host_port(address)
        try:
            listener = metrics_listener(host, port)
        except OSError as exc:  # socket.gaierror too: its strerror is the resolver's message
            raise StartupError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        self._metrics_server = MetricsServer(listener, self.metrics.registry)
        self._metrics_server.start()
        log.info("metrics on http://%s/metrics", address)

    def reload(self) -> bool:
        """Apply the file as it is now, or change nothing; returns whether it was applied."""
        with self._reload_lock:
            if self._stopping.is_set():
                log.warning("reload refused: shutting down")
                return False
            self.notifier.reloading()
            try:
                applied = self._reload()
            finally:
                if not self._stopping.is_set():  # after STOPPING=1, READY=1 would be a lie
                    self.notifier.ready(self.status())
            return applied

    def _reload(self) -> bool:
        try:
            plans = self.plan(load_config_in_child)
            added = self._bind_all(plan for port, plan in plans.items() if port not in self.servers)
        except (ConfigError, NotAllowed, StartupError, ListenError) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            return False
        if self._stopping.is_set():  # the drain began while plan() waited on DNS
            for server in added.values():
                server.close()
            log.warning("reload refused: shutting down")
            return False
        for port in [port for port in self.servers if port not in plans]:
            server = self.servers.pop(port)
            server.close()
            self._retiring.append(server)
            log.info("reload: vsock port %d no longer served (%d open connection(s) continue)",
                     port, server.active_connections)
        for port, server in self.servers.items():
            server.route = plans[port].route
            server.resize(plans[port].spec.num_workers)
            if plans[port] != self._plans[port]:
                log.info("reload: vsock port %d now forwards to %s", port, plans[port].route.target)
        for port, server in added.items():
            server.start()
            self.servers[port] = server
            log.info("reload: listening on vsock port %d, forwarding to %s", port, plans[port].route.target)
        self._plans = plans
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
        parts = []
        for port, server in sorted(self.servers.items()):
            counts = " ".join(f"{key}={value}" for key, value in server.metrics.snapshot().items())
            parts.append(f"port {port}->{server.route.target}: {counts}")
        return "summary: " + ("; ".join(parts) or "no services")

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
        handlers = [
            gevent.signal_handler(signal.SIGTERM, self._stopping.set),
            gevent.signal_handler(signal.SIGINT, self._stopping.set),
            gevent.signal_handler(signal.SIGHUP, self._reload_when_started),
            gevent.signal_handler(signal.SIGUSR1, lambda: log.info("%s", self.summary())),
        ]
        reporter = None
        try:
            self.start()
            if self._reload_pending:
                gevent.spawn(self.reload)
            reporter = gevent.spawn(self._report_status) if self.notifier.enabled else None
            self._stopping.wait()
            draining = [gevent.signal_handler(signal.SIGTERM, self.kill_connections),
                        gevent.signal_handler(signal.SIGINT, self.kill_connections)]
            for handler in handlers[:2]:  # after the new ones are in: no instant at SIG_DFL
                handler.cancel()
            handlers[:2] = draining
            self.drain(self.settings.shutdown_grace)
        finally:
            if reporter is not None:
                reporter.kill()
            for handler in handlers:
                handler.cancel()
            for signum, disposition in previous.items():
                if disposition is not None:  # None: not set from Python, nothing to restore
                    signal.signal(signum, disposition)
            self.notifier.close()

    def _reload_when_started(self) -> None:
        """SIGHUP: reload now; while starting, once started (the file may have changed since it was read)."""
        if self._stopping.is_set():
            log.warning("reload refused: shutting down")
        elif self._plans:
            gevent.spawn(self.reload)
        elif not self._reload_pending:
            self._reload_pending = True
            log.info("reload requested while starting: reloading once started")

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


def _family(spec: ServiceSpec) -> int:
    return socket.AF_INET if spec.ipv4 else socket.AF_INET6 if spec.ipv6 else socket.AF_UNSPEC


def _connections_waiting(listener: socket.socket) -> bool:
    """Whether the listen backlog holds a connection, i.e. the listener is readable now."""
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into a bind address; raises ValueError."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host or any(c in host for c in "[]"):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
