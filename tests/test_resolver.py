"""vsockproxy.resolver: literals skip DNS, -4/-6, a cache for the record's TTL, no negative caching, coalesced look-ups."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import gevent
import pytest
from gevent.event import Event

from tests.helpers import FakeDNS, no_dns, tracked, wait_until
from vsockproxy.resolver import DnsRecordTtl, Endpoint, ResolveError, Resolver


class Clock:
    """A settable monotonic clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ips(endpoints):
    return [str(e.ip) for e in endpoints]


# --------------------------------------------------------------------------- literals

@pytest.mark.parametrize("family", [socket.AF_UNSPEC, socket.AF_INET])
def test_ipv4_literal_skips_dns(family):
    resolver = Resolver(family, getaddrinfo=no_dns)
    [endpoint] = resolver.resolve("127.0.0.1", 9000)
    assert endpoint == Endpoint(socket.AF_INET, ("127.0.0.1", 9000), ipaddress.ip_address("127.0.0.1"))
    assert str(endpoint) == "127.0.0.1:9000"


@pytest.mark.parametrize("family", [socket.AF_UNSPEC, socket.AF_INET6])
def test_ipv6_literal_skips_dns(family):
    resolver = Resolver(family, getaddrinfo=no_dns)
    [endpoint] = resolver.resolve("::1", 9000)
    assert endpoint.family == socket.AF_INET6
    assert endpoint.sockaddr[:2] == ("::1", 9000)
    assert endpoint.ip == ipaddress.ip_address("::1")
    assert str(endpoint) == "[::1]:9000"


def test_ipv6_literal_refused_under_ipv4_only():
    with pytest.raises(ResolveError, match="IPv6"):
        Resolver(socket.AF_INET, getaddrinfo=no_dns).resolve("::1", 443)


def test_ipv4_literal_refused_under_ipv6_only():
    with pytest.raises(ResolveError, match="IPv4"):
        Resolver(socket.AF_INET6, getaddrinfo=no_dns).resolve("127.0.0.1", 443)


def test_resolve_error_is_an_os_error():
    assert issubclass(ResolveError, OSError)


# --------------------------------------------------------------------------- names and families

def test_name_resolves_in_order_with_ports():
    dns = FakeDNS({"svc.example": ["192.0.2.2", "2001:db8::2", "192.0.2.1"]})
    endpoints = Resolver(getaddrinfo=dns).resolve("svc.example", 8443)
    assert ips(endpoints) == ["192.0.2.2", "2001:db8::2", "192.0.2.1"]
    assert endpoints[0].sockaddr == ("192.0.2.2", 8443)
    assert endpoints[1].sockaddr[:2] == ("2001:db8::2", 8443)
    assert dns.calls == [("svc.example", 8443, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)]


@pytest.mark.parametrize("family, expected", [
    (socket.AF_INET, ["192.0.2.1"]),
    (socket.AF_INET6, ["2001:db8::1"]),
    (socket.AF_UNSPEC, ["192.0.2.1", "2001:db8::1"]),
])
def test_family_is_passed_to_getaddrinfo(family, expected):
    dns = FakeDNS({"dual.example": ["192.0.2.1", "2001:db8::1"]})
    assert ips(Resolver(family, getaddrinfo=dns).resolve("dual.example", 443)) == expected
    assert dns.calls[0][2] == family


def test_no_address_of_the_family_is_an_error():
    dns = FakeDNS({"v6.example": ["2001:db8::1"]})
    with pytest.raises(ResolveError, match="v6.example"):
        Resolver(socket.AF_INET, getaddrinfo=dns).resolve("v6.example", 443)


def test_empty_answer_is_an_error():
    with pytest.raises(ResolveError, match="no IPv4 address"):
        Resolver(socket.AF_INET, getaddrinfo=lambda *a: []).resolve("empty.example", 443)


def test_unknown_name_is_a_resolve_error_naming_the_host():
    with pytest.raises(ResolveError, match="nowhere.example"):
        Resolver(getaddrinfo=FakeDNS({})).resolve("nowhere.example", 443)


