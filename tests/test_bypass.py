"""Allowlist bypass attempts: the proxy never connects anywhere the allowlist does not allow.

Each attempt is its own test (one parametrized id per spelling).  Nothing here
touches the network: every Resolver gets a fake ``getaddrinfo`` that records
what it was asked, and answers IPv4 numbers the way glibc's getaddrinfo does
(``inet_aton``: ``0x7f000001`` is 127.0.0.1 without any DNS query), so a
spelling that slips past the spelling check is caught by the address check
exactly as it would be on a real host.

Rules under test (issue 6, section 2; README "The allowlist file"):

* spellings the core defines as equal match: case, and ONE trailing dot;
* everything ambiguous is refused, on REMOTE_ADDR (``NotAllowed``) and in the
  file (``ConfigError``), with a one-line message, and at start-up through
  ``Supervisor.authorize()`` and ``cli.main()``;
* a target allowed only through its addresses stays pinned to them.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import signal
import socket

import pytest

import vsockproxy.cli as cli
import vsockproxy.supervisor as supervisor_module
from tests.helpers import GlibcLikeDNS
from vsockproxy.allowlist import NotAllowed
from vsockproxy.config import ConfigError, parse_document, parse_yaml
from vsockproxy.listen import ListenError
from vsockproxy.resolver import ResolveError, Resolver

KMS = "kms.us-east-1.amazonaws.com"
KMS_IP = "10.1.2.3"
ATTACKER_IP = "203.0.113.66"
SOURCE = "bypass.yaml"


# --------------------------------------------------------------------------- helpers

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def allowlist_of(*entries):
    """An Allowlist from (address, port) pairs, through the real document checker."""
    return parse_document({"allowlist": [{"address": a, "port": p} for a, p in entries]}, SOURCE).allowlist


def resolver_over(dns: GlibcLikeDNS, family: int = socket.AF_UNSPEC, ttl: float = 30.0, clock=None) -> Resolver:
    kwargs = {"clock": clock} if clock is not None else {}
    return Resolver(family, ttl, getaddrinfo=dns, **kwargs)


def assert_one_line(message: str) -> None:
    assert message, "empty error message"
    assert "\n" not in message and "\r" not in message, f"error message spans lines: {message!r}"


def assert_refused(allowlist, host: str, port: int, dns: GlibcLikeDNS) -> NotAllowed:
    """authorize() raises NotAllowed (never anything else, never a Target) with a one-line message."""
    resolver = resolver_over(dns)
    try:
        target = allowlist.authorize(host, port, resolver)
    except NotAllowed as exc:
        assert_one_line(str(exc))
        return exc
    endpoints = []
    try:
        endpoints = [str(e.ip) for e in target.endpoints(resolver)]
    except ResolveError:
        pass
    pytest.fail(f"{host!r}:{port} was ALLOWED as {target} (allowed_by={target.allowed_by}, "
                f"pinned_to={target.pinned_to}); it would connect to {endpoints}")


def load_text(text: str):
    return parse_document(parse_yaml(text, SOURCE), SOURCE)


def assert_config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config = load_text(text)
        pytest.fail(f"accepted: {[str(r) for r in config.allowlist.rules]}")
    message = str(info.value)
    assert_one_line(message)
    assert message.startswith(f"{SOURCE}: "), message
    return info.value


def entry_yaml(address: str, port: str = "443") -> str:
    return f"allowlist:\n- {{address: {address}, port: {port}}}\n"


def quoted(text: str) -> str:
    """A YAML double-quoted scalar that round-trips any str (control characters escaped)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@pytest.fixture
