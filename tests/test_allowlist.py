"""vsockproxy.allowlist: upstream's YAML file and its matching rules, with no real DNS."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from tests.helpers import REPO, FakeDNS, load_allowlist, no_dns, parse_allowlist
from vsockproxy.allowlist import NotAllowed
from vsockproxy.config import ConfigError
from vsockproxy.resolver import ResolveError, Resolver

UPSTREAM_FILE = """\
# An example of a vsock-proxy configuration file, as upstream ships it.
allowlist:
- {address: kms.us-east-1.amazonaws.com, port: 443}
- {address: kms-fips.us-east-1.amazonaws.com, port: 443}
- {address: kms.eu-west-1.amazonaws.com, port: 443}
- {address: 127.0.0.1, port: 9000}
- {address: "::1", port: 9001}
"""


def allow(*entries, dns: FakeDNS | None = None, family: int = socket.AF_UNSPEC, ttl: float = 30.0):
    """An Allowlist of (address, port) entries and a resolver over ``dns`` (or one that must not be used)."""
    allowlist = parse_allowlist({"allowlist": [{"address": a, "port": p} for a, p in entries]}, "t.yaml")
    return allowlist, Resolver(family, ttl, getaddrinfo=dns if dns is not None else no_dns)


# --------------------------------------------------------------------------- file format

def test_upstream_file_format_loads(write_config):
    path = write_config(UPSTREAM_FILE)
    allowlist = load_allowlist(path)
    assert len(allowlist.rules) == 5
    resolver = Resolver(getaddrinfo=no_dns)
    target = allowlist.authorize("kms.us-east-1.amazonaws.com", 443, resolver)
    assert target.host == "kms.us-east-1.amazonaws.com" and target.port == 443
    assert allowlist.authorize("127.0.0.1", 9000, resolver).port == 9000
    assert allowlist.authorize("::1", 9001, resolver).host == "::1"


def test_block_style_entries_load(write_config):
    path = write_config("allowlist:\n  - address: 127.0.0.1\n    port: 8443\n  - port: 443\n    address: example.com\n")
    allowlist = load_allowlist(path)
    resolver = Resolver(getaddrinfo=no_dns)
    assert allowlist.authorize("127.0.0.1", 8443, resolver).port == 8443
    assert allowlist.authorize("example.com", 443, resolver).host == "example.com"


def test_empty_allowlist_allows_nothing(write_config):
    allowlist = load_allowlist(write_config("allowlist: []\n"))
    with pytest.raises(NotAllowed):
        allowlist.authorize("127.0.0.1", 443, Resolver(getaddrinfo=no_dns))


def test_shipped_conf_file_loads():
    """conf/vsock-proxy.yaml (upstream's KMS list) is a valid allowlist and allows a KMS endpoint by name."""
    path = REPO / "conf" / "vsock-proxy.yaml"
    if not path.exists():
        pytest.skip("conf/vsock-proxy.yaml not written yet")
    allowlist = load_allowlist(str(path))
    assert len(allowlist.rules) > 10
    target = allowlist.authorize("kms.us-east-1.amazonaws.com", 443, Resolver(getaddrinfo=no_dns))
    assert target.port == 443


# --------------------------------------------------------------------------- matching by name / literal

@pytest.mark.parametrize("remote", [
    "kms.us-east-1.amazonaws.com",
    "KMS.US-EAST-1.AMAZONAWS.COM",
    "kms.us-east-1.amazonaws.com.",
    "Kms.Us-East-1.AmazonAws.Com.",
])
def test_name_match_ignores_case_and_one_trailing_dot(remote):
    allowlist, resolver = allow(("kms.us-east-1.amazonaws.com", 443))
    target = allowlist.authorize(remote, 443, resolver)
    assert target.host == "kms.us-east-1.amazonaws.com"
    assert target.pinned_to is None


def test_entry_spelling_is_canonicalised_too():
    allowlist, resolver = allow(("KMS.Example.COM.", 443))
    assert allowlist.authorize("kms.example.com", 443, resolver).host == "kms.example.com"


@pytest.mark.parametrize("remote", ["kms.example.com..", "kms.example.co", "xkms.example.com",
                                    "kms.example.com.evil.test", "evil.kms.example.com"])
def test_other_names_do_not_match(remote):
    dns = FakeDNS({})  # nothing resolves, so only a name match could allow it
    allowlist, resolver = allow(("kms.example.com", 443), dns=dns)
    with pytest.raises(NotAllowed):
        allowlist.authorize(remote, 443, resolver)


def test_port_must_match():
    allowlist, resolver = allow(("kms.example.com", 443))
    with pytest.raises(NotAllowed, match="t.yaml"):
        allowlist.authorize("kms.example.com", 444, resolver)


@pytest.mark.parametrize("entry, remote", [
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
    ("::1", "0:0::1"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("2001:DB8::1", "2001:db8::0001"),
])
def test_ip_literal_match_without_dns(entry, remote):
    allowlist, resolver = allow((entry, 9000))
    target = allowlist.authorize(remote, 9000, resolver)
    assert target.host == str(ipaddress.ip_address(remote))
    assert [e.ip for e in target.endpoints(resolver)] == [ipaddress.ip_address(remote)]


def test_other_ip_literal_does_not_match():
    allowlist, resolver = allow(("127.0.0.1", 9000))
    with pytest.raises(NotAllowed) as excinfo:
        allowlist.authorize("127.0.0.2", 9000, resolver)
    assert "127.0.0.2" in str(excinfo.value)


@pytest.mark.parametrize("remote", ["2130706433", "0177.0.0.1", "127.1", "0x7f.1", "ex ample.com", "é.com", ""])
def test_loose_spellings_of_remote_addr_are_refused(remote):
    allowlist, resolver = allow(("127.0.0.1", 9000), ("example.com", 9000))
    with pytest.raises(NotAllowed):
        allowlist.authorize(remote, 9000, resolver)


def test_several_ports_and_entries():
    allowlist, resolver = allow(("a.example", 443), ("b.example", 8443), ("a.example", 80), dns=FakeDNS({}))
    assert allowlist.authorize("a.example", 80, resolver).port == 80
    assert allowlist.authorize("b.example", 8443, resolver).port == 8443
    with pytest.raises(NotAllowed):
        allowlist.authorize("b.example", 443, resolver)


# --------------------------------------------------------------------------- matching through resolution

def test_ip_remote_matches_name_entry_through_resolution():
    dns = FakeDNS({"backend.example": ["10.0.0.5", "10.0.0.6"]})
    allowlist, resolver = allow(("backend.example", 443), dns=dns)
    target = allowlist.authorize("10.0.0.6", 443, resolver)
    assert target.host == "10.0.0.6"
    assert target.pinned_to is not None
    assert dns.count("backend.example") == 1
    assert dns.count("10.0.0.6") == 0  # literals never go to DNS


def test_name_remote_matches_ip_entry_through_resolution():
    dns = FakeDNS({"alias.example": ["192.0.2.7"]})
    allowlist, resolver = allow(("192.0.2.7", 443), dns=dns)
    target = allowlist.authorize("alias.example", 443, resolver)
    assert target.host == "alias.example"
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["192.0.2.7"]


def test_name_remote_matches_other_name_entry_with_a_shared_address():
    dns = FakeDNS({"alias.example": ["192.0.2.1", "192.0.2.9"], "real.example": ["192.0.2.9"]})
    allowlist, resolver = allow(("real.example", 443), dns=dns)
    target = allowlist.authorize("alias.example", 443, resolver)
    assert target.pinned_to is not None
    # Only the address the entry stands for is ever used.
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["192.0.2.9"]


def test_no_shared_address_is_not_allowed_and_says_so():
    dns = FakeDNS({"alias.example": ["192.0.2.1"], "real.example": ["192.0.2.9"]})
    allowlist, resolver = allow(("real.example", 443), dns=dns)
    with pytest.raises(NotAllowed) as excinfo:
        allowlist.authorize("alias.example", 443, resolver)
    assert "alias.example:443" in str(excinfo.value)
    assert "t.yaml" in str(excinfo.value)


def test_unresolvable_remote_is_not_allowed_with_a_clear_message():
    allowlist, resolver = allow(("real.example", 443), dns=FakeDNS({}))
    with pytest.raises(NotAllowed) as excinfo:
        allowlist.authorize("nowhere.example", 443, resolver)
    message = str(excinfo.value)
    assert "nowhere.example" in message and "\n" not in message


def test_unresolvable_entry_is_skipped_not_fatal():
    dns = FakeDNS({"alias.example": ["192.0.2.9"], "ok.example": ["192.0.2.9"]})
    allowlist, resolver = allow(("gone.example", 443), ("ok.example", 443), dns=dns)
    assert allowlist.authorize("alias.example", 443, resolver).port == 443


def test_resolution_respects_ipv4_only():
    dns = FakeDNS({"dual.example": ["192.0.2.1", "2001:db8::1"]})
    allowlist, resolver = allow(("dual.example", 443), dns=dns, family=socket.AF_INET)
    assert allowlist.authorize("192.0.2.1", 443, resolver).port == 443
    with pytest.raises(NotAllowed):
        allowlist.authorize("2001:db8::1", 443, resolver)
    assert all(call[2] == socket.AF_INET for call in dns.calls)


def test_resolution_respects_ipv6_only():
    dns = FakeDNS({"dual.example": ["192.0.2.1", "2001:db8::1"]})
    allowlist, resolver = allow(("dual.example", 443), dns=dns, family=socket.AF_INET6)
    assert allowlist.authorize("2001:db8::1", 443, resolver).port == 443
    with pytest.raises(NotAllowed):
        allowlist.authorize("192.0.2.1", 443, resolver)


@pytest.mark.parametrize("entry, family", [("::1", socket.AF_INET), ("127.0.0.1", socket.AF_INET6),
                                           ("::/0", socket.AF_INET), ("0.0.0.0/0", socket.AF_INET6)])
def test_literal_target_of_the_disabled_family_is_not_allowed(entry, family):
    """-4 with an IPv6 REMOTE_ADDR (or -6 with IPv4) can never connect, so start-up must refuse it
    rather than listen and then refuse every connection."""
    remote = "::1" if ":" in entry else "127.0.0.1"
    allowlist, resolver = allow((entry, 9000), family=family)
    with pytest.raises(NotAllowed) as excinfo:
        allowlist.authorize(remote, 9000, resolver)
    assert remote in str(excinfo.value)


def test_name_entry_still_allowed_by_name_under_family_restriction():
    """A name match needs no DNS at start-up, whatever the family."""
    allowlist, resolver = allow(("v6only.example", 443), family=socket.AF_INET)
    assert allowlist.authorize("v6only.example", 443, resolver).host == "v6only.example"


# --------------------------------------------------------------------------- pinned targets at connect time

def test_pinned_target_filters_addresses_at_connect_time():
    dns = FakeDNS({"api.example": ["10.0.0.1"], "backend.example": ["10.0.0.1"]})
    allowlist, resolver = allow(("backend.example", 443), dns=dns, ttl=0)
    target = allowlist.authorize("api.example", 443, resolver)

    dns.records["api.example"] = ["10.0.0.9", "10.0.0.1", "10.0.0.8"]
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.1"]

    dns.records["api.example"] = ["10.0.0.9"]
    with pytest.raises(ResolveError) as excinfo:
        target.endpoints(resolver)
    assert "10.0.0.9" in str(excinfo.value)

    # The entry moves along with the target: still allowed.
    dns.records["backend.example"] = ["10.0.0.9"]
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.9"]


def test_name_matched_target_is_not_filtered():
    dns = FakeDNS({"api.example": ["10.0.0.1", "10.0.0.2"]})
    allowlist, resolver = allow(("api.example", 443), dns=dns, ttl=0)
    target = allowlist.authorize("api.example", 443, resolver)
    assert dns.calls == []  # a name match does not resolve at start-up
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.1", "10.0.0.2"]


# --------------------------------------------------------------------------- extensions: wildcard, CIDR, port lists

def test_wildcard_entry_matches_subdomains_only():
    allowlist, resolver = allow(("*.example.com", 443), dns=FakeDNS({}))
    assert allowlist.authorize("a.example.com", 443, resolver).host == "a.example.com"
    assert allowlist.authorize("A.B.Example.COM.", 443, resolver).host == "a.b.example.com"
    for remote in ("example.com", "badexample.com", "example.com.evil.test"):
        with pytest.raises(NotAllowed):
            allowlist.authorize(remote, 443, resolver)


def test_cidr_entry_matches_literals_and_pins_names():
    dns = FakeDNS({"inside.example": ["10.1.2.3"], "outside.example": ["192.0.2.1"]})
    allowlist, resolver = allow(("10.0.0.0/8", 443), dns=dns)
    assert allowlist.authorize("10.255.0.1", 443, resolver).port == 443
    assert allowlist.authorize("inside.example", 443, resolver).pinned_to is not None
    for remote in ("11.0.0.1", "outside.example"):
        with pytest.raises(NotAllowed):
            allowlist.authorize(remote, 443, resolver)


def test_port_list_entry():
    allowlist = parse_allowlist({"allowlist": [{"address": "127.0.0.1", "port": [443, 8443]}]}, "t.yaml")
    resolver = Resolver(getaddrinfo=no_dns)
    assert allowlist.authorize("127.0.0.1", 8443, resolver).port == 8443
    with pytest.raises(NotAllowed):
        allowlist.authorize("127.0.0.1", 80, resolver)


# --------------------------------------------------------------------------- ConfigError paths

def assert_config_error(path: str, *needles: str) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_allowlist(path)
    message = str(excinfo.value)
    assert path in message, message
    assert "\n" not in message, message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    return message


def test_missing_file(tmp_path):
    assert_config_error(str(tmp_path / "nope.yaml"), "no such file")


def test_directory_instead_of_file(tmp_path):
    assert_config_error(str(tmp_path), "directory")


def test_path_through_a_file_cannot_be_read(write_config):
    path = write_config(UPSTREAM_FILE)
    assert_config_error(os.path.join(path, "child.yaml"), "cannot read")


def test_unreadable_file(write_config):
    if os.geteuid() == 0:
        pytest.skip("root reads mode-000 files anyway")
    path = write_config(UPSTREAM_FILE)
    os.chmod(path, 0)
    try:
        assert_config_error(path, "cannot read")
    finally:
        os.chmod(path, 0o600)


def test_oversized_file(write_config):
    path = write_config("allowlist:\n" + "# padding\n" * 120_000)
    assert_config_error(path, "larger than")


@pytest.mark.parametrize("text", [
    "allowlist: [\n",
    "allowlist:\n- {address: 127.0.0.1, port: 443\n",
    "\tallowlist: []\n",
    "allowlist: *undefined_alias\n",
    "key: 'unterminated\n",
])
def test_not_yaml(write_config, text):
    assert_config_error(write_config(text), "not valid YAML")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"allowlist:\n- {address: caf\xe9.example, port: 443}\n")
    assert_config_error(str(path))


def test_python_object_tag_is_refused_and_never_runs(write_config, tmp_path):
    marker = tmp_path / "pwned"
    path = write_config(f"allowlist: !!python/object/apply:os.system ['touch {marker}']\n")
    assert_config_error(path)
    path = write_config("allowlist:\n- !!python/object:collections.OrderedDict {address: 127.0.0.1, port: 1}\n")
    assert_config_error(path)
    assert not marker.exists()


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("- {address: 127.0.0.1, port: 443}\n", "allowlist"),
    ("just a string\n", "allowlist"),
    ("42\n", "allowlist"),
    ("{}\n", "allowlist"),
    ("allow_list: []\n", "allow_list"),
    ("allowlist: []\nextra: 1\n", "extra"),
    ("allowlist:\n", "allowlist"),
    ("allowlist: 127.0.0.1\n", "list"),
    ("allowlist: {address: 127.0.0.1, port: 443}\n", "list"),
])
def test_bad_document_shape(write_config, text, needle):
    assert_config_error(write_config(text), needle)


