"""vsockproxy.resolver: literals skip DNS, -4/-6, a TTL cache, no negative caching, coalesced look-ups."""

from __future__ import annotations

import ipaddress
import socket
import time

import gevent
import pytest

from tests.helpers import FakeDNS, no_dns
from vsockproxy.resolver import Endpoint, ResolveError, Resolver


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