def start_up(tmp_path, monkeypatch, request):
    """Run ``vsock-proxy LOCAL_PORT REMOTE_ADDR REMOTE_PORT --config FILE`` in-process up to the listen step.

    The supervisor's resolvers get the fake DNS; the listener factory is one that raises, so a
    target that (wrongly) passes the checks ends in a recognizable error instead of a server.  Returns
    (exit status, stderr text).
    """
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for name in list(os.environ):
        if name.startswith("VSOCK_PROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)

    def refuse_to_listen(port, *, cid, backlog):
        raise ListenError("TEST-REACHED-LISTEN: every check passed")

    # Supervisor.serve() installs gevent signal handlers; cancelling them leaves the OS-level handler at
    # SIG_DFL, so Ctrl-C would kill the test run: put the Python handlers back afterwards.
    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1]
    saved = {signum: signal.getsignal(signum) for signum in handled}
    request.addfinalizer(lambda: [signal.signal(signum, handler) for signum, handler in saved.items()
                                  if handler is not None])

    def run(config_text: str, remote: str, port: int = 443, dns: GlibcLikeDNS | None = None):
        dns = dns if dns is not None else GlibcLikeDNS({KMS: [KMS_IP]})
        real_resolver = Resolver

        def fake_resolver(family=socket.AF_UNSPEC, ttl=30.0, *args, **kwargs):
            kwargs["getaddrinfo"] = dns
            return real_resolver(family, ttl, *args, **kwargs)

        monkeypatch.setattr(supervisor_module, "Resolver", fake_resolver)
        path = tmp_path / "allowlist.yaml"
        path.write_text(config_text, encoding="utf-8")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = cli.main(["5000", remote, str(port), "--config", str(path)], refuse_to_listen)
        return status, err.getvalue()

    return run


def assert_start_up_refused(result, *needles: str) -> str:
    status, stderr = result
    lines = stderr.splitlines()
    assert "TEST-REACHED-LISTEN" not in stderr, f"start-up passed every check: {stderr!r}"
    assert status == 1, (status, stderr)
    assert len(lines) == 1 and lines[0].startswith("vsock-proxy: error: "), f"not one error line: {stderr!r}"
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- non-canonical IPv4

NON_CANONICAL_IPV4 = [
    "2130706433",           # the 32-bit number
    "0177.0.0.1",           # octal first octet
    "0x7f.1",               # hex, two parts
    "127.1",                # two parts
    "127.0.1",              # three parts
    "127.0.0.01",           # leading zero
    "0127.0.0.1",           # leading zero (octal 87 to inet_aton)
    "0x7f000001",           # hex 32-bit number: the last label is not all digits
    "0X7F000001",
    "0x7f.0x0.0x0.0x1",     # hex per octet
    "127.0.0.0x1",          # hex last octet
    "0x7f.0.0.1",
    "017700000001",         # octal 32-bit number
    "127.000.000.001",
    "127.0.0.1.",           # trailing dot on a literal
]


@pytest.mark.parametrize("remote", NON_CANONICAL_IPV4)
def test_non_canonical_ipv4_remote_addr_is_refused(remote):
    """The allowlist has 127.0.0.1; another spelling of that address is refused, not resolved or guessed."""
    dns = GlibcLikeDNS()
    exc = assert_refused(allowlist_of(("127.0.0.1", 443)), remote, 443, dns)
    assert repr(remote) in str(exc) or remote in str(exc), f"message does not name the spelling: {exc}"
    assert dns.asked == [], f"{remote!r} was handed to getaddrinfo (which reads it as an IPv4 number)"


@pytest.mark.parametrize("entry", NON_CANONICAL_IPV4)
def test_non_canonical_ipv4_allowlist_entry_is_a_config_error(entry):
    message = str(assert_config_error(entry_yaml(quoted(entry))))
    assert "allowlist entry 1" in message, message


@pytest.mark.parametrize("remote", ["0x7f000001", "127.1", "2130706433", "127.0.0.0x1"])
def test_non_canonical_ipv4_is_refused_at_start_up(start_up, remote):
    result = start_up("allowlist:\n- {address: 127.0.0.1, port: 443}\n", remote)
    assert_start_up_refused(result)


@pytest.mark.parametrize("remote", ["0.0.0.0", "::", "0:0:0:0:0:0:0:0"])
def test_unspecified_address_does_not_match_loopback(remote):
    """Connecting to 0.0.0.0 or :: reaches this host on Linux; an allowlisted loopback does not admit it."""
    assert_refused(allowlist_of(("127.0.0.1", 443), ("::1", 443)), remote, 443, GlibcLikeDNS())


# --------------------------------------------------------------------------- IPv4-mapped IPv6

