"""Name resolution for proxied targets, with a short cache and one look-up per name at a time.

``getaddrinfo`` does not report DNS TTLs, so answers are kept for a fixed
``ttl`` (``--dns-ttl``).  Failures are never cached: the next connection asks
again.  Concurrent connections for the same name share one look-up, so a burst
of connects costs one query rather than one per connection.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Callable, NamedTuple

from gevent.event import AsyncResult
import gevent.socket

from vsockproxy.hostnames import IPAddress, host_port, parse_ip

FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


class ResolveError(OSError):
    """The name has no usable address right now."""


class Endpoint(NamedTuple):
    """One address to try for a target, ready for ``socket.connect``."""

    family: int
    sockaddr: tuple
    ip: IPAddress

    def __str__(self) -> str:
        return host_port(self.sockaddr[0], self.sockaddr[1])


class Resolver:
    """Resolves host names to endpoints of one address family (or both)."""

    def __init__(
        self,
        family: int = socket.AF_UNSPEC,
        ttl: float = 30.0,
        getaddrinfo: Callable = gevent.socket.getaddrinfo,
        clock: Callable[[], float] = time.monotonic,
        on_lookup: Callable[[bool], None] | None = None,
    ) -> None:
        self.family = family
        self._on_lookup = on_lookup
        self.ttl = ttl
        self._getaddrinfo = getaddrinfo
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, list[Endpoint]]] = {}
        self._pending: dict[tuple[str, int], AsyncResult] = {}

    def resolve(self, host: str, port: int) -> list[Endpoint]:
        """Endpoints for ``host``, in the order the system prefers; raises ResolveError."""
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        literal = parse_ip(host)
        if literal is not None:  # an address never expires; keeping it spares the parsing
            endpoints = [self._literal_endpoint(literal, port)]
            self._cache[key] = (float("inf"), endpoints)
            return endpoints
        pending = self._pending.get(key)
        if pending is not None:
            return pending.get()
        pending = self._pending[key] = AsyncResult()
        try:
            endpoints = self._lookup(host, port)
        except BaseException as exc:
            self._report(False)
            pending.set_exception(exc if isinstance(exc, ResolveError)
                                  else ResolveError(f"cannot resolve {host}: look-up interrupted"))
            raise
        else:
            self._report(True)
            pending.set(endpoints)
            if self.ttl > 0:
                self._cache[key] = (self._clock() + self.ttl, endpoints)
            return endpoints
        finally:
            del self._pending[key]

    def _report(self, ok: bool) -> None:
        if self._on_lookup is not None:
            self._on_lookup(ok)

    def _literal_endpoint(self, address: IPAddress, port: int) -> Endpoint:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        if self.family not in (socket.AF_UNSPEC, family):
            raise ResolveError(
                f"{address} is an {FAMILY_NAMES[family]} address, but only "
                f"{FAMILY_NAMES[self.family]} is enabled"
            )
        sockaddr = (str(address), port, 0, 0) if family == socket.AF_INET6 else (str(address), port)
        return Endpoint(family, sockaddr, address)

    def _lookup(self, host: str, port: int) -> list[Endpoint]:
        try:
            infos = self._getaddrinfo(host, port, self.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise ResolveError(f"cannot resolve {host}: {exc.strerror}") from None
        except OSError as exc:
            raise ResolveError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        endpoints: list[Endpoint] = []
        seen = set()
        for family, _type, _proto, _canonname, sockaddr in infos:
            if family not in FAMILY_NAMES or sockaddr in seen:
                continue
            seen.add(sockaddr)
            endpoints.append(Endpoint(family, sockaddr, ipaddress.ip_address(sockaddr[0].split("%")[0])))
        if not endpoints:
            wanted = FAMILY_NAMES.get(self.family, "IP")
            raise ResolveError(f"cannot resolve {host}: no {wanted} address")
        return endpoints
