"""Destination safety in the matcher (issue 19): internal answers under wildcards, ``allow_internal``, ``deny:``.

No test here touches the network: every Resolver answers from a GlibcLikeDNS table, and
addresses are only compared, never connected to.  Start-up runs ``Supervisor.authorize()``
and ``cli.main()`` up to the listen step (test_bypass.py's ``start_up``).
"""

from __future__ import annotations

import io
import ipaddress
import socket

import pytest

import vsockproxy.check as check_module
import vsockproxy.supervisor as supervisor_module
from tests.helpers import REPO, GlibcLikeDNS, assert_one_line_error, cli_env, supervisor_for
from tests.test_bypass import assert_start_up_refused, start_up  # noqa: F401  (a fixture)
from vsockproxy.allowlist import DENIED, INTERNAL_ADDRESS, NOT_LISTED, NotAllowed
from vsockproxy.cli import options_from, parse_arguments
from vsockproxy.config import ConfigError, parse_document, parse_yaml
from vsockproxy.resolver import ResolveError, Resolver

pytestmark = pytest.mark.timeout(30)

SOURCE = "safety.yaml"
PORT = 443


def load(text: str):
    return parse_document(parse_yaml(text, SOURCE), SOURCE)


def allowlist_of(text: str):
    return load(text).allowlist


def resolver_over(records: dict[str, list[str]]) -> tuple[Resolver, GlibcLikeDNS]:
    dns = GlibcLikeDNS(records)
    return Resolver(socket.AF_UNSPEC, 30.0, getaddrinfo=dns), dns


def used(allowlist, host: str, records: dict[str, list[str]], by_address: bool = False) -> list[str]:
    """The addresses a connection to ``host`` would try (NotAllowed or ResolveError if none)."""
    resolver, _ = resolver_over(records)
    target = allowlist.authorize(host, PORT, resolver, by_address=by_address)
    return [str(endpoint.ip) for endpoint in target.endpoints(resolver)]


def refused(allowlist, host: str, records: dict[str, list[str]], by_address: bool = False) -> NotAllowed:
    with pytest.raises(NotAllowed) as info:
        addresses = used(allowlist, host, records, by_address)
        pytest.fail(f"{host} would connect to {addresses}")
    message = str(info.value)
    assert message and "\n" not in message, message
    return info.value


WILDCARD = "allowlist:\n- {address: '*.example.com', port: 443}\n"
WILDCARD_INTERNAL_OK = "allowlist:\n- {address: '*.example.com', port: 443, allow_internal: true}\n"


# --------------------------------------------------------------------------- rule 1: wildcards' answers

@pytest.mark.parametrize("answer, network", [
    ("169.254.169.254", "169.254.0.0/16"), ("127.0.0.1", "127.0.0.0/8"), ("::1", "::1/128"),
    ("fd00:ec2::254", "fd00:ec2::254/128"), ("::ffff:169.254.169.254", "169.254.0.0/16"),
    ("64:ff9b::a9fe:a9fe", "169.254.0.0/16"), ("2002:7f00:1::1", "127.0.0.0/8"), ("0.0.0.0", "0.0.0.0/8"),
    ("fe80::1", "fe80::/10"), ("224.0.0.251", "224.0.0.0/4"), ("255.255.255.255", "255.255.255.255/32"),
])
def test_a_wildcards_name_answering_an_internal_address_is_refused_naming_the_range(answer, network):
    exc = refused(allowlist_of(WILDCARD), "metadata.example.com", {"metadata.example.com": [answer]})
    assert exc.rule == INTERNAL_ADDRESS and exc.allowed_by == "*.example.com:443"
    message = str(exc)
    spelled = ipaddress.ip_address(answer)  # as Python prints it: ::ffff:a9fe:a9fe up to 3.12
    assert f"metadata.example.com:443 resolves only to refused addresses: {spelled} (internal address in " in message
    assert network in message and "*.example.com:443 does not say allow_internal" in message, message


def test_allow_internal_lets_a_wildcards_names_reach_internal_addresses():
    assert used(allowlist_of(WILDCARD_INTERNAL_OK), "local.example.com",
                {"local.example.com": ["127.0.0.1", "::1"]}) == ["127.0.0.1", "::1"]