@pytest.mark.parametrize("remote", ["::ffff:127.0.0.1", "::FFFF:7F00:1", "0:0:0:0:0:ffff:7f00:1",
                                    "::127.0.0.1", "64:ff9b::127.0.0.1"])
def test_ipv4_mapped_ipv6_is_refused_when_only_ipv4_is_allowlisted(remote):
    assert_refused(allowlist_of(("127.0.0.1", 443)), remote, 443, GlibcLikeDNS())


@pytest.mark.parametrize("remote", ["::ffff:127.0.0.1", "::ffff:7f00:1", "0:0:0:0:0:FFFF:127.0.0.1"])
def test_ipv4_mapped_ipv6_is_allowed_when_that_literal_is_allowlisted(remote):
    dns = GlibcLikeDNS()
    resolver = resolver_over(dns)
    target = allowlist_of(("::ffff:127.0.0.1", 443)).authorize(remote, 443, resolver)
    # The canonical spelling is Python's: ::ffff:7f00:1 up to 3.12, ::ffff:127.0.0.1 (RFC 5952) from 3.13.
    assert target.host == str(ipaddress.ip_address("::ffff:7f00:1")) and target.pinned_to is None
    assert [e.ip for e in target.endpoints(resolver)] == [ipaddress.ip_address("::ffff:127.0.0.1")]
    assert dns.asked == []


def test_ipv4_is_refused_when_only_its_mapped_ipv6_form_is_allowlisted():
    assert_refused(allowlist_of(("::ffff:127.0.0.1", 443)), "127.0.0.1", 443, GlibcLikeDNS())


def test_name_answering_with_mapped_ipv6_of_an_allowlisted_ipv4_is_refused():
    """A name whose AAAA is ::ffff:127.0.0.1 is not admitted by the entry 127.0.0.1."""
    dns = GlibcLikeDNS({"sneaky.example": ["::ffff:127.0.0.1"]})
    assert_refused(allowlist_of(("127.0.0.1", 443)), "sneaky.example", 443, dns)


# --------------------------------------------------------------------------- bare numbers (upstream #716)

BARE_NUMBERS = ["1234", "0", "443", "00", "4294967295", "4294967296", "99999999999999999999", "1234."]


@pytest.mark.parametrize("remote", BARE_NUMBERS)
def test_bare_number_remote_addr_is_refused_without_a_lookup(remote):
    """glibc may expand a bare number through the search domains (upstream #716): never look it up.

    The fake DNS answers "1234" with the address of the allowlisted 1234.corp.example, as a
    search domain would; the proxy must not even ask.
    """
    dns = GlibcLikeDNS({"1234.corp.example": ["10.9.9.9"], remote: ["10.9.9.9"]})
    exc = assert_refused(allowlist_of(("1234.corp.example", 443), ("10.9.9.9", 443)), remote, 443, dns)
    assert remote in str(exc), str(exc)
    assert dns.asked == []


@pytest.mark.parametrize("entry", ["1234", "0", "'1234'", "'0'", "'443'", "'1234.'", "'00'"])
def test_bare_number_allowlist_entry_is_a_config_error(entry):
    """``address: 1234`` is an int in YAML (a type error); ``address: '1234'`` is a bare number (refused)."""
    assert_config_error(entry_yaml(entry))


def test_bare_number_is_refused_at_start_up(start_up):
    assert_start_up_refused(start_up("allowlist:\n- {address: 10.9.9.9, port: 443}\n", "1234"), "1234")


# --------------------------------------------------------------------------- IDNA / punycode look-alikes

_OMICRON = "kms.us-east-1.amazonaws.c\u03bfm"     # Greek small omicron for the 'o' of com
_PUNYCODE_OMICRON = "kms.us-east-1.amazonaws." + "c\u03bfm".encode("idna").decode("ascii")