@pytest.mark.parametrize("entry, needle", [
    ("127.0.0.1", "mapping"),
    ("[127.0.0.1, 443]", "mapping"),
    ("null", "mapping"),
    ("{port: 443}", "address"),
    ("{address: 127.0.0.1}", "port"),
    ("{address: 127.0.0.1, port: '443'}", "port"),
    ("{address: 127.0.0.1, port: 443.0}", "port"),
    ("{address: 127.0.0.1, port: true}", "port"),
    ("{address: 127.0.0.1, port: null}", "port"),
    ("{address: 127.0.0.1, port: 0}", "port"),
    ("{address: 127.0.0.1, port: -1}", "port"),
    ("{address: 127.0.0.1, port: 65536}", "port"),
    ("{address: 127.0.0.1, port: []}", "port"),
    ("{address: 127.0.0.1, port: [443, '8443']}", "port"),
    ("{address: 127.0.0.1, port: 443, proto: tcp}", "proto"),
    ("{address: 127.0.0.1, port: 443, Port: 443}", "Port"),
    ("{address: 2130706433, port: 443}", "address"),
    ("{address: '2130706433', port: 443}", "address"),
    ("{address: 127.1, port: 443}", "address"),
    ("{address: '0177.0.0.1', port: 443}", "address"),
    ("{address: '', port: 443}", "address"),
    ("{address: null, port: 443}", "address"),
    ("{address: [a.example], port: 443}", "address"),
    ("{address: 'bad name.example', port: 443}", "address"),
    ("{address: 'bücher.example', port: 443}", "address"),
    ("{address: '10.0.0.1/8', port: 443}", "address"),
])
def test_bad_entry(write_config, entry, needle):
    path = write_config(f"allowlist:\n- {{address: 127.0.0.1, port: 1}}\n- {entry}\n")
    message = assert_config_error(path, needle)
    assert "entry 2" in message, message


def test_port_zero_message(write_config):
    assert_config_error(write_config([("127.0.0.1", 0)]), "port", "0")


def test_port_65536_message(write_config):
    assert_config_error(write_config([("127.0.0.1", 65536)]), "port", "65536")


def test_port_65535_and_1_are_fine(write_config):
    allowlist = load_allowlist(write_config([("127.0.0.1", 1), ("127.0.0.1", 65535)]))
    resolver = Resolver(getaddrinfo=no_dns)
    assert allowlist.authorize("127.0.0.1", 65535, resolver).port == 65535
    assert allowlist.authorize("127.0.0.1", 1, resolver).port == 1


def test_config_error_paths_never_leak_exceptions_other_than_config_error(write_config):
    """Deeply nested YAML must be a ConfigError too, not a RecursionError."""
    path = write_config("allowlist: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as excinfo:
        load_allowlist(path)
    assert path in str(excinfo.value)

