"""Per-service figures, exported in Prometheus' text format by ``prometheus_client``.

Each service's figures are plain numbers, turned into metric families only
when scraped.  So the data path pays nothing per chunk, and what a scrape
cannot know from finished connections alone is added at that moment: the
bytes that open connections have written so far (their ``Flow.bytes``) and
the time the current pool-full pause has lasted.  A service that a reload
stopped serving is dropped from the export once its last connection ends.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from vsockproxy.pipe import Flow


class Metrics:
    """The figures of every service of the process, and the collector that exports them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._services: dict[str, ServiceMetrics] = {}
        self.registry.register(self)

    def service(self, name: str) -> "ServiceMetrics":
        """The figures of service ``name``, shared by every listener that serves it in turn."""
        service = self._services.get(name)
        if service is None:
            service = self._services[name] = ServiceMetrics(name, self._drop)
        return service

    def serving(self, names: Iterable[str]) -> None:
        """Say which services are served now: the others go once their last connection has ended."""
        names = set(names)
        for name, service in list(self._services.items()):
            service.served = name in names
            if service.done:
                del self._services[name]

    def state(self) -> dict[str, dict[str, object]]:
        """Every service's figures as plain data: what a worker of ``--processes N`` reports to its parent."""
        return {name: service.state() for name, service in self._services.items()}

    def _drop(self, service: "ServiceMetrics") -> None:
        if self._services.get(service.name) is service:
            del self._services[service.name]

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus_client at every scrape."""
        services = list(self._services.values())
        labels = ["service"]

        def counter(name: str, documentation: str, value: Callable[[ServiceMetrics], float]) -> Metric:
            family = CounterMetricFamily(f"vsockproxy_{name}", documentation, labels=labels)
            for service in services:
                family.add_metric([service.name], value(service), created=service.created)
            return family

        active = GaugeMetricFamily("vsockproxy_active_connections", "Connections being relayed now.",
                                   labels=labels)
        for service in services:
            active.add_metric([service.name], service.active)
        yield active
        yield counter("connections_accepted", "Enclave connections accepted.", lambda s: s.accepted)
        yield counter("connections_completed", "Connections relayed until both sides ended cleanly.",
                      lambda s: s.completed)
        failed = CounterMetricFamily("vsockproxy_connections_failed", "Connections ended by a failure, by reason.",
                                     labels=["service", "reason"])
        for service in services:
            for reason, count in service.failures.items():
                failed.add_metric([service.name, reason], count, created=service.created)
        yield failed
        moved = CounterMetricFamily("vsockproxy_bytes", "Bytes relayed, by direction.",
                                    labels=["service", "direction"])
        for service in services:
            up, down = service.bytes_moved()
            moved.add_metric([service.name, "enclave_to_target"], up, created=service.created)
            moved.add_metric([service.name, "target_to_enclave"], down, created=service.created)
        yield moved
        yield counter("dns_lookups", "DNS look-ups made (cache misses).", lambda s: s.dns_lookups)
        yield counter("dns_failures", "DNS look-ups that failed.", lambda s: s.dns_failures)
        requests = CounterMetricFamily(
            "vsockproxy_requests", "Requests of request-routed services, by mode, outcome and the allowlist entry "
            "that admitted them (empty when none did).", labels=["service", "mode", "outcome", "allowed_by"])
        for service in services:
            for (mode, outcome, allowed_by), count in service.requests.items():
                requests.add_metric([service.name, mode, outcome, allowed_by], count, created=service.created)
        yield requests
        yield counter("pool_full", "Times every worker was busy and accepting paused.", lambda s: s.pool_full)
        yield counter("pool_full_seconds", "Time accepting was paused with every worker busy.",
                      lambda s: s.pool_full_seconds())


class ServiceMetrics:
    """One service's tallies: what its connections report, read by scrapes and the SIGUSR1 summary.

    Every other attribute is a figure (a number, or a dict of numbers), which ``state``
    exports and ``add`` sums, so that a figure added here reaches the totals of
    ``--processes N`` without more code.
    """

    #: Attributes that are no figures: identity, and the workings of bytes_moved() and pool_full_seconds().
    NOT_FIGURES = frozenset({"name", "created", "served", "_drop", "_relaying", "_paused_at"})
    #: Figures that are levels, not running totals: a worker that has exited has none left.
    GAUGES = frozenset({"active"})

    def __init__(self, name: str, drop: Callable[["ServiceMetrics"], None] | None = None) -> None:
        self.name = name
        self.created = time.time()
        self.served = True
        self._drop = drop
        self.active = 0
        self.accepted = 0
        self.completed = 0
        self.failures: dict[str, int] = {}
        # (mode, outcome, allowlist entry): bounded by the file and the fixed outcome labels, never by request text
        self.requests: dict[tuple[str, str, str], int] = {}
        self.dns_lookups = 0
        self.dns_failures = 0
        self.pool_full = 0
        self._closed_up = 0
        self._closed_down = 0
        self._relaying: dict[Flow, Flow] = {}
        self._paused_seconds = 0.0
        self._paused_at: float | None = None

    @property
    def done(self) -> bool:
        """No longer served and no connection left: its series can go."""
        return not self.served and not self.active

    def opened(self) -> None:
        self.accepted += 1
        self.active += 1

    def relaying(self, up: Flow, down: Flow) -> None:
        """Count the bytes of this connection's two flows at every scrape until it closes."""
        self._relaying[up] = down

    def closed(self, failure: str | None, up: Flow | None = None, down: Flow | None = None) -> None:
        """Record the end of a connection; ``failure`` is None when it completed cleanly."""
        self.active -= 1
        if failure is None:
            self.completed += 1
        else:
            self.failures[failure] = self.failures.get(failure, 0) + 1
        if up is not None and down is not None:
            self._relaying.pop(up, None)
            self._closed_up += up.bytes
            self._closed_down += down.bytes
        if self.done and self._drop is not None:
            self._drop(self)

    def request(self, mode: str, outcome: str, allowed_by: str) -> None:
        key = (mode, outcome, allowed_by)
        self.requests[key] = self.requests.get(key, 0) + 1

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes written each way, enclave to target and back: closed connections' and open ones' so far."""
        up, down = self._closed_up, self._closed_down
        for flow_up, flow_down in self._relaying.items():
            up += flow_up.bytes
            down += flow_down.bytes
        return up, down

    def dns(self, ok: bool) -> None:
        self.dns_lookups += 1
        if not ok:
            self.dns_failures += 1

    def pool_paused(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.monotonic()
            self.pool_full += 1

    def pool_resumed(self) -> None:
        if self._paused_at is not None:
            self._paused_seconds += time.monotonic() - self._paused_at
            self._paused_at = None

    def pool_full_for(self) -> float:
        """How long the current pause has lasted, 0 when accepting."""
        return 0.0 if self._paused_at is None else time.monotonic() - self._paused_at

    def pool_full_seconds(self) -> float:
        return self._paused_seconds + self.pool_full_for()

    def state(self) -> dict[str, object]:
        """The figures as plain data, open connections' bytes and the current pause included."""
        state = {key: value for key, value in vars(self).items() if key not in self.NOT_FIGURES}
        state["_closed_up"], state["_closed_down"] = self.bytes_moved()
        state["_paused_seconds"] = self.pool_full_seconds()
        return state

    def add(self, state: dict[str, object], gauges: bool = True) -> None:
        """Sum another process's ``state()`` into these figures (its counters only, unless ``gauges``)."""
        for key, value in state.items():
            if key in self.GAUGES and not gauges:
                continue
            mine = getattr(self, key)
            if isinstance(mine, dict):
                for item, count in value.items():
                    mine[item] = mine.get(item, 0) + count
            else:
                setattr(self, key, mine + value)

    def snapshot(self) -> dict[str, int]:
        """This service's current figures, as the SIGUSR1 summary shows them."""
        up, down = self.bytes_moved()
        return {"active": self.active, "accepted": self.accepted, "completed": self.completed,
                "failed": sum(self.failures.values()), "up": up, "down": down}