# Spellings that are not valid ASCII host names: refused before any DNS question.
INVALID_LOOKALIKES = {
    "greek-omicron": _OMICRON,
    "cyrillic-a": "kms.us-e\u0430st-1.amazonaws.com",
    "fullwidth-dots": KMS.replace(".", "\uff0e"),
    "ideographic-dots": KMS.replace(".", "\u3002"),
    "fullwidth-letters": "\uff4b\uff4d\uff53.us-east-1.amazonaws.com",  # NFKC/IDNA maps these to 'kms'
    "kelvin-sign": "\u212aMS.us-east-1.amazonaws.com",                   # lower() gives 'k'
    "dotless-i": "kms-f\u0131ps.us-east-1.amazonaws.com",
    "zero-width-joiner": "kms\u200d.us-east-1.amazonaws.com",
    "soft-hyphen": "kms.us-east\u00ad-1.amazonaws.com",
    "trailing-double-dot": KMS + "..",
    "leading-dot": "." + KMS,
    "empty-label": "kms..us-east-1.amazonaws.com",
    "embedded-nul": KMS + "\x00.evil.com",
    "nul-terminated": KMS + "\x00",
    "percent-encoded-dot": "kms%2eus-east-1.amazonaws.com",
    "percent-encoded-letter": "%6bms.us-east-1.amazonaws.com",
    "trailing-space": KMS + " ",
    "leading-space": " " + KMS,
    "trailing-newline": KMS + "\n",
    "tab-inside": "kms\t.us-east-1.amazonaws.com",
    "at-sign-userinfo": "evil.com@" + KMS,
    "port-suffix": KMS + ":443",
    "slash-suffix": KMS + "/",
    "backslash": "kms.us-east-1.amazonaws.com\\.evil.com",
    "wildcard-as-host": "*.us-east-1.amazonaws.com",
    "label-too-long": "k" * 64 + ".us-east-1.amazonaws.com",
    "name-too-long": ("a" * 63 + ".") * 4 + "com",
    "hyphen-edge": "-kms.us-east-1.amazonaws.com",
    "empty": "",
}

# Valid ASCII names that are simply different names: refused because they neither equal the entry nor
# resolve into its addresses; the only question asked is about the name itself (and the entry's name).
DIFFERENT_NAMES = {
    "punycode-of-omicron": _PUNYCODE_OMICRON,
    "xn-label-lookalike": "xn--kms-xxa.us-east-1.amazonaws.com",
    "entry-as-prefix": KMS + ".evil.com",
    "entry-as-suffix": "evil" + KMS,
    "subdomain-of-entry": "a." + KMS,
    "parent-of-entry": "us-east-1.amazonaws.com",
    "digit-for-letter": "kms.us-east-l.amazonaws.com",
    "underscore-for-hyphen": "kms.us_east-1.amazonaws.com",
}


@pytest.mark.parametrize("remote", INVALID_LOOKALIKES.values(), ids=INVALID_LOOKALIKES.keys())
def test_lookalike_spelling_of_an_allowed_name_is_refused_without_a_lookup(remote):
    dns = GlibcLikeDNS({KMS: [KMS_IP], remote: [KMS_IP]} if remote else {KMS: [KMS_IP]})
    assert_refused(allowlist_of((KMS, 443)), remote, 443, dns)
    assert dns.asked == [], f"{remote!r} was handed to getaddrinfo"


@pytest.mark.parametrize("remote", DIFFERENT_NAMES.values(), ids=DIFFERENT_NAMES.keys())
def test_different_name_resembling_an_allowed_name_is_refused(remote):
    dns = GlibcLikeDNS({KMS: [KMS_IP], remote.lower(): [ATTACKER_IP]})
    assert_refused(allowlist_of((KMS, 443)), remote, 443, dns)
    assert set(dns.asked) <= {remote.lower(), KMS}, dns.asked


@pytest.mark.parametrize("entry", [_OMICRON, KMS + "..", "." + KMS, KMS + "\x00", "kms%2eus-east-1.amazonaws.com",
                                   "\uff4b\uff4d\uff53.us-east-1.amazonaws.com", KMS + " ", "*." + _OMICRON],
                         ids=["greek-omicron", "double-dot", "leading-dot", "nul", "percent", "fullwidth",
                              "trailing-space", "wildcard-omicron"])
def test_lookalike_allowlist_entry_is_a_config_error(entry):
    assert_config_error(entry_yaml(quoted(entry)))


