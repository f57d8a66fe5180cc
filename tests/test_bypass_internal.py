"""Attempts to reach the parent's own addresses, or denied ones, past the allowlist (issue 19).

Each attempt is its own test, run as a connection runs it: the supervisor authorizes the
file (its resolvers answering from a GlibcLikeDNS table), the route admits the request
(or the fixed target), and the server's own ``_connect`` tries the addresses through a
stand-in connector that records each one and refuses it.  So nothing is ever sent
anywhere, and the assertion is on exactly the addresses a real connection would have
connected to: only the allowed ones, none at all when the attempt is refused.
"""

from __future__ import annotations

import errno
import ipaddress
import os

import pytest

import vsockproxy.server as server_module
import vsockproxy.supervisor as supervisor_module
from tests.helpers import GlibcLikeDNS, supervisor_for
from tests.test_bypass import FakeClock
from vsockproxy.allowlist import DENIED, INTERNAL_ADDRESS, NotAllowed
from vsockproxy.resolver import Resolver
from vsockproxy.server import ConnectError, NotAdmitted

pytestmark = pytest.mark.timeout(30)

PORT = 443
WILDCARD = "- {address: '*.example.com', port: 443}\n"
ROUTED = "services:\n- {listen_port: 8080, mode: http-connect}\n"


class StandInConnector:
    """Replaces the server's connect step: records every address tried and refuses it, connecting nothing."""

    def __init__(self) -> None:
        self.tried: list[str] = []

    def __call__(self, upstream, address, timeout) -> None:
        self.tried.append(str(ipaddress.ip_address(address[0])))
        raise OSError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))


@pytest.fixture
def attempt(tmp_path, monkeypatch):
    """``attempt(file, host, records)``: the addresses a connection for ``host`` tries, or the refusal it gets.

    A file with ``services:`` has a request-routed service on vsock port 8080; one without gets the
    fixed service ``8000 HOST 443``.  Returns (tried addresses, NotAdmitted or NotAllowed or None, the clock,
    the DNS table, a function that runs the next connection).
    """
    connector = StandInConnector()
    monkeypatch.setattr(server_module, "_connect_within", connector)

    def run(text: str, host: str, records: dict[str, list[str]]):
        dns, clock = GlibcLikeDNS(records), FakeClock()
        real = Resolver
        monkeypatch.setattr(supervisor_module, "Resolver",
                            lambda family, ttl, **kwargs: real(family, ttl, getaddrinfo=dns, clock=clock, **kwargs))
        path = tmp_path / "bypass.yaml"
        path.write_text("allowlist:\n" + text)
        arguments = ["--config", str(path)] + ([] if "services:" in text else ["8000", host, str(PORT)])

        routes = []

        def connection():
            """One connection's attempt: (addresses tried, the refusal or None); start-up is the first's."""
            connector.tried = []
            try:
                if not routes:
                    authorized = supervisor_for(arguments, lambda port: None).authorize()
                    routes.append(authorized[8080 if "services:" in text else 8000].route)
                route = routes[0]
                endpoints = route.endpoints if route.parser is None else route.admit(host, PORT).endpoints
                server_module._connect(endpoints, 1.0)
            except (NotAdmitted, NotAllowed) as refusal:
                assert "\n" not in str(refusal), str(refusal)
                return list(connector.tried), refusal
            except ConnectError:  # every address was tried, and the stand-in refused each
                return list(connector.tried), None
            raise AssertionError("the stand-in connector let a connection through")

        return connection, dns, clock

    return run


def rule_of(refusal) -> str:
    return refusal.outcome if isinstance(refusal, NotAdmitted) else refusal.rule


