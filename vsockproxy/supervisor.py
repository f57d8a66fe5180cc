"""Runs every configured service in one process and changes them only when asked.

SIGHUP re-reads the YAML file and re-checks every target against the new
allowlist; nothing changes unless all of it is valid and every new listener
binds.  SIGTERM/SIGINT drain, SIGUSR1 logs a one-line summary.  Open
connections never notice a reload: each one keeps the route it started with.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from dataclasses import dataclass, replace
from typing import Callable

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.pywsgi import WSGIServer

from vsockproxy.allowlist import ConfigError, NotAllowed, ProxyConfig, ServiceSpec, load_config
from vsockproxy.loader import load_config_in_child
from vsockproxy.metrics import Metrics
from vsockproxy.notify import Notifier
from vsockproxy.resolver import Resolver
from vsockproxy.server import ListenError, Route, VsockProxyServer, vsock_listener

log = logging.getLogger("vsockproxy")

STATUS_INTERVAL = 5.0


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
        self._metrics_server: WSGIServer | None = None

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
                resolver = Resolver(family, settings.dns_ttl,
                                    on_lookup=self.metrics.service(str(spec.listen_port)).dns)
            try:
                target = config.allowlist.authorize(spec.address, spec.port, resolver)
            except NotAllowed as exc:
                raise NotAllowed(f"{spec}: {exc}") from None
            plans[spec.listen_port] = Plan(spec, Route(target, resolver, spec.connect_timeout,
                                                       spec.idle_timeout))
        return plans

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
        for port, server in servers.items():
            server.start()
            log.info("listening on vsock port %d, forwarding to %s (allowed by %s), %d worker(s)",
                     port, plans[port].route.target, plans[port].route.target.allowed_by,
                     plans[port].spec.num_workers)
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
            self._metrics_server = WSGIServer((host, port), self.metrics.wsgi_app(), log=None, error_log=log)
            self._metrics_server.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise StartupError(f"cannot serve metrics on {address}: {reason}") from None
        log.info("metrics on http://%s/metrics", address)

    def reload(self) -> bool:
        """Apply the file as it is now, or change nothing; returns whether it was applied."""
        with self._reload_lock:
            self.notifier.reloading()
            try:
                applied = self._reload()
            finally:
                self.notifier.ready(self.status())
            return applied

    def _reload(self) -> bool:
        try:
            plans = self.plan(load_config_in_child)
            added = self._bind_all(plan for port, plan in plans.items() if port not in self.servers)
        except (ConfigError, NotAllowed, StartupError, ListenError) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
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
        log.info("reload applied: %d service(s)", len(self.servers))
        return True

    def drain(self, grace: float) -> None:
        """Stop accepting everywhere, give open connections ``grace`` seconds, then end them."""
        servers = [*self.servers.values(), *self._retiring]
        active = sum(server.active_connections for server in servers)
        log.info("stopping: listeners closed, waiting up to %gs for %d open connection(s)", grace, active)
        self.notifier.stopping(f"draining {active} connection(s)")
        gevent.joinall([gevent.spawn(server.stop, grace) for server in servers])
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
        """
        stopping = Event()
        handlers = [
            gevent.signal_handler(signal.SIGTERM, stopping.set),
            gevent.signal_handler(signal.SIGINT, stopping.set),
            gevent.signal_handler(signal.SIGHUP, self._reload_when_started),
            gevent.signal_handler(signal.SIGUSR1, lambda: log.info("%s", self.summary())),
        ]
        reporter = None
        try:
            self.start()
            reporter = gevent.spawn(self._report_status) if self.notifier.enabled else None
            stopping.wait()
            for handler in handlers[:2]:
                handler.cancel()
            handlers[:2] = [gevent.signal_handler(signal.SIGTERM, self.kill_connections),
                            gevent.signal_handler(signal.SIGINT, self.kill_connections)]
            self.drain(self.settings.shutdown_grace)
        finally:
            if reporter is not None:
                reporter.kill()
            for handler in handlers:
                handler.cancel()
            self.notifier.close()

    def _reload_when_started(self) -> None:
        if self._plans:
            gevent.spawn(self.reload)
        else:
            log.warning("SIGHUP ignored: still starting")

    def _report_status(self) -> None:
        while True:
            gevent.sleep(STATUS_INTERVAL)
            self.notifier.send(STATUS=self.status())


def _family(spec: ServiceSpec) -> int:
    return socket.AF_INET if spec.ipv4 else socket.AF_INET6 if spec.ipv6 else socket.AF_UNSPEC


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into a bind address; raises ValueError."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host or any(c in host for c in "[]"):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