def test_punycode_entry_matches_only_its_own_ascii_spelling():
    """Write an IDN in its xn-- form; the Unicode spelling of the same name is not accepted as equal."""
    allowlist = allowlist_of((_PUNYCODE_OMICRON, 443))
    resolver = resolver_over(GlibcLikeDNS())
    assert allowlist.authorize(_PUNYCODE_OMICRON.upper() + ".", 443, resolver).host == _PUNYCODE_OMICRON
    assert_refused(allowlist, _OMICRON, 443, GlibcLikeDNS())


@pytest.mark.parametrize("remote", [_OMICRON, KMS + "..", KMS + ".evil.com"], ids=["omicron", "double-dot", "suffix"])
def test_lookalike_is_refused_at_start_up(start_up, remote):
    dns = GlibcLikeDNS({KMS: [KMS_IP], KMS + ".evil.com": [ATTACKER_IP]})
    assert_start_up_refused(start_up(f"allowlist:\n- {{address: {KMS}, port: 443}}\n", remote, dns=dns))


def test_other_name_resolving_to_the_allowed_address_is_pinned_to_it():
    """Documented policy ("admits its addresses"): a different name is allowed only to the entry's addresses.

    evil.com answers with the KMS address plus an attacker address: the target is pinned, and only
    the KMS address is ever handed out for a connection.
    """
    dns = GlibcLikeDNS({KMS: [KMS_IP], "evil.com": [ATTACKER_IP, KMS_IP]})
    resolver = resolver_over(dns)
    target = allowlist_of((KMS, 443)).authorize("evil.com", 443, resolver)
    assert target.pinned_to is not None
    assert [str(e.ip) for e in target.endpoints(resolver)] == [KMS_IP]


# --------------------------------------------------------------------------- case and one trailing dot

@pytest.mark.parametrize("remote", [KMS, KMS.upper(), KMS.upper() + ".", KMS + ".", "Kms.Us-East-1.AmazonAws.Com."])
def test_case_and_one_trailing_dot_match_by_name(remote):
    dns = GlibcLikeDNS({KMS: [KMS_IP]})
    target = allowlist_of((KMS, 443)).authorize(remote, 443, resolver_over(dns))
    assert target.host == KMS and target.pinned_to is None
    assert dns.asked == [], "a name match needs no look-up"


@pytest.mark.parametrize("entry", [KMS.upper() + ".", KMS + ".", "Kms.Us-East-1.AmazonAws.Com"])
def test_entry_spelled_with_case_or_one_trailing_dot_matches_the_plain_name(entry):
    target = allowlist_of((entry, 443)).authorize(KMS, 443, resolver_over(GlibcLikeDNS()))
    assert target.host == KMS


@pytest.mark.parametrize("remote", [KMS + "..", KMS.upper() + "..", KMS + "..."])
def test_two_trailing_dots_are_refused(remote):
    dns = GlibcLikeDNS()
    assert_refused(allowlist_of((KMS, 443)), remote, 443, dns)
    assert dns.asked == []


def test_entry_with_two_trailing_dots_is_a_config_error():
    assert_config_error(entry_yaml(KMS + ".."))


# --------------------------------------------------------------------------- ports in the YAML

BAD_PORT_SPELLINGS = {
    "double-quoted": '"443"',
    "single-quoted": "'443'",
    "float": "443.0",
    "float-exponent": "4.43e+2",
    "exponent-without-sign": "4.43e2",     # YAML 1.1 float needs a signed exponent: this one is a str
    "float-tag": "!!float 443",
    "str-tag": "!!str 443",
    "quoted-hex": "'0x1bb'",
    "fraction": "443.5",
    "infinity": ".inf",
    "nan": ".nan",
    "bool-true": "true",
    "bool-yes": "yes",
    "null": "~",
    "empty-list": "[]",
    "list-with-string": '[443, "8443"]',
    "list-with-float": "[443, 8443.0]",
    "nested-list": "[[443]]",
    "mapping": "{443: 443}",
    "zero": "0",
    "negative": "-443",
    "too-big": "65536",
    "huge": "99999999999999999999999",
    "range-text": "443-444",
    "colon-pair": "80:443",                # not a sexagesimal int (minutes > 59): a str
    "binary-tag": "!!binary MTIz",
    "timestamp": "2001-12-14",
}


