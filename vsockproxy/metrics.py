"""Per-service counters, exported in Prometheus' text format by ``prometheus_client``.

Counters are updated once per connection (bytes at close), never per chunk,
so the data path pays nothing for them.  vsockproxy.metrics_server serves
them.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("vsockproxy")


class Metrics:
    """The process's metric families; ``service()`` binds them to one listener."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["service"]
        options = {"registry": self.registry, "namespace": "vsockproxy"}
        self.active = Gauge("active_connections", "Connections being relayed now.", labels, **options)
        self.accepted = Counter("connections_accepted", "Enclave connections accepted.", labels, **options)
        self.completed = Counter("connections_completed", "Connections relayed until both sides ended cleanly.",
                                 labels, **options)
        self.failed = Counter("connections_failed", "Connections ended by a failure, by reason.",
                              labels + ["reason"], **options)
        self.bytes = Counter("bytes", "Bytes relayed, by direction.", labels + ["direction"], **options)
        self.dns_lookups = Counter("dns_lookups", "DNS look-ups made (cache misses).", labels, **options)
        self.dns_failures = Counter("dns_failures", "DNS look-ups that failed.", labels, **options)
        self.pool_full = Counter("pool_full", "Times every worker was busy and accepting paused.",
                                 labels, **options)
        self.pool_full_seconds = Counter("pool_full_seconds", "Time accepting was paused with every worker busy.",
                                         labels, **options)

    def service(self, name: str) -> "ServiceMetrics":
        return ServiceMetrics(self, name)


class ServiceMetrics:
    """The metric children of one service, plus the tallies behind the SIGUSR1 summary."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._registry = metrics.registry
        self.active = metrics.active.labels(name)
        self.accepted = metrics.accepted.labels(name)
        self.completed = metrics.completed.labels(name)
        self._failed = metrics.failed
        self.bytes_up = metrics.bytes.labels(name, "enclave_to_target")
        self.bytes_down = metrics.bytes.labels(name, "target_to_enclave")
        self._dns_lookups = metrics.dns_lookups.labels(name)
        self._dns_failures = metrics.dns_failures.labels(name)
        self._pool_full = metrics.pool_full.labels(name)
        self._pool_full_seconds = metrics.pool_full_seconds.labels(name)
        self._paused_at: float | None = None

    def opened(self) -> None:
        self.accepted.inc()
        self.active.inc()

    def closed(self, failure: str | None, up: int = 0, down: int = 0) -> None:
        """Record the end of a connection; ``failure`` is None when it completed cleanly."""
        self.active.dec()
        if failure is None:
            self.completed.inc()
        else:
            self._failed.labels(self.name, failure).inc()
        if up:
            self.bytes_up.inc(up)
        if down:
            self.bytes_down.inc(down)

    def dns(self, ok: bool) -> None:
        self._dns_lookups.inc()
        if not ok:
            self._dns_failures.inc()

    def pool_paused(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.monotonic()
            self._pool_full.inc()

    def pool_resumed(self) -> None:
        if self._paused_at is not None:
            self._pool_full_seconds.inc(time.monotonic() - self._paused_at)
            self._paused_at = None

    def snapshot(self) -> dict[str, int]:
        """This service's current figures, read back from the registry."""
        def value(name: str, **labels: str) -> int:
            return int(self._registry.get_sample_value(f"vsockproxy_{name}", {"service": self.name, **labels}) or 0)
        failed = sum(int(sample.value) for metric in self._failed.collect() for sample in metric.samples
                     if sample.name.endswith("_total") and sample.labels.get("service") == self.name)
        return {
            "active": value("active_connections"),
            "accepted": value("connections_accepted_total"),
            "completed": value("connections_completed_total"),
            "failed": failed,
            "up": value("bytes_total", direction="enclave_to_target"),
            "down": value("bytes_total", direction="target_to_enclave"),
        }
