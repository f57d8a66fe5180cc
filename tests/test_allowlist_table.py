"""Every example in the README's allowlist table, checked against the code (and the README against these)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO, FakeDNS, parse_allowlist
from vsockproxy.allowlist import NotAllowed
from vsockproxy.resolver import Resolver

DNS = {
    "kms.us-east-1.amazonaws.com": ["198.51.100.7"],
    "kms-alias.example.net": ["198.51.100.7"],
    "inside.example.net": ["10.20.30.40"],
    "localhost": ["::1", "127.0.0.1"],
    "a.example.com": ["192.0.2.1"],
    "a.b.example.com": ["192.0.2.2"],
}

# (README entry cell, YAML entry, host, port, allowed)
ROWS = [
    ("address: kms.us-east-1.amazonaws.com", {"address": "kms.us-east-1.amazonaws.com", "port": 443},
     [("KMS.us-east-1.amazonaws.com.", 443, True), ("kms-alias.example.net", 443, True),
      ("kms.us-east-1.amazonaws.com.evil.com", 443, False)]),
    ('address: "*.example.com"', {"address": "*.example.com", "port": 443},
     [("a.example.com", 443, True), ("a.b.example.com", 443, True),
      ("example.com", 443, False), ("badexample.com", 443, False)]),
    ("address: 10.0.0.0/8", {"address": "10.0.0.0/8", "port": 443},
     [("10.1.2.3", 443, True), ("inside.example.net", 443, True), ("11.0.0.1", 443, False)]),
    ("address: fd00::/8", {"address": "fd00::/8", "port": 443},
     [("fd12::1", 443, True), ("::1", 443, False)]),
    ("address: 127.0.0.1", {"address": "127.0.0.1", "port": 443},
     [("127.0.0.1", 443, True), ("localhost", 443, True), ("::ffff:127.0.0.1", 443, False),
      ("2130706433", 443, False), ("127.1", 443, False)]),
    ("port: [443, 8443]", {"address": "127.0.0.1", "port": [443, 8443]},
     [("127.0.0.1", 443, True), ("127.0.0.1", 8443, True), ("127.0.0.1", 80, False)]),
]

CASES = [pytest.param(entry, host, port, allowed, id=f"{cell} | {host}:{port}")
         for cell, entry, examples in ROWS for host, port, allowed in examples]


@pytest.mark.parametrize("entry, host, port, allowed", CASES)
def test_readme_table_row(entry, host, port, allowed):
    allowlist = parse_allowlist({"allowlist": [entry]}, "readme.yaml")
    resolver = Resolver(getaddrinfo=FakeDNS(DNS))
    if allowed:
        target = allowlist.authorize(host, port, resolver)
        assert target.endpoints(resolver), target
    else:
        with pytest.raises(NotAllowed):
            allowlist.authorize(host, port, resolver)


def test_localhost_allowed_through_127_0_0_1_is_pinned_to_it():
    allowlist = parse_allowlist({"allowlist": [{"address": "127.0.0.1", "port": 443}]}, "readme.yaml")
    resolver = Resolver(getaddrinfo=FakeDNS(DNS))
    target = allowlist.authorize("localhost", 443, resolver)
    assert [str(endpoint.ip) for endpoint in target.endpoints(resolver)] == ["127.0.0.1"]


def test_the_readme_table_shows_exactly_these_examples():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| entry | matches | does not match |"):]
    table = table[:table.index("\n\n")]
    for cell, _entry, examples in ROWS:
        assert f"`{cell}`" in table, cell
        for host, port, _allowed in examples:
            if cell.startswith("port:"):
                assert f"port {port}" in table
            elif host not in ("kms-alias.example.net", "inside.example.net", "localhost"):
                assert f"`{host}`" in table, host