@pytest.mark.parametrize("spelling", BAD_PORT_SPELLINGS.values(), ids=BAD_PORT_SPELLINGS.keys())
def test_port_that_is_not_a_yaml_integer_is_a_config_error(spelling):
    message = str(assert_config_error(entry_yaml(KMS, spelling)))
    assert "port" in message, message


@pytest.mark.parametrize("spelling", ['"443"', "443.0"])
def test_bad_port_is_refused_at_start_up(start_up, spelling):
    assert_start_up_refused(start_up(entry_yaml(KMS, spelling), KMS), "port")


# What PyYAML's safe_load (YAML 1.1) makes of integer spellings that mean the same in YAML 1.2 (the
# upstream tool reads the file with yaml-rust, a YAML 1.2 parser): these are plain integers, accepted.
SAME_INT_IN_YAML_1_1_AND_1_2 = {"0x1bb": 443, "+443": 443, '!!int "443"': 443, "443": 443, "0x1BB": 443}


@pytest.mark.parametrize("spelling,value", SAME_INT_IN_YAML_1_1_AND_1_2.items(),
                         ids=SAME_INT_IN_YAML_1_1_AND_1_2.keys())
def test_yaml_integer_port_spellings_are_read_as_that_integer(spelling, value):
    """``port: 0x1bb`` is the integer 443 under YAML 1.1 (PyYAML safe_load) and YAML 1.2 alike: fine."""
    (rule,) = load_text(entry_yaml(KMS, spelling)).allowlist.rules
    assert rule.ports == frozenset({value})


# Integer spellings that only YAML 1.1 reads as numbers.  safe_load gives: 0443 -> 291 (octal),
# 0673 -> 443 (octal), 7:23 -> 443 (base 60), 4_43 -> 443, 0b110111011 -> 443.  The upstream tool's
# YAML 1.2 reader gives 443 for "0443" and a string for the others, so the same file would allow a
# different port here than upstream: ambiguous, to be refused.
YAML_1_1_ONLY_INT_SPELLINGS = {"leading-zero-octal": "0443", "octal": "0673", "sexagesimal": "7:23",
                               "underscore": "4_43", "binary": "0b110111011"}


@pytest.mark.parametrize("spelling", YAML_1_1_ONLY_INT_SPELLINGS.values(), ids=YAML_1_1_ONLY_INT_SPELLINGS.keys())
def test_port_spelling_read_differently_by_yaml_1_1_and_1_2_is_a_config_error(spelling):
    assert_config_error(entry_yaml(KMS, spelling))


# --------------------------------------------------------------------------- ambiguous documents

@pytest.mark.parametrize("text", [
    f"allowlist:\n- {{address: {KMS}, port: 443, address: evil.example}}\n",
    f"allowlist:\n- address: {KMS}\n  port: 443\n  port: 22\n",
    f"allowlist:\n- {{address: {KMS}, port: 443}}\nallowlist:\n- {{address: evil.example, port: 443}}\n",
], ids=["address-twice", "port-twice", "allowlist-twice"])
def test_duplicate_key_is_a_config_error(text):
    """YAML mappings must not repeat a key; safe_load silently keeps the last one, so a reader of the file
    and the proxy can disagree about what it allows.  Ambiguous: refused."""
    assert_config_error(text)


# --------------------------------------------------------------------------- wildcards and networks

@pytest.mark.parametrize("remote,allowed", [
    ("a.example.com", True),
    ("A.B.Example.COM.", True),
    ("example.com", False),
    ("example.com.", False),
    ("badexample.com", False),
    ("a.badexample.com", False),
    ("example.com.evil.net", False),
    ("a.example.com.evil.net", False),
    ("a.example.co", False),
    ("aexample.com", False),
    (".example.com", False),
    ("a..example.com", False),
    ("*.example.com", False),
])
def test_wildcard_matches_only_strict_subdomains(remote, allowed):
    allowlist = allowlist_of(("*.example.com", 443))
    if allowed:
        target = allowlist.authorize(remote, 443, resolver_over(GlibcLikeDNS()))
        assert target.pinned_to is None and target.host.endswith(".example.com")
    else:
        assert_refused(allowlist, remote, 443, GlibcLikeDNS({remote.lower().rstrip("."): [ATTACKER_IP]}))