def test_os_error_from_getaddrinfo_is_a_resolve_error():
    def broken(*args):
        raise OSError(23, "Too many open files in system")

    with pytest.raises(ResolveError, match="broken.example"):
        Resolver(getaddrinfo=broken).resolve("broken.example", 443)


def test_duplicate_sockaddrs_are_dropped_keeping_order():
    def duplicating(host, port, family, type_, proto):
        a = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))
        b = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.2", port))
        c = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0))
        return [a, b, a, c, b, c, a]

    endpoints = Resolver(getaddrinfo=duplicating).resolve("dup.example", 443)
    assert ips(endpoints) == ["192.0.2.1", "192.0.2.2", "2001:db8::1"]


def test_non_ip_families_are_ignored():
    def odd(host, port, family, type_, proto):
        return [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", "/tmp/x"),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]

    assert ips(Resolver(getaddrinfo=odd).resolve("odd.example", 443)) == ["192.0.2.1"]


def test_scoped_ipv6_answer_keeps_scope_in_sockaddr():
    def scoped(host, port, family, type_, proto):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1%lo", port, 0, 1))]

    [endpoint] = Resolver(getaddrinfo=scoped).resolve("link.example", 443)
    assert endpoint.ip == ipaddress.ip_address("fe80::1")
    assert endpoint.sockaddr == ("fe80::1%lo", 443, 0, 1)


# --------------------------------------------------------------------------- cache

def test_cache_hit_within_ttl_and_miss_after():
    clock = Clock()
    dns = FakeDNS({"svc.example": ["192.0.2.1"]})
    resolver = Resolver(ttl=30, getaddrinfo=dns, clock=clock)
    first = resolver.resolve("svc.example", 443)
    clock.now += 29.9
    dns.records["svc.example"] = ["192.0.2.99"]
    assert resolver.resolve("svc.example", 443) == first
    assert dns.count("svc.example") == 1

    clock.now += 0.1  # exactly ttl after the look-up: expired
    assert ips(resolver.resolve("svc.example", 443)) == ["192.0.2.99"]
    assert dns.count("svc.example") == 2
    assert ips(resolver.resolve("svc.example", 443)) == ["192.0.2.99"]
    assert dns.count("svc.example") == 2


def test_cache_is_per_name_and_port():
    dns = FakeDNS({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]})
    resolver = Resolver(ttl=30, getaddrinfo=dns, clock=Clock())
    resolver.resolve("a.example", 443)
    resolver.resolve("a.example", 8443)
    resolver.resolve("b.example", 443)
    resolver.resolve("a.example", 443)
    assert dns.count("a.example") == 2 and dns.count("b.example") == 1
    assert resolver.resolve("a.example", 8443)[0].sockaddr == ("192.0.2.1", 8443)


def test_ttl_zero_resolves_every_time():
    dns = FakeDNS({"svc.example": ["192.0.2.1"]})
    resolver = Resolver(ttl=0, getaddrinfo=dns, clock=Clock())
    for _ in range(3):
        resolver.resolve("svc.example", 443)
    assert dns.count("svc.example") == 3


def test_failures_are_not_cached():
    clock = Clock()
    dns = FakeDNS({"flaky.example": ["192.0.2.1"]})
    dns.fail_next["flaky.example"] = 2
    resolver = Resolver(ttl=30, getaddrinfo=dns, clock=clock)
    for _ in range(2):
        with pytest.raises(ResolveError, match="flaky.example"):
            resolver.resolve("flaky.example", 443)
    assert ips(resolver.resolve("flaky.example", 443)) == ["192.0.2.1"]  # no clock movement needed
    assert dns.count("flaky.example") == 3


def test_failure_after_expiry_is_not_served_stale_and_not_cached():
    clock = Clock()
    dns = FakeDNS({"svc.example": ["192.0.2.1"]})
    resolver = Resolver(ttl=5, getaddrinfo=dns, clock=clock)
    resolver.resolve("svc.example", 443)
    clock.now += 6
    dns.fail_next["svc.example"] = 1
    with pytest.raises(ResolveError):
        resolver.resolve("svc.example", 443)
    assert ips(resolver.resolve("svc.example", 443)) == ["192.0.2.1"]
    assert dns.count("svc.example") == 3


