"""Name resolution for proxied targets, cached for the record's TTL, one look-up per name at a time.

Addresses come from ``getaddrinfo``, so ``/etc/hosts`` and nsswitch decide
them as for any other program.  ``getaddrinfo`` does not report TTLs, so, as
upstream caches an answer for its record's TTL, a DNS query for the same name
(dnspython, in a thread: gevent is not monkey-patched here) tells how long to
keep it: at most ``ttl`` (``--dns-ttl``), at least ``MIN_REUSE`` seconds, so
that a TTL of 0 cannot become a look-up per connection.  That query runs beside
the connections, never before them: until it answers, or when it cannot (a
name only ``/etc/hosts`` knows, no DNS server), the answer is kept for ``ttl``.
Failures are never cached: the next connection asks again.  Concurrent
connections for the same name share one look-up, so a burst of connects costs
one query rather than one per connection.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Callable, NamedTuple, Sequence

import dns.resolver
import gevent
import gevent.socket
from gevent.event import AsyncResult
from gevent.threadpool import ThreadPool

from vsockproxy.hostnames import IPAddress, host_port, parse_ip

log = logging.getLogger("vsockproxy")

FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
#: An answer is reused for at least this long, whatever its TTL, so TTL 0 is one look-up a second at most.
MIN_REUSE = 1.0
#: Answers kept per resolver (per service); the oldest goes first.
MAX_CACHED = 4096
#: How long one TTL query (one record type) may take before the answer is just kept for --dns-ttl.
TTL_QUERY_LIFETIME = 5.0
HOSTS_FILE = "/etc/hosts"
RESOLV_CONF = "/etc/resolv.conf"


class ResolveError(OSError):
    """The name has no usable address right now."""


class Endpoint(NamedTuple):
    """One address to try for a target, ready for ``socket.connect``."""

    family: int
    sockaddr: tuple
    ip: IPAddress

    def __str__(self) -> str:
        return host_port(self.sockaddr[0], self.sockaddr[1])


class DnsRecordTtl:
    """The TTL that DNS gives a name's address records, asked with dnspython in a thread of its own.

    ``record_ttl(host, family)`` parks only the calling greenlet.  Its own small
    thread pool keeps slow queries from delaying the hub's pool, which serves
    ``getaddrinfo``.  Names that ``/etc/hosts`` answers for, and ``localhost``,
    are not asked about: their addresses do not come from DNS.
    """

    def __init__(self, nameservers: Sequence[str] | None = None, port: int = 53, threads: int = 2,
                 hosts_file: str = HOSTS_FILE, resolv_conf: str = RESOLV_CONF,
                 lifetime: float = TTL_QUERY_LIFETIME) -> None:
        self.nameservers = list(nameservers) if nameservers is not None else None  # None: resolv_conf's
        self.port = port
        self.hosts_file = hosts_file
        self.resolv_conf = resolv_conf
        self.lifetime = lifetime
        self._threads = threads
        self._pool: ThreadPool | None = None

    def __call__(self, host: str, family: int) -> float | None:
        """Seconds the name's records may be cached (the least of its A/AAAA chains), or None if DNS cannot say."""
        if self._pool is None:
            self._pool = ThreadPool(self._threads)
        return self._pool.apply(self._query, (host, family))

    def _query(self, host: str, family: int) -> float | None:
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost") or name in _hosts_file_names(self.hosts_file):
            return None
        rdtypes = {socket.AF_INET: ["A"], socket.AF_INET6: ["AAAA"]}.get(family, ["A", "AAAA"])
        ttls = []
        try:
            resolver = self._resolver()  # afresh: /etc/resolv.conf may have changed, as getaddrinfo sees it
            for rdtype in rdtypes:
                try:
                    answer = resolver.resolve(host, rdtype, search=True, lifetime=self.lifetime)
                except dns.resolver.NoAnswer:  # e.g. no AAAA: getaddrinfo's answer has none either
                    continue
                ttls.append(answer.chaining_result.minimum_ttl)
        except Exception as exc:  # the TTL only refines the cache: no failure here may hurt resolving
            log.debug("no DNS TTL for %s: %s", host, exc or type(exc).__name__)
            return None
        return float(min(ttls)) if ttls else None

    def _resolver(self) -> dns.resolver.Resolver:
        if self.nameservers is None:
            return dns.resolver.Resolver(filename=self.resolv_conf)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = self.nameservers
        resolver.port = self.port
        return resolver