@pytest.mark.parametrize("entry", ["*.", "*", "*.*.example.com", "*example.com", "**.example.com",
                                   "a.*.example.com", "*.example.com..", "*.127.0.0.1", "*.0x7f000001"],
                         ids=["star-dot", "star", "double-star-label", "star-prefix", "double-star",
                              "inner-star", "double-dot", "ip-suffix", "hex-ip-suffix"])
def test_malformed_or_ip_wildcard_entry_is_a_config_error(entry):
    assert_config_error(entry_yaml(quoted(entry)))


@pytest.mark.parametrize("entry,remote,allowed", [
    ("10.0.0.0/8", "10.255.255.255", True),
    ("10.0.0.0/8", "10.0.0.0", True),
    ("10.0.0.0/8", "11.0.0.0", False),
    ("10.0.0.0/8", "9.255.255.255", False),
    ("10.0.0.0/8", "::ffff:10.0.0.1", False),
    ("10.0.0.0/8", "10.1", False),
    ("10.0.0.0/8", "167772161", False),
    ("10.1.2.0/24", "10.1.3.0", False),
    ("10.1.2.0/24", "10.1.2.255", True),
    ("192.0.2.1/32", "192.0.2.2", False),
    ("fd00::/8", "fd12::1", True),
    ("fd00::/8", "fe00::1", False),
    ("fd00::/8", "::1", False),
    ("2001:db8::/32", "2001:db9::1", False),
    ("2001:db8::/32", "2001:DB8:ffff::1", True),
])
def test_cidr_entry_matches_only_inside_its_range(entry, remote, allowed):
    allowlist = allowlist_of((entry, 443))
    if allowed:
        target = allowlist.authorize(remote, 443, resolver_over(GlibcLikeDNS()))
        assert ipaddress.ip_address(target.host) in ipaddress.ip_network(entry)
    else:
        assert_refused(allowlist, remote, 443, GlibcLikeDNS())


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "10.0.0.0/33", "10.0.0.0/-1", "010.0.0.0/8", "10.0/8",
                                   "10.0.0.0/8/8", "fd00::/129", "10.0.0.0/", "/8", "10.0.0.0/0x8"])
def test_malformed_cidr_entry_is_a_config_error(entry):
    assert_config_error(entry_yaml(quoted(entry)))


def test_name_resolving_outside_a_cidr_entry_is_refused():
    dns = GlibcLikeDNS({"inside.example": ["10.1.2.3"], "outside.example": ["11.1.2.3"]})
    allowlist = allowlist_of(("10.0.0.0/8", 443))
    assert allowlist.authorize("inside.example", 443, resolver_over(dns)).pinned_to is not None
    assert_refused(allowlist, "outside.example", 443, dns)


def test_port_not_listed_is_refused_even_for_an_exact_name():
    assert_refused(allowlist_of((KMS, [443, 8443])), KMS, 80, GlibcLikeDNS({KMS: [KMS_IP]}))


# --------------------------------------------------------------------------- IPv6 zone indexes

@pytest.mark.parametrize("remote", ["::1%lo", "fe80::1%bogus0", "fe80::1%eth0", "fe80::1%1"])
def test_ipv6_zone_index_on_an_unlisted_address_ends_in_not_allowed(remote):
    """A scoped IPv6 literal the allowlist does not name must be refused with NotAllowed (one line), never
    escape as a raw socket.gaierror from the literal's look-up."""
    assert_refused(allowlist_of((KMS, 443)), remote, 443, GlibcLikeDNS({KMS: [KMS_IP]}))


# --------------------------------------------------------------------------- DNS answers that change