# --------------------------------------------------------------------------- coalescing

@pytest.mark.timeout(10)
def test_concurrent_lookups_of_one_name_share_one_call():
    dns = FakeDNS({"svc.example": ["192.0.2.1", "192.0.2.2"]}, delay=0.2)
    resolver = Resolver(ttl=0, getaddrinfo=dns)  # no cache: only coalescing can save calls
    started = time.monotonic()
    greenlets = [gevent.spawn(resolver.resolve, "svc.example", 443) for _ in range(20)]
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    assert all(g.successful() for g in greenlets)
    assert {tuple(ips(g.value)) for g in greenlets} == {("192.0.2.1", "192.0.2.2")}
    assert dns.count("svc.example") == 1
    assert time.monotonic() - started < 1.0
    # Once it is done, the next look-up asks again (ttl 0).
    resolver.resolve("svc.example", 443)
    assert dns.count("svc.example") == 2


@pytest.mark.timeout(10)
def test_concurrent_failure_is_shared_then_forgotten():
    dns = FakeDNS({"svc.example": ["192.0.2.1"]}, delay=0.1)
    dns.fail_next["svc.example"] = 1
    resolver = Resolver(ttl=30, getaddrinfo=dns)
    greenlets = [gevent.spawn(resolver.resolve, "svc.example", 443) for _ in range(5)]
    gevent.joinall(greenlets, timeout=5)
    assert all(g.ready() for g in greenlets)
    assert all(isinstance(g.exception, ResolveError) for g in greenlets)
    assert dns.count("svc.example") == 1
    assert ips(resolver.resolve("svc.example", 443)) == ["192.0.2.1"]
    assert dns.count("svc.example") == 2


@pytest.mark.timeout(10)
def test_different_names_resolve_in_parallel():
    dns = FakeDNS({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}, delay=0.5)
    resolver = Resolver(getaddrinfo=dns)
    started = time.monotonic()
    a = gevent.spawn(resolver.resolve, "a.example", 443)
    b = gevent.spawn(resolver.resolve, "b.example", 443)
    gevent.joinall([a, b], timeout=5, raise_error=True)
    assert ips(a.value) == ["192.0.2.1"] and ips(b.value) == ["192.0.2.2"]
    assert time.monotonic() - started < 0.9  # one after the other would take 1.0 s


@pytest.mark.timeout(10)
def test_waiters_are_released_when_the_look_up_dies_unexpectedly():
    """If the greenlet doing the shared look-up fails with something other than ResolveError,
    the greenlets waiting on it must not hang forever."""
    def exploding(*args):
        gevent.sleep(0.05)
        raise RuntimeError("resolver bug")

    def quietly(*args):
        try:
            return resolver.resolve(*args)
        except Exception as exc:  # returned, not raised, so gevent prints no traceback
            return exc

    resolver = Resolver(getaddrinfo=exploding)
    leader = gevent.spawn(quietly, "svc.example", 443)
    follower = gevent.spawn(quietly, "svc.example", 443)
    try:
        gevent.joinall([leader, follower], timeout=1)
        assert isinstance(leader.value, Exception)
        assert follower.ready(), "follower still waiting on a look-up that already died"
        assert isinstance(follower.value, Exception)
    finally:
        gevent.killall([leader, follower])


@pytest.mark.timeout(10)
def test_waiters_are_released_when_the_looking_up_greenlet_is_killed():
    """A connection greenlet killed mid look-up (e.g. by the drain deadline) must not strand the others."""
    dns = FakeDNS({"svc.example": ["192.0.2.1"]}, delay=0.3)
    resolver = Resolver(getaddrinfo=dns)
    leader = gevent.spawn(resolver.resolve, "svc.example", 443)
    follower = gevent.spawn(resolver.resolve, "svc.example", 443)
    try:
        gevent.sleep(0.05)
        leader.kill()
        follower.join(timeout=1)
        assert follower.ready(), "follower still waiting on a look-up whose greenlet was killed"
    finally:
        follower.kill()
    # And the name still resolves afterwards.
    assert ips(resolver.resolve("svc.example", 443)) == ["192.0.2.1"]