def _hosts_file_names(path: str) -> set[str]:
    """Every name ``/etc/hosts`` gives an address, lower-cased; read afresh, as getaddrinfo does."""
    names: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as hosts:
            for line in hosts:
                names.update(name.rstrip(".").lower() for name in line.split("#", 1)[0].split()[1:])
    except OSError:
        pass
    return names


#: The one TTL source of the process: its threads serve every service's resolver.
dns_record_ttl = DnsRecordTtl()


class Resolver:
    """Resolves host names to endpoints of one address family (or both).

    ``record_ttl(host, family)`` gives the TTL of the name's records, or None;
    by default DNS itself, when addresses come from the system's getaddrinfo.
    An injected ``getaddrinfo`` (tests) comes with no TTLs unless given some.
    """

    def __init__(
        self,
        family: int = socket.AF_UNSPEC,
        ttl: float = 30.0,
        getaddrinfo: Callable | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_lookup: Callable[[bool], None] | None = None,
        record_ttl: Callable[[str, int], float | None] | None = None,
    ) -> None:
        self.family = family
        self._on_lookup = on_lookup
        self.ttl = ttl
        if getaddrinfo is None:
            getaddrinfo, record_ttl = gevent.socket.getaddrinfo, record_ttl or dns_record_ttl
        self._getaddrinfo = getaddrinfo
        self._record_ttl = record_ttl
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, list[Endpoint]]] = {}
        self._pending: dict[tuple[str, int], AsyncResult] = {}
        self._ttl_queries: set[tuple[str, int]] = set()

    def resolve(self, host: str, port: int) -> list[Endpoint]:
        """Endpoints for ``host``, in the order the system prefers; raises ResolveError."""
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        literal = parse_ip(host)
        if literal is not None:  # an address never expires; keeping it spares the parsing
            endpoints = [self._literal_endpoint(literal, port)]
            self._remember(key, (float("inf"), endpoints))
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
                answered = self._clock()
                entry = (answered + self.ttl, endpoints)
                self._remember(key, entry)
                if self._record_ttl is not None and key not in self._ttl_queries:
                    self._ttl_queries.add(key)
                    gevent.spawn(self._expire_with_record_ttl, key, entry, answered)
            return endpoints
        finally:
            del self._pending[key]

    def _remember(self, key: tuple[str, int], entry: tuple[float, list[Endpoint]]) -> None:
        """Cache an answer, forgetting the oldest one beyond MAX_CACHED: request-routed services
        resolve whatever names their enclaves ask for, so the cache must not grow with them."""
        cache = self._cache
        cache.pop(key, None)  # re-inserted last: the order is the order of answers
        if len(cache) >= MAX_CACHED:
            del cache[next(iter(cache))]
        cache[key] = entry

    def _expire_with_record_ttl(self, key: tuple[str, int], entry: tuple[float, list[Endpoint]],
                                answered: float) -> None:
        """Shorten a cached answer's life to its record's TTL (never under MIN_REUSE), once DNS tells it."""
        try:
            seconds = self._record_ttl(key[0], self.family)
        finally:
            self._ttl_queries.discard(key)
        if seconds is None or self._cache.get(key) is not entry:  # no TTL, or a newer answer is cached
            return
        reuse = min(self.ttl, max(seconds, MIN_REUSE))
        self._cache[key] = (answered + reuse, entry[1])
        log.debug("%s: %d address(es), reused for %gs (DNS TTL %gs, --dns-ttl %gs)",
                  key[0], len(entry[1]), reuse, seconds, self.ttl)

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