# (id, allowlist entries and anything after them, requested host, DNS table, addresses tried or the rule refusing)
ATTEMPTS = [
    ("ipv4-mapped-loopback", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["::ffff:127.0.0.1"]},
     INTERNAL_ADDRESS),
    ("ipv4-mapped-metadata", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["::ffff:169.254.169.254"]},
     INTERNAL_ADDRESS),
    ("ipv4-mapped-hex-metadata", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["::ffff:a9fe:a9fe"]},
     INTERNAL_ADDRESS),
    ("ipv4-compatible-loopback", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["::127.0.0.1"]},
     INTERNAL_ADDRESS),
    ("ipv4-compatible-metadata", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["::169.254.169.254"]},
     INTERNAL_ADDRESS),
    ("nat64-metadata", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["64:ff9b::169.254.169.254"]},
     INTERNAL_ADDRESS),
    ("nat64-loopback", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["64:ff9b::7f00:1"]}, INTERNAL_ADDRESS),
    ("6to4-metadata", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["2002:a9fe:a9fe::1"]}, INTERNAL_ADDRESS),
    ("6to4-loopback", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["2002:7f00:1:ffff::"]}, INTERNAL_ADDRESS),
    ("metadata-ipv6", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["fd00:ec2::254"]}, INTERNAL_ADDRESS),
    ("unspecified", WILDCARD + ROUTED, "a.example.com", {"a.example.com": ["0.0.0.0", "::"]}, INTERNAL_ADDRESS),
    ("trailing-dot-name", WILDCARD + ROUTED, "imds.example.com.", {"imds.example.com": ["169.254.169.254"]},
     INTERNAL_ADDRESS),
    ("mixed-case-name", WILDCARD + ROUTED, "IMDS.Example.COM", {"imds.example.com": ["169.254.169.254"]},
     INTERNAL_ADDRESS),
    ("internal-and-external-answers", WILDCARD + ROUTED, "mixed.example.com",
     {"mixed.example.com": ["169.254.169.254", "192.0.2.1", "::ffff:127.0.0.1", "fd00:ec2::254", "2001:db8::1"]},
     ["192.0.2.1", "2001:db8::1"]),
    ("fixed-internal-and-external-answers", WILDCARD, "mixed.example.com",
     {"mixed.example.com": ["127.0.0.1", "192.0.2.1"]}, ["192.0.2.1"]),
    ("fixed-only-internal", WILDCARD, "imds.example.com", {"imds.example.com": ["169.254.169.254"]}, INTERNAL_ADDRESS),
    ("allow-internal-opts-in", "- {address: '*.example.com', port: 443, allow_internal: true}\n" + ROUTED,
     "a.example.com", {"a.example.com": ["::ffff:127.0.0.1", "127.0.0.1"]}, ["::ffff:7f00:1", "127.0.0.1"]),
    ("deny-trailing-dot-and-case", "- {address: secret.example.net, port: 443}\ndeny: [Secret.Example.NET.]\n" + ROUTED,
     "SECRET.example.net.", {"secret.example.net": ["192.0.2.9"]}, DENIED),
    ("deny-wildcard-mixed-case", WILDCARD + "deny: ['*.Corp.Example.COM']\n" + ROUTED, "a.CORP.example.com.",
     {"a.corp.example.com": ["192.0.2.9"]}, DENIED),
    ("deny-mapped-answer", "- {address: kms.example.net, port: 443}\ndeny: [10.1.2.0/24]\n" + ROUTED,
     "kms.example.net", {"kms.example.net": ["::ffff:10.1.2.3"]}, DENIED),
    ("deny-nat64-answer", "- {address: kms.example.net, port: 443}\ndeny: [10.1.2.0/24]\n" + ROUTED,
     "kms.example.net", {"kms.example.net": ["64:ff9b::a01:203"]}, DENIED),
    ("deny-6to4-answer", "- {address: kms.example.net, port: 443}\ndeny: [10.1.2.0/24]\n" + ROUTED,
     "kms.example.net", {"kms.example.net": ["2002:a01:203::1"]}, DENIED),
    ("deny-mapped-literal", "- {address: '::/0', port: 443}\ndeny: [169.254.0.0/16]\n" + ROUTED,
     "0:0:0:0:0:FFFF:A9FE:A9FE", {}, DENIED),
    ("deny-ipv6-literal-spelling", "- {address: 'fd00::/8', port: 443}\ndeny: ['fd00:ec2::254']\n" + ROUTED,
     "FD00:0EC2:0:0::254", {}, DENIED),
    ("deny-trims-an-exact-entry", "- {address: kms.example.net, port: 443}\ndeny: [10.1.2.0/24]\n" + ROUTED,
     "kms.example.net", {"kms.example.net": ["10.1.2.3", "10.9.9.9"]}, ["10.9.9.9"]),
    ("deny-pinned-fixed-target", "- {address: kms.example.net, port: 443}\ndeny: [10.1.2.0/24]\n",
     "alias.example.org", {"alias.example.org": ["10.1.2.3"], "kms.example.net": ["10.1.2.3"]}, DENIED),
]


@pytest.mark.parametrize("text, host, records, expected", [row[1:] for row in ATTEMPTS],
                         ids=[row[0] for row in ATTEMPTS])
def test_attempt(attempt, text, host, records, expected):
    connection, _, _ = attempt(text, host, records)
    tried, refusal = connection()
    if isinstance(expected, str):
        assert refusal is not None, f"{host} was not refused; it tried {tried}"
        assert rule_of(refusal) == expected, (rule_of(refusal), str(refusal))
        assert tried == [], f"refused, yet it tried {tried}"
    else:
        assert refusal is None, str(refusal)
        # As addresses: Python 3.13 writes an IPv4-mapped address as ::ffff:127.0.0.1, older ones as ::ffff:7f00:1.
        assert [ipaddress.ip_address(address) for address in tried] == \
            [ipaddress.ip_address(address) for address in expected], tried


def test_an_answer_that_changes_between_two_connections_is_checked_each_time(attempt):
    """DNS rebinding: the first answer passes, the next one (once the cache expires) is refused."""
    connection, dns, clock = attempt(WILDCARD + ROUTED, "rebind.example.com", {"rebind.example.com": ["192.0.2.1"]})
    assert connection() == (["192.0.2.1"], None)
    dns.records["rebind.example.com"] = ["169.254.169.254"]
    clock.advance(31)
    tried, refusal = connection()
    assert tried == [] and rule_of(refusal) == INTERNAL_ADDRESS
    dns.records["rebind.example.com"] = ["169.254.169.254", "192.0.2.2"]
    clock.advance(31)
    assert connection() == (["192.0.2.2"], None)


def test_a_cached_internal_answer_is_refused_on_every_connection(attempt):
    """The second and third connections take the answer from the cache, and it is screened all the same."""
    connection, dns, _ = attempt(WILDCARD + ROUTED, "imds.example.com", {"imds.example.com": ["169.254.169.254"]})
    for _ in range(3):
        tried, refusal = connection()
        assert tried == [] and rule_of(refusal) == INTERNAL_ADDRESS
    assert dns.asked == ["imds.example.com"]


def test_a_fixed_routes_cached_answer_is_screened_again_once_it_changes(attempt):
    """A fixed route's start-up look-up is cached; a connection after a change is judged by what it tries."""
    connection, dns, clock = attempt(WILDCARD, "svc.example.com", {"svc.example.com": ["192.0.2.1"]})
    assert connection() == (["192.0.2.1"], None)
    dns.records["svc.example.com"] = ["::ffff:127.0.0.1"]
    clock.advance(5)
    assert connection() == (["192.0.2.1"], None), "within the TTL: the cached (allowed) answer"
    clock.advance(30)
    tried, refusal = connection()
    assert tried == [] and rule_of(refusal) == INTERNAL_ADDRESS