# --------------------------------------------------------------------------- the record's own TTL

class RecordTtl:
    """A ``record_ttl`` stand-in: a fixed answer (seconds or None), a call log, and an optional gate to hold it."""

    def __init__(self, seconds: float | None, gate: Event | None = None) -> None:
        self.seconds = seconds
        self.gate = gate
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, family: int) -> float | None:
        self.calls.append((host, family))
        if self.gate is not None:
            self.gate.wait()
        return self.seconds


def resolved_then_settled(resolver: Resolver, record_ttl: RecordTtl, host: str = "svc.example"):
    """Resolve ``host`` and let the TTL query that follows it finish (it runs in its own greenlet)."""
    endpoints = resolver.resolve(host, 443)
    wait_until(lambda: record_ttl.calls, timeout=5, what="the TTL query")
    gevent.sleep(0)
    return endpoints


@pytest.mark.parametrize("record, dns_ttl, reused", [
    (7, 30, 7),      # the record's own TTL, as upstream
    (300, 30, 30),   # --dns-ttl is the most
    (0, 30, 1),      # TTL 0: still at most one look-up a second per name
    (0.2, 30, 1),
    (None, 30, 30),  # DNS cannot say (/etc/hosts only, no server): --dns-ttl
    (60, 0.5, 0.5),  # an operator's --dns-ttl under a second stands
])
def test_answer_is_reused_for_its_record_ttl_within_dns_ttl(record, dns_ttl, reused):
    clock = Clock()
    dns = FakeDNS({"svc.example": ["192.0.2.1"]})
    record_ttl = RecordTtl(record)
    resolver = Resolver(socket.AF_INET, ttl=dns_ttl, getaddrinfo=dns, clock=clock, record_ttl=record_ttl)
    resolved_then_settled(resolver, record_ttl)
    assert record_ttl.calls == [("svc.example", socket.AF_INET)]
    clock.now += reused - 0.01
    resolver.resolve("svc.example", 443)
    assert dns.count("svc.example") == 1
    clock.now += 0.01
    resolver.resolve("svc.example", 443)
    assert dns.count("svc.example") == 2


def test_connections_do_not_wait_for_the_ttl_query():
    """Until DNS tells the TTL, the answer is used and kept for --dns-ttl; a slow TTL query delays nobody."""
    clock = Clock()
    gate = Event()
    dns = FakeDNS({"svc.example": ["192.0.2.1"]})
    record_ttl = RecordTtl(5, gate)
    resolver = Resolver(ttl=30, getaddrinfo=dns, clock=clock, record_ttl=record_ttl)
    with gevent.Timeout(2):
        assert ips(resolver.resolve("svc.example", 443)) == ["192.0.2.1"]
        wait_until(lambda: record_ttl.calls, timeout=1, what="the TTL query")
        clock.now += 10
        assert ips(resolver.resolve("svc.example", 443)) == ["192.0.2.1"]  # --dns-ttl meanwhile
    assert dns.count("svc.example") == 1
    gate.set()
    gevent.sleep(0)
    assert dns.count("svc.example") == 1
    resolver.resolve("svc.example", 443)  # answered 10 s ago, TTL 5: expired
    assert dns.count("svc.example") == 2


def test_one_ttl_query_per_name_at_a_time_and_an_old_one_never_shortens_a_newer_answer():
    clock = Clock()
    gate = Event()
    dns = FakeDNS({"svc.example": ["192.0.2.1"]})
    record_ttl = RecordTtl(1, gate)
    resolver = Resolver(ttl=2, getaddrinfo=dns, clock=clock, record_ttl=record_ttl)
    resolver.resolve("svc.example", 443)
    wait_until(lambda: record_ttl.calls, timeout=1, what="the TTL query")
    for _ in range(3):
        clock.now += 2
        resolver.resolve("svc.example", 443)  # expired each time: a new look-up, no new TTL query
    assert dns.count("svc.example") == 4 and len(record_ttl.calls) == 1
    gate.set()
    gevent.sleep(0)
    clock.now += 1.5  # the newest answer is 1.5 s old: TTL 1 would have expired it, --dns-ttl 2 keeps it
    resolver.resolve("svc.example", 443)
    assert dns.count("svc.example") == 4