@pytest.mark.parametrize("text, host", [
    ("allowlist:\n- {address: localhost, port: 443}\n", "localhost"),             # an exact name: as upstream
    ("allowlist:\n- {address: 127.0.0.0/8, port: 443}\n", "127.0.0.1"),          # an explicit range
    ("allowlist:\n- {address: 169.254.169.254, port: 443}\n", "169.254.169.254"),  # an address, written out
])
def test_exact_names_ip_and_cidr_entries_reach_internal_addresses_as_upstream(text, host):
    assert used(allowlist_of(text), host, {"localhost": ["127.0.0.1", "::1"]}) == (
        ["127.0.0.1", "::1"] if host == "localhost" else [host])


def test_a_name_pinned_through_a_cidr_entry_keeps_its_internal_addresses():
    """Admitted through its addresses by an explicit range: the operator wrote the range."""
    text = "allowlist:\n- {address: 127.0.0.0/8, port: 443}\n"
    assert used(allowlist_of(text), "alias.test", {"alias.test": ["127.0.0.5"]}, by_address=True) == ["127.0.0.5"]


@pytest.mark.parametrize("answer", ["10.1.2.3", "172.16.0.9", "192.168.0.1", "100.64.0.1", "fd12::1", "192.0.2.1"])
def test_private_ranges_are_not_internal(answer):
    """VPC interface endpoints resolve AWS names into private ranges: those answers stay usable."""
    assert used(allowlist_of(WILDCARD), "vpce.example.com", {"vpce.example.com": [answer]}) == [answer]


def test_rule_2_a_mixed_answer_is_trimmed_to_its_allowed_addresses():
    records = {"mixed.example.com": ["169.254.169.254", "192.0.2.1", "::ffff:127.0.0.1", "2001:db8::1"]}
    assert used(allowlist_of(WILDCARD), "mixed.example.com", records) == ["192.0.2.1", "2001:db8::1"]


# --------------------------------------------------------------------------- rule 3: deny

DENY_FILE = """\
allowlist:
- {address: '*.example.com', port: 443}
- {address: kms.example.net, port: 443}
- {address: 10.0.0.0/8, port: 443}
deny:
- 10.1.2.0/24
- 192.0.2.7
- '*.corp.example.com'
- Secret.Example.COM.
"""


@pytest.mark.parametrize("host, records", [
    ("10.1.2.3", {}),                                               # a literal in a denied range, under a CIDR entry
    ("a.corp.example.com", {"a.corp.example.com": ["192.0.2.1"]}),  # a denied *. name under a wildcard
    ("A.B.Corp.Example.Com.", {"a.b.corp.example.com": ["192.0.2.1"]}),
    ("secret.example.com", {"secret.example.com": ["192.0.2.1"]}),  # a denied exact name, spelled otherwise
])
def test_a_deny_entry_refuses_a_name_or_literal_before_any_look_up(host, records):
    resolver, dns = resolver_over(records)
    with pytest.raises(NotAllowed) as info:
        allowlist_of(DENY_FILE).authorize(host, PORT, resolver, by_address=False)
    assert info.value.rule == DENIED and info.value.allowed_by, info.value.allowed_by
    assert "is refused by the deny entry " in str(info.value) and SOURCE in str(info.value)
    assert dns.asked == []


def test_deny_of_a_wildcard_covers_strict_subdomains_only():
    assert used(allowlist_of(DENY_FILE), "corp.example.com", {"corp.example.com": ["192.0.2.1"]}) == ["192.0.2.1"]


@pytest.mark.parametrize("answers", [["10.1.2.3"], ["::ffff:10.1.2.3"], ["64:ff9b::a01:203"], ["2002:a01:203::1"],
                                     ["192.0.2.7", "10.1.2.200"]])
def test_addresses_of_a_deny_entry_are_refused_over_an_exact_entry_in_every_spelling(answers):
    exc = refused(allowlist_of(DENY_FILE), "kms.example.net", {"kms.example.net": answers})
    assert exc.rule == DENIED and exc.allowed_by == "kms.example.net:443"
    assert "(deny entry 10.1.2.0/24)" in str(exc) or "(deny entry 192.0.2.7)" in str(exc), str(exc)


def test_deny_trims_a_mixed_answer_and_applies_to_names_pinned_through_addresses():
    allowlist = allowlist_of(DENY_FILE)
    assert used(allowlist, "kms.example.net", {"kms.example.net": ["10.1.2.3", "10.9.9.9"]}) == ["10.9.9.9"]
    exc = refused(allowlist, "alias.test", {"alias.test": ["10.1.2.9"]}, by_address=True)
    assert exc.rule == DENIED