def test_name_allowed_by_name_uses_its_new_addresses():
    """Policy (a): an entry that NAMES the target trusts that name, whatever it resolves to.

    ``kms.example`` is in the allowlist by name; when its DNS answer changes after start-up, connections
    made after the cache expires (``--dns-ttl``) go to the new addresses.  This is upstream's meaning of a
    name in the allowlist, and what makes regional endpoints with rotating addresses usable.
    """
    dns = GlibcLikeDNS({"kms.example": ["10.0.0.1"]})
    clock = FakeClock()
    resolver = resolver_over(dns, ttl=30, clock=clock)
    target = allowlist_of(("kms.example", 443)).authorize("kms.example", 443, resolver)
    assert target.pinned_to is None
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.1"]
    dns.records["kms.example"] = ["10.0.0.2", "2001:db8::2"]
    clock.advance(10)
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.1"], "within the TTL: cached answer"
    clock.advance(21)
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.2", "2001:db8::2"]


def _pinned_alias(dns: GlibcLikeDNS, clock: FakeClock, entries=(("kms.example", 443),)):
    resolver = resolver_over(dns, ttl=30, clock=clock)
    target = allowlist_of(*entries).authorize("alias.internal", 443, resolver)
    assert target.pinned_to is not None, "alias.internal must be allowed only through its addresses"
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.1"]
    return target, resolver


def test_name_allowed_through_addresses_is_refused_when_its_answer_leaves_them():
    """Policy (b): ``alias.internal`` is allowed only because it resolved to 10.0.0.1, an address of the
    allowlisted ``kms.example``.  When alias.internal's answer changes to 192.0.2.66, the next connection
    (after the cache expires) is refused: Target.endpoints raises ResolveError naming the address."""
    dns = GlibcLikeDNS({"kms.example": ["10.0.0.1"], "alias.internal": ["10.0.0.1"]})
    clock = FakeClock()
    target, resolver = _pinned_alias(dns, clock)
    dns.records["alias.internal"] = ["192.0.2.66"]
    clock.advance(31)
    with pytest.raises(ResolveError) as info:
        target.endpoints(resolver)
    assert "192.0.2.66" in str(info.value)
    assert_one_line(str(info.value))


def test_name_allowed_through_addresses_gets_only_the_admitted_part_of_a_mixed_answer():
    dns = GlibcLikeDNS({"kms.example": ["10.0.0.1"], "alias.internal": ["10.0.0.1"]})
    clock = FakeClock()
    target, resolver = _pinned_alias(dns, clock)
    dns.records["alias.internal"] = ["192.0.2.66", "10.0.0.1", "2001:db8::66"]
    clock.advance(31)
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.1"]


def test_name_allowed_through_addresses_is_refused_when_the_entry_moves_away():
    """Both names are re-resolved: if the allowlisted name moves to 10.0.0.9, the alias (still 10.0.0.1)
    no longer shares an address with it and is refused."""
    dns = GlibcLikeDNS({"kms.example": ["10.0.0.1"], "alias.internal": ["10.0.0.1"]})
    clock = FakeClock()
    target, resolver = _pinned_alias(dns, clock)
    dns.records["kms.example"] = ["10.0.0.9"]
    clock.advance(31)
    with pytest.raises(ResolveError):
        target.endpoints(resolver)


def test_name_allowed_through_a_cidr_is_refused_when_its_answer_leaves_the_range():
    dns = GlibcLikeDNS({"alias.internal": ["10.0.0.1"]})
    clock = FakeClock()
    target, resolver = _pinned_alias(dns, clock, entries=(("10.0.0.0/24", 443),))
    dns.records["alias.internal"] = ["10.0.1.1"]
    clock.advance(31)
    with pytest.raises(ResolveError):
        target.endpoints(resolver)
    dns.records["alias.internal"] = ["10.0.0.200"]
    clock.advance(31)
    assert [str(e.ip) for e in target.endpoints(resolver)] == ["10.0.0.200"]


def test_name_allowed_through_addresses_is_refused_when_the_entry_stops_resolving():
    dns = GlibcLikeDNS({"kms.example": ["10.0.0.1"], "alias.internal": ["10.0.0.1"]})
    clock = FakeClock()
    target, resolver = _pinned_alias(dns, clock)
    del dns.records["kms.example"]
    clock.advance(31)
    with pytest.raises(ResolveError):
        target.endpoints(resolver)