def test_no_ttl_query_when_dns_ttl_is_zero_nor_for_literals_nor_after_a_failure():
    record_ttl = RecordTtl(60)
    dns = FakeDNS({"svc.example": ["192.0.2.1"]})
    dns.fail_next["svc.example"] = 1
    with pytest.raises(ResolveError):
        Resolver(ttl=30, getaddrinfo=dns, record_ttl=record_ttl).resolve("svc.example", 443)
    for _ in range(3):
        Resolver(ttl=0, getaddrinfo=dns, record_ttl=record_ttl).resolve("svc.example", 443)
    Resolver(ttl=30, getaddrinfo=no_dns, record_ttl=record_ttl).resolve("192.0.2.7", 443)
    gevent.sleep(0.05)
    assert record_ttl.calls == []


# --------------------------------------------------------------------------- DnsRecordTtl against a local DNS stand-in

class StubDNS:
    """A DNS server stand-in on 127.0.0.1 (UDP, in a thread): answers from ``zone`` with dnspython's messages.

    ``zone`` maps (name, type) to a list of (type, ttl, rdata) records, e.g.
    ``{("a.test.", "A"): [("CNAME", 300, "b.test."), ("A", 20, "192.0.2.1")]}``; a name
    absent from every key is NXDOMAIN, a present name without that type has no answer.
    ``silent`` drops every query.  Never sends anywhere but to the querier on loopback.
    """

    def __init__(self, zone: dict, silent: bool = False) -> None:
        self.zone = zone
        self.silent = silent
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            query = dns.message.from_wire(data)
            question = query.question[0]
            name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if self.silent:
                continue
            response = dns.message.make_response(query)
            if not any(key[0] == name for key in self.zone):
                response.set_rcode(dns.rcode.NXDOMAIN)
            owner = name
            for record_type, ttl, rdata in self.zone.get((name, rdtype), []):
                response.answer.append(dns.rrset.from_text(owner, ttl, "IN", record_type, rdata))
                if record_type == "CNAME":
                    owner = rdata
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def stub_dns():
    yield from tracked(StubDNS, StubDNS.close)


@pytest.fixture
def hosts_file(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n192.0.2.9 Pinned.Test other.test  # comment.test\n")
    return str(path)


ZONE = {
    ("dual.test.", "A"): [("A", 60, "192.0.2.1")],
    ("dual.test.", "AAAA"): [("AAAA", 40, "2001:db8::1")],
    ("v4.test.", "A"): [("A", 25, "192.0.2.2")],
    ("alias.test.", "A"): [("CNAME", 300, "target.test."), ("A", 20, "192.0.2.3")],
    ("zero.test.", "A"): [("A", 0, "192.0.2.4")],
    ("pinned.test.", "A"): [("A", 99, "192.0.2.5")],
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("host, family, expected", [
    ("dual.test", socket.AF_UNSPEC, 40),   # the least of A and AAAA
    ("dual.test", socket.AF_INET, 60),
    ("dual.test", socket.AF_INET6, 40),
    ("DUAL.test.", socket.AF_INET, 60),
    ("v4.test", socket.AF_UNSPEC, 25),     # no AAAA: the A record's
    ("alias.test", socket.AF_INET, 20),    # the least along the CNAME chain
    ("zero.test", socket.AF_INET, 0),
    ("nowhere.test", socket.AF_UNSPEC, None),
    ("v4.test", socket.AF_INET6, None),
])
def test_dns_record_ttl_asks_dns(stub_dns, hosts_file, host, family, expected):
    server = stub_dns(ZONE)
    record_ttl = DnsRecordTtl(["127.0.0.1"], server.port, hosts_file=hosts_file, lifetime=2)
    assert record_ttl(host, family) == expected
    assert server.queries


@pytest.mark.timeout(20)
@pytest.mark.parametrize("host", ["localhost", "pinned.test", "PINNED.test.", "other.test", "a.localhost"])
def test_dns_is_not_asked_about_names_it_does_not_answer_for(stub_dns, hosts_file, host):
    """/etc/hosts decides those names' addresses (files before dns), so no DNS TTL applies to them."""
    server = stub_dns(ZONE)
    assert DnsRecordTtl(["127.0.0.1"], server.port, hosts_file=hosts_file, lifetime=2)(host, socket.AF_INET) is None
    assert server.queries == []


@pytest.mark.timeout(20)
def test_dns_record_ttl_gives_up_within_its_lifetime_without_blocking_the_loop(stub_dns, hosts_file):
    server = stub_dns(ZONE, silent=True)
    record_ttl = DnsRecordTtl(["127.0.0.1"], server.port, hosts_file=hosts_file, lifetime=0.5)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(100)])
    try:
        started = time.monotonic()
        assert record_ttl("v4.test", socket.AF_INET) is None
        assert time.monotonic() - started < 3
        assert len(ticks) >= 5, "the event loop was blocked during the DNS query"
    finally:
        ticker.kill()
    assert server.queries