def test_deny_wins_over_allow_internal():
    allowlist = allowlist_of(WILDCARD_INTERNAL_OK + "deny: [127.0.0.0/8]\n")
    assert refused(allowlist, "a.example.com", {"a.example.com": ["127.0.0.1"]}).rule == DENIED


def test_not_listed_stays_its_own_rule():
    resolver, _ = resolver_over({})
    with pytest.raises(NotAllowed) as info:
        allowlist_of(DENY_FILE).authorize("other.test", PORT, resolver, by_address=False)
    assert info.value.rule == NOT_LISTED and info.value.allowed_by == ""


def test_a_name_that_does_not_resolve_is_still_a_resolve_error():
    with pytest.raises(ResolveError):
        used(allowlist_of(WILDCARD), "gone.example.com", {})


# --------------------------------------------------------------------------- the file

@pytest.mark.parametrize("text, message", [
    ("allowlist:\n- {address: localhost, port: 443, allow_internal: true}\n",
     "allowlist entry 1: allow_internal applies to wildcard (*.) entries only"),
    ("allowlist:\n- {address: 127.0.0.1, port: 443, allow_internal: true}\n",
     "allowlist entry 1: allow_internal applies to wildcard (*.) entries only"),
    ("allowlist:\n- {address: 10.0.0.0/8, port: 443, allow_internal: true}\n",
     "allowlist entry 1: allow_internal applies to wildcard (*.) entries only"),
    ("allowlist:\n- {address: '*.a.test', port: 443, allow_internal: 'yes'}\n",
     "allowlist entry 1: allow_internal must be true or false, found str 'yes'"),
    ("allowlist:\n- {address: '*.a.test', port: 443, allow_internal: 1}\n",
     "allowlist entry 1: allow_internal must be true or false, found int 1"),
    ("allowlist:\n- {address: '*.a.test', port: 443, allow: true}\n", "unknown key 'allow'"),
    ("allowlist: []\ndeny: 10.0.0.0/8\n", "'deny' must be a list of addresses, CIDRs and names, found str"),
    ("allowlist: []\ndeny:\n", "'deny' must be a list of addresses, CIDRs and names, found nothing"),
    ("allowlist: []\ndeny: [443]\n", "deny entry 1 must be a string (an address, a CIDR or a name), found int 443"),
    ("allowlist: []\ndeny: [{address: 10.0.0.1}]\n", "deny entry 1 must be a string"),
    ("allowlist: []\ndeny: [ok.test, '10.0.0.1/8']\n", "deny entry 2: bad address"),
    ("allowlist: []\ndeny: ['127.1']\n", "deny entry 1: bad address"),
    ("allowlist: []\ndeny: ['*.']\n", "deny entry 1: bad address"),
    ("allowlist: []\ndeny: ['bad name']\n", "deny entry 1: bad address"),
    ("allowlist: []\ndenylist: []\n", "unknown key 'denylist'; expected 'allowlist' and optionally 'deny' and 'services'"),
])
def test_mistakes_in_allow_internal_and_deny_are_one_clear_line(text, message):
    with pytest.raises(ConfigError) as info:
        load(text)
    assert str(info.value).startswith(f"{SOURCE}: ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


SERVICE = "allowlist: []\nservices:\n- {{listen_port: 8080, mode: http-connect, from_cids: {cids}}}\n"


@pytest.mark.parametrize("cids, message", [
    ("[]", "service 1: from_cids must be a non-empty list of enclave CIDs, found list []"),
    ("16", "service 1: from_cids must be a non-empty list of enclave CIDs, found int 16"),
    ("null", "service 1: from_cids must be a non-empty list of enclave CIDs, found nothing"),
    ("[16, '17']", "service 1: from_cids: CID must be an integer from 1 to 4294967294, found str '17'"),
    ("[true]", "service 1: from_cids: CID must be an integer from 1 to 4294967294, found bool True"),
    ("[16.0]", "service 1: from_cids: CID must be an integer from 1 to 4294967294, found float 16.0"),
    ("[0]", "service 1: from_cids: CID must be from 1 to 4294967294, got 0"),
    ("[4294967295]", "service 1: from_cids: CID must be from 1 to 4294967294, got 4294967295"),
    ("[16, 17, 16]", "service 1: from_cids lists CID 16 twice"),
])
def test_from_cids_mistakes_are_one_clear_line(cids, message):
    with pytest.raises(ConfigError) as info:
        load(SERVICE.format(cids=cids))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_from_cids_is_read_into_the_service():
    (entry,) = load(SERVICE.format(cids="[17, 16]")).services
    assert entry.from_cids == frozenset({16, 17})
    assert load("allowlist: []\nservices:\n- {listen_port: 8080, mode: socks5}\n").services[0].from_cids is None


# --------------------------------------------------------------------------- start-up of fixed routes

@pytest.fixture
def authorize(tmp_path, monkeypatch):
    """``authorize(yaml, records)``: Supervisor.authorize() of the file, its resolvers answering from ``records``."""
    def run(text: str, records: dict[str, list[str]]):
        dns = GlibcLikeDNS(records)
        real = Resolver
        monkeypatch.setattr(supervisor_module, "Resolver",
                            lambda family, ttl, **kwargs: real(family, ttl, getaddrinfo=dns, **kwargs))
        path = tmp_path / "safety.yaml"
        path.write_text(text)
        return supervisor_for(["--config", str(path)], lambda port: None).authorize(), dns
    return run


FIXED = "services:\n- {{listen_port: 8000, address: {address}, port: 443}}\n"


@pytest.mark.parametrize("text, address, records, rule, needle", [
    (WILDCARD, "metadata.example.com", {"metadata.example.com": ["169.254.169.254", "::ffff:127.0.0.1"]},
     INTERNAL_ADDRESS, "169.254.0.0/16"),
    (DENY_FILE, "kms.example.net", {"kms.example.net": ["10.1.2.3", "192.0.2.7"]}, DENIED, "deny entry 10.1.2.0/24"),
    (DENY_FILE, "10.1.2.5", {}, DENIED, "deny entry 10.1.2.0/24"),
    (DENY_FILE, "x.corp.example.com", {}, DENIED, "deny entry *.corp.example.com"),
])
def test_a_fixed_route_whose_every_address_is_refused_does_not_start(authorize, text, address, records, rule, needle):
    with pytest.raises(NotAllowed) as info:
        authorize(text + FIXED.format(address=address), records)
    assert str(info.value).startswith(f"vsock port 8000 -> {address}:443: "), str(info.value)
    assert info.value.rule == rule and needle in str(info.value), str(info.value)


@pytest.mark.parametrize("text, address, records", [
    (WILDCARD, "mixed.example.com", {"mixed.example.com": ["169.254.169.254", "192.0.2.1"]}),  # one is left
    (WILDCARD, "later.example.com", {}),             # does not resolve yet: each connection looks again
    (WILDCARD_INTERNAL_OK, "local.example.com", {"local.example.com": ["127.0.0.1"]}),
    (DENY_FILE, "kms.example.net", {"kms.example.net": ["10.1.2.3", "10.3.3.3"]}),
])
def test_a_fixed_route_with_an_address_left_starts(authorize, text, address, records):
    services, _ = authorize(text + FIXED.format(address=address), records)
    assert services[8000].target.host == address


def test_a_fixed_route_looks_its_name_up_at_start_only_when_an_address_could_be_refused(authorize):
    _, dns = authorize("allowlist:\n- {address: kms.example.net, port: 443}\n" + FIXED.format(address="kms.example.net"),
                       {"kms.example.net": ["10.1.2.3"]})
    assert dns.asked == []


def test_start_up_refuses_a_fixed_route_into_the_metadata_service_in_one_line(start_up):  # noqa: F811
    result = start_up(WILDCARD, "imds.example.com", dns=GlibcLikeDNS({"imds.example.com": ["169.254.169.254"]}))
    assert_start_up_refused(result, "vsock port 5000 -> imds.example.com:443", "169.254.169.254",
                            "internal address in 169.254.0.0/16")


# --------------------------------------------------------------------------- the README's example

def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("```yaml\n", readme.index("### Destination safety")) + len("```yaml\n")
    return readme[start:readme.index("```", start)]


def test_the_readmes_example_file_is_the_issues_and_loads():
    text = readme_example()
    file = load(text)
    assert [str(rule) for rule in file.allowlist.rules] == ["*.example.com:443", "*.internal.example.com:443",
                                                            "localhost:8080", "10.0.0.0/8:443"]
    assert [rule.allow_internal for rule in file.allowlist.rules] == [False, True, False, False]
    assert [rule.spelling for rule in file.allowlist.deny] == ["10.1.2.0/24", "*.corp.example.com"]
    assert file.services[0].from_cids == frozenset({16, 17})


def test_the_readmes_example_file_passes_check(run_cli, write_config):
    result = run_cli("--check", "--config", write_config(readme_example()), env=cli_env())
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.splitlines() == [
        "ok   vsock port 8080 (http-connect) (each request's target is checked against the allowlist when it comes)",
        "     only from CIDs 16, 17"]


def test_start_up_and_check_refuse_allow_internal_on_an_exact_name_alike(run_cli, write_config):
    path = write_config("allowlist:\n- {address: localhost, port: 443, allow_internal: true}\n")
    line = assert_one_line_error(run_cli("8000", "localhost", "443", "--config", path, env=cli_env()), 1,
                                 "allow_internal applies to wildcard (*.) entries only")
    result = run_cli("--check", "8000", "localhost", "443", "--config", path, env=cli_env())
    assert result.returncode == 1 and result.stdout == "FAIL " + line[len("vsock-proxy: error: "):] + "\n"


# --------------------------------------------------------------------------- --check

@pytest.fixture
def check(tmp_path, monkeypatch):
    """``check(yaml, records)``: run_check() of the file in this process: (status, output lines, addresses
    connected to).  Resolvers answer from ``records``; the connect step is a stand-in that records each
    address and succeeds without a socket, so nothing is sent anywhere."""
    connected = []
    monkeypatch.setattr(check_module, "_connect", lambda endpoint, timeout: connected.append(str(endpoint)))

    def run(text: str, records: dict[str, list[str]]):
        dns = GlibcLikeDNS(records)
        real = Resolver
        monkeypatch.setattr(supervisor_module, "Resolver",
                            lambda family, ttl, **kwargs: real(family, ttl, getaddrinfo=dns, **kwargs))
        path = tmp_path / "check.yaml"
        path.write_text(text)
        out = io.StringIO()
        status = check_module.run_check(options_from(parse_arguments(["--check", "--config", str(path)])), out)
        return status, out.getvalue().splitlines(), connected
    return run


def test_check_shows_each_address_of_a_wildcard_target_and_why_one_is_refused(check):
    status, lines, connected = check(
        DENY_FILE + FIXED.format(address="s3.example.com"),
        {"s3.example.com": ["169.254.169.254", "10.1.2.3", "192.0.2.10"]})
    assert status == 0, lines
    assert lines[0].startswith("ok   vsock port 8000 -> s3.example.com:443 (allowed by *.example.com:443, 1 address, "
                               "connected to 192.0.2.10:443 in "), lines
    assert lines[1:] == [
        "     address 169.254.169.254:443: refused: internal address in 169.254.0.0/16 (link-local: the metadata "
        "service, Amazon DNS and time service), and the wildcard entry *.example.com:443 does not say allow_internal",
        "     address 10.1.2.3:443: refused: deny entry 10.1.2.0/24",
        "     address 192.0.2.10:443: may be used"]
    assert connected == ["192.0.2.10:443"]  # never a refused address


def test_check_fails_a_target_whose_every_address_is_refused_as_start_up_does(check):
    status, lines, connected = check(WILDCARD + FIXED.format(address="imds.example.com"),
                                     {"imds.example.com": ["169.254.169.254"]})
    assert status == 1 and connected == []
    assert lines == ["FAIL vsock port 8000 -> imds.example.com:443: imds.example.com:443 resolves only to refused "
                     "addresses: 169.254.169.254 (internal address in 169.254.0.0/16 (link-local: the metadata "
                     "service, Amazon DNS and time service), and the wildcard entry *.example.com:443 does not say "
                     "allow_internal)"]


def test_check_lists_no_addresses_for_a_target_none_of_whose_addresses_could_be_refused(check):
    status, lines, _ = check("allowlist:\n- {address: kms.example.net, port: 443}\n" +
                             FIXED.format(address="kms.example.net"), {"kms.example.net": ["127.0.0.1", "::1"]})
    assert status == 0 and len(lines) == 1 and "2 addresses, connected to 127.0.0.1:443 in " in lines[0], lines