@pytest.mark.timeout(20)
@pytest.mark.parametrize("contents", [None, "", "nameserver not-an-address\n"])
def test_dns_record_ttl_without_a_usable_resolv_conf_is_none(tmp_path, hosts_file, contents):
    """No DNS configured (a VM, a container): the answer is kept for --dns-ttl, and nothing is sent anywhere."""
    resolv_conf = tmp_path / "resolv.conf"
    if contents is not None:
        resolv_conf.write_text(contents)
    record_ttl = DnsRecordTtl(hosts_file=hosts_file, resolv_conf=str(resolv_conf), lifetime=2)
    assert record_ttl("v4.test", socket.AF_INET) is None


@pytest.mark.timeout(20)
def test_resolver_keeps_an_answer_for_its_dns_ttl(stub_dns, hosts_file, caplog):
    """End to end: addresses from getaddrinfo (here FakeDNS), the TTL from the DNS stand-in."""
    caplog.set_level(logging.DEBUG, logger="vsockproxy")
    server = stub_dns(ZONE)
    clock = Clock()
    dns_names = FakeDNS({"v4.test": ["192.0.2.2"]})
    resolver = Resolver(ttl=30, getaddrinfo=dns_names, clock=clock,
                        record_ttl=DnsRecordTtl(["127.0.0.1"], server.port, hosts_file=hosts_file, lifetime=2))
    assert ips(resolver.resolve("v4.test", 443)) == ["192.0.2.2"]
    wait_until(lambda: "reused for 25s" in caplog.text, timeout=10, what="the TTL to be applied")
    clock.now += 24.9
    resolver.resolve("v4.test", 443)
    assert dns_names.count("v4.test") == 1
    clock.now += 0.1
    resolver.resolve("v4.test", 443)
    assert dns_names.count("v4.test") == 2


def test_the_cache_keeps_at_most_max_cached_answers_oldest_out_first(monkeypatch):
    """Request-routed services resolve what enclaves ask for: the cache must not grow with the asking."""
    import vsockproxy.resolver as resolver_module
    monkeypatch.setattr(resolver_module, "MAX_CACHED", 3)
    dns = FakeDNS({f"h{i}.example": ["192.0.2.1"] for i in range(5)})
    resolver = Resolver(socket.AF_UNSPEC, 30.0, getaddrinfo=dns)
    for i in range(5):
        resolver.resolve(f"h{i}.example", 443)
        resolver.resolve(f"192.0.2.{i}", 443)
    assert len(resolver._cache) == 3
    resolver.resolve("h4.example", 443)  # still cached
    resolver.resolve("h0.example", 443)  # forgotten: asked again
    assert dns.count("h4.example") == 1 and dns.count("h0.example") == 2
