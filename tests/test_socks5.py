"""Mode ``socks5``: the SOCKS5 greeting and CONNECT request parser (issue 13 item 2, RFC 1928).

* the exact bytes curl sends (``--socks5-hostname``: a domain name; ``--socks5``: an IPv4 address), in two
  reads and in one, and every reply and refusal, byte for byte;
* every valid exchange split at every byte boundary, and fed byte by byte, gives the same Request;
* the bypass spellings of tests/test_bypass.py, asked for as SOCKS5 domain names (and, where they are
  addresses, as SOCKS5 addresses): each is refused by the parser or by the real allowlist;
* hypothesis fuzz, derandomized: ``FUZZ_CASES`` per test, ``FUZZ_TOTAL`` = 11,000 generated cases per run.
  Every case ends in a Refusal (one-line reason, fixed label, the reply its label implies) or a Request,
  the same however the bytes are split; every Request then goes through ``Allowlist.authorize`` with a
  fake DNS, and a Target must be one that an entry really admits.  No network, no sockets.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tests.test_bypass as bypass
from tests.fuzzing import fuzz_settings, run_counted
from tests.helpers import GlibcLikeDNS, inet_aton_reads
from vsockproxy.allowlist import NotAllowed
from vsockproxy.config import parse_document
from vsockproxy.handshake import (
    CONNECTED, MAX_REQUEST_BYTES, NOT_ALLOWED, REFUSED, TIMED_OUT, TOO_LARGE, TOO_SLOW, UNREACHABLE, Refusal,
    Request,
)
from vsockproxy.resolver import Resolver
from vsockproxy.socks5 import Socks5Parser

KMS = "kms.us-east-1.amazonaws.com"
CHOSEN = b"\x05\x00"            # method choice: no authentication
NO_METHOD = b"\x05\xff"         # method choice: no acceptable methods


def reply_bytes(code: int) -> bytes:
    """RFC 1928's reply, written out independently: 05 REP 00, ATYP IPv4, 0.0.0.0, port 0."""
    return bytes.fromhex(f"05 {code:02x} 00 01 00 00 00 00 00 00")


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def request(atyp: int, address: bytes, port: int, command: int = 1, version: int = 5, reserved: int = 0) -> bytes:
    """A SOCKS5 request; a domain ``address`` gets its length byte here."""
    if atyp == 3:
        address = bytes([len(address)]) + address
    return bytes([version, command, reserved, atyp]) + address + port.to_bytes(2, "big")


def domain_request(name: str, port: int) -> bytes:
    return request(3, name.encode("utf-8"), port)


def address_request(host: str, port: int) -> bytes:
    address = ipaddress.ip_address(host)
    return request(1 if address.version == 4 else 4, address.packed, port)


def run(chunks) -> tuple[bytes, object, list[bytes]]:
    """Feed ``chunks`` to a fresh parser until an outcome: (everything it said to send, outcome, unfed chunks)."""
    parser = Socks5Parser()
    sent = b""
    chunks = list(chunks)
    while chunks:
        now, outcome = parser.feed(chunks.pop(0))
        sent += now
        if outcome is not None:
            return sent, outcome, chunks
    return sent, None, []


def assert_one_line(message: str) -> None:
    assert isinstance(message, str) and message, "empty message"
    assert "\n" not in message and "\r" not in message, message


def one_read(data: bytes):
    sent, outcome, _ = run([data])
    return sent, outcome


# What curl writes, each part in its own send(): captured from curl 7.88.1 (Debian 12, built with GSS-API)
# talking to this parser on 127.0.0.1.  curl offers GSS-API (01) when built with it, unless --socks5-basic,
# and username/password (02) when given --proxy-user.
CURL_GREETINGS = {
    "05-01-00": bytes.fromhex("05 01 00"),              # --socks5-basic, or a curl without GSS-API
    "05-02-00-02": bytes.fromhex("05 02 00 02"),        # the same with --proxy-user
    "05-02-00-01": bytes.fromhex("05 02 00 01"),        # Debian's curl, by default
    "05-03-00-01-02": bytes.fromhex("05 03 00 01 02"),  # Debian's curl with --proxy-user
}
CURL_GREETING = CURL_GREETINGS["05-01-00"]
# --socks5-hostname https://kms.us-east-1.amazonaws.com/
CURL_HOSTNAME_REQUEST = bytes.fromhex("05 01 00 03 1b") + KMS.encode() + bytes.fromhex("01 bb")
# --socks5 https://127.0.0.1:8443/ (curl resolves, then sends the IPv4 address)
CURL_IPV4_REQUEST = bytes.fromhex("05 01 00 01 7f 00 00 01 20 fb")
# --socks5-hostname https://[2001:db8::1]:8443/ (an IP literal goes as an address even so)
CURL_IPV6_REQUEST = bytes.fromhex("05 01 00 04 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01 20 fb")
TLS_START = bytes.fromhex("16 03 01 02 00 01 00 01 fc 03 03")   # a ClientHello's first bytes: early data

VALID = {
    "curl-socks5-hostname": (CURL_GREETING + CURL_HOSTNAME_REQUEST, Request(KMS, 443)),
    "curl-userpass-offered": (CURL_GREETINGS["05-02-00-02"] + CURL_HOSTNAME_REQUEST, Request(KMS, 443)),
    "curl-debian-default": (CURL_GREETINGS["05-02-00-01"] + CURL_HOSTNAME_REQUEST, Request(KMS, 443)),
    "curl-debian-userpass": (CURL_GREETINGS["05-03-00-01-02"] + CURL_HOSTNAME_REQUEST, Request(KMS, 443)),
    "curl-socks5-ipv4": (CURL_GREETINGS["05-02-00-01"] + CURL_IPV4_REQUEST, Request("127.0.0.1", 8443)),
    "curl-ipv6-literal": (CURL_GREETINGS["05-02-00-01"] + CURL_IPV6_REQUEST, Request("2001:db8::1", 8443)),
    "ipv4-mapped-ipv6": (CURL_GREETING + address_request("::ffff:7f00:1", 443),
                         Request(str(ipaddress.ip_address("::ffff:7f00:1")), 443)),
    "no-auth-offered-last": (greeting(2, 1, 0x80, 0) + domain_request("a.example.com", 1), Request("a.example.com", 1)),
    "ipv4-port-65535": (CURL_GREETING + address_request("192.0.2.1", 65535), Request("192.0.2.1", 65535)),
    "upper-case-trailing-dot": (CURL_GREETING + domain_request("KMS.Example.COM.", 443),
                                Request("KMS.Example.COM.", 443)),
    "longest": (greeting(*range(255)) + domain_request("a" * 255, 443), Request("a" * 255, 443)),
}
#: The longest greeting + request RFC 1928 allows: 255 methods and a 255-byte name.
LONGEST = 2 + 255 + 4 + 1 + 255 + 2


# --------------------------------------------------------------------------- curl's exact bytes

@pytest.mark.parametrize("greeting_bytes", CURL_GREETINGS.values(), ids=CURL_GREETINGS.keys())
def test_curl_socks5_hostname_in_two_reads(greeting_bytes):
    parser = Socks5Parser()
    assert parser.feed(greeting_bytes) == (CHOSEN, None)
    assert parser.feed(CURL_HOSTNAME_REQUEST) == (b"", Request(KMS, 443))
    assert parser.reply(CONNECTED) == bytes.fromhex("05 00 00 01 00 00 00 00 00 00")


@pytest.mark.parametrize("greeting_bytes", CURL_GREETINGS.values(), ids=CURL_GREETINGS.keys())
def test_curl_socks5_hostname_greeting_and_request_in_one_read(greeting_bytes):
    parser = Socks5Parser()
    assert parser.feed(greeting_bytes + CURL_HOSTNAME_REQUEST) == (CHOSEN, Request(KMS, 443))
    assert parser.reply(NOT_ALLOWED) == bytes.fromhex("05 02 00 01 00 00 00 00 00 00")


def test_curl_socks5_ipv4_in_two_reads_and_in_one():
    parser = Socks5Parser()
    assert parser.feed(CURL_GREETING) == (CHOSEN, None)
    assert parser.feed(CURL_IPV4_REQUEST) == (b"", Request("127.0.0.1", 8443))
    assert Socks5Parser().feed(CURL_GREETING + CURL_IPV4_REQUEST) == (CHOSEN, Request("127.0.0.1", 8443))


def test_ipv6_address_comes_back_compressed():
    assert one_read(CURL_GREETING + CURL_IPV6_REQUEST) == (CHOSEN, Request("2001:db8::1", 8443))
    full = CURL_GREETING + address_request("fd00:0:0:0:0:0:0:0", 443)
    assert one_read(full) == (CHOSEN, Request("fd00::", 443))


def test_bytes_after_the_request_are_early_data():
    """A client that does not wait for the reply (TLS right behind the request) loses nothing."""
    assert one_read(CURL_GREETING + CURL_HOSTNAME_REQUEST + TLS_START) == (CHOSEN, Request(KMS, 443, TLS_START))
    parser = Socks5Parser()
    assert parser.feed(CURL_GREETING) == (CHOSEN, None)
    assert parser.feed(CURL_IPV4_REQUEST + TLS_START) == (b"", Request("127.0.0.1", 8443, TLS_START))


def test_method_choice_is_sent_once_exactly_when_the_greeting_completes():
    parser = Socks5Parser()
    assert parser.feed(b"\x05") == (b"", None)
    assert parser.feed(b"\x02") == (b"", None)
    assert parser.feed(b"\x02") == (b"", None)
    assert parser.feed(b"\x00") == (CHOSEN, None)
    for byte in CURL_HOSTNAME_REQUEST[:-1]:
        assert parser.feed(bytes([byte])) == (b"", None)
    assert parser.feed(CURL_HOSTNAME_REQUEST[-1:]) == (b"", Request(KMS, 443))


def test_a_name_is_passed_on_as_written():
    """Case, a trailing dot, and loose spellings are the allowlist's to judge, not the parser's."""
    for name in ["KMS.Example.COM.", "0x7f000001", "127.1", "1234", "*.example.com", "::ffff:127.0.0.1",
                 "fe80::1%eth0", "a..b", "-x-"]:
        assert one_read(CURL_GREETING + domain_request(name, 443)) == (CHOSEN, Request(name, 443)), name


# --------------------------------------------------------------------------- replies

@pytest.mark.parametrize("outcome,reply", [
    (CONNECTED, "05 00 00 01 00 00 00 00 00 00"),
    (NOT_ALLOWED, "05 02 00 01 00 00 00 00 00 00"),
    (UNREACHABLE, "05 04 00 01 00 00 00 00 00 00"),
    (REFUSED, "05 05 00 01 00 00 00 00 00 00"),
    (TIMED_OUT, "05 06 00 01 00 00 00 00 00 00"),
    (TOO_LARGE, "05 01 00 01 00 00 00 00 00 00"),
    (TOO_SLOW, "05 01 00 01 00 00 00 00 00 00"),
])
def test_reply_to_a_request(outcome, reply):
    parser = Socks5Parser()
    assert parser.feed(CURL_GREETING + CURL_HOSTNAME_REQUEST)[1] == Request(KMS, 443)
    assert parser.reply(outcome) == bytes.fromhex(reply)


@pytest.mark.parametrize("fed", [b"", b"\x05", b"\x05\x02", b"\x05\x02\x00"],
                         ids=["nothing", "ver", "nmethods", "half"])
@pytest.mark.parametrize("outcome", [TOO_SLOW, TOO_LARGE])
def test_reply_before_the_method_choice_is_no_acceptable_methods(fed, outcome):
    """A client still waiting for the method choice reads 2 bytes: 05 01 would mean "GSSAPI chosen"."""
    parser = Socks5Parser()
    assert parser.feed(fed) == (b"", None)
    assert parser.reply(outcome) == NO_METHOD


@pytest.mark.parametrize("outcome", [TOO_SLOW, TOO_LARGE])
def test_reply_after_the_method_choice_mid_request_is_general_failure(outcome):
    parser = Socks5Parser()
    assert parser.feed(CURL_GREETING + CURL_HOSTNAME_REQUEST[:7]) == (CHOSEN, None)
    assert parser.reply(outcome) == reply_bytes(0x01)


# --------------------------------------------------------------------------- refusals

GREETING_REFUSALS = {
    # name: (bytes, outcome label, reply)
    "socks4-connect": (bytes.fromhex("04 01 01 bb 7f 00 00 01 00"), "not-socks5", b""),
    "socks4a": (bytes.fromhex("04 01 01 bb 00 00 00 01 00") + KMS.encode() + b"\x00", "not-socks5", b""),
    "http-connect": (f"CONNECT {KMS}:443 HTTP/1.1\r\nHost: {KMS}:443\r\n\r\n".encode(), "not-socks5", b""),
    "http-get": (b"GET / HTTP/1.1\r\n\r\n", "not-socks5", b""),
    "tls-client-hello": (TLS_START, "not-socks5", b""),
    "nul-byte": (b"\x00", "not-socks5", b""),
    "zero-methods": (bytes.fromhex("05 00"), "malformed", NO_METHOD),
    "username-password-only": (bytes.fromhex("05 01 02"), "no-method", NO_METHOD),
    "gssapi-and-userpass": (bytes.fromhex("05 02 01 02"), "no-method", NO_METHOD),
    "all-but-no-auth": (greeting(*range(1, 256)), "no-method", NO_METHOD),
}


@pytest.mark.parametrize("data,label,reply", GREETING_REFUSALS.values(), ids=GREETING_REFUSALS.keys())
def test_greeting_refusal(data, label, reply):
    sent, outcome = one_read(data + CURL_HOSTNAME_REQUEST)
    assert sent == b""
    assert isinstance(outcome, Refusal)
    assert (outcome.outcome, outcome.reply) == (label, reply)
    assert_one_line(outcome.reason)


def test_not_socks5_is_refused_on_its_first_byte():
    assert Socks5Parser().feed(b"C")[1].outcome == "not-socks5"
    assert Socks5Parser().feed(b"\x04")[1].outcome == "not-socks5"


REQUEST_REFUSALS = {
    "bind": (request(1, bytes(4), 443, command=2), "unsupported", 0x07),
    "udp-associate": (request(1, bytes(4), 443, command=3), "unsupported", 0x07),
    "command-0": (request(3, b"example.com", 443, command=0), "unsupported", 0x07),
    "command-ff": (request(4, bytes(16), 443, command=0xFF), "unsupported", 0x07),
    "atyp-0": (request(0, bytes(4), 443), "address-type", 0x08),
    "atyp-2": (request(2, bytes(4), 443), "address-type", 0x08),
    "atyp-5": (request(5, bytes(4), 443), "address-type", 0x08),
    "atyp-ff": (request(0xFF, bytes(4), 443), "address-type", 0x08),
    "version-4": (request(1, bytes(4), 443, version=4), "malformed", 0x01),
    "version-0": (request(1, bytes(4), 443, version=0), "malformed", 0x01),
    "reserved-1": (request(1, bytes(4), 443, reserved=1), "malformed", 0x01),
    "reserved-ff": (request(3, b"example.com", 443, reserved=0xFF), "malformed", 0x01),
    "empty-name": (request(3, b"", 443), "malformed", 0x01),
    "name-with-space": (request(3, b"a b.example.com", 443), "malformed", 0x01),
    "name-with-nul": (request(3, KMS.encode() + b"\x00", 443), "malformed", 0x01),
    "name-with-tab": (request(3, b"a\t.example.com", 443), "malformed", 0x01),
    "name-with-newline": (request(3, KMS.encode() + b"\r\nHost: x", 443), "malformed", 0x01),
    "name-with-del": (request(3, b"a\x7f.example.com", 443), "malformed", 0x01),
    "name-utf8": (request(3, "kms.us-east-1.amazonaws.c\u03bfm".encode(), 443), "malformed", 0x01),
    "name-latin1": (request(3, b"caf\xe9.example.com", 443), "malformed", 0x01),
    "name-only-space": (request(3, b" ", 443), "malformed", 0x01),
    "port-0-name": (request(3, b"example.com", 0), "malformed", 0x01),
    "port-0-ipv4": (request(1, bytes([10, 1, 2, 3]), 0), "malformed", 0x01),
    "port-0-ipv6": (request(4, ipaddress.ip_address("::1").packed, 0), "malformed", 0x01),
}


@pytest.mark.parametrize("data,label,code", REQUEST_REFUSALS.values(), ids=REQUEST_REFUSALS.keys())
def test_request_refusal(data, label, code):
    sent, outcome = one_read(CURL_GREETING + data)
    assert sent == CHOSEN
    assert isinstance(outcome, Refusal)
    assert (outcome.outcome, outcome.reply) == (label, reply_bytes(code))
    assert_one_line(outcome.reason)


def test_refusal_reasons_quote_the_request_escaped_and_bounded():
    _, outcome = one_read(CURL_GREETING + request(3, b"x\r\n" * 80, 443))
    assert "\\r\\n" in outcome.reason and len(outcome.reason) < 200
    _, outcome = one_read(b"GET /\r\n" + b"A" * 5000)
    assert "\\r\\n" in outcome.reason and len(outcome.reason) < 200


def test_a_bad_command_or_address_type_is_refused_before_the_address_arrives():
    assert one_read(CURL_GREETING + bytes.fromhex("05 02 00 01"))[1].outcome == "unsupported"
    assert one_read(CURL_GREETING + bytes.fromhex("05 01 00 09"))[1].outcome == "address-type"
    assert one_read(CURL_GREETING + bytes.fromhex("05 01 00 03 00"))[1].outcome == "malformed"


# --------------------------------------------------------------------------- splits

def every_split(data: bytes):
    """``data`` in two reads at every boundary, and byte by byte."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i:i + 1] for i in range(len(data))]


@pytest.mark.parametrize("data,expected", VALID.values(), ids=VALID.keys())
def test_every_split_of_a_valid_exchange_gives_the_same_request(data, expected):
    for chunks in every_split(data):
        sent, outcome, rest = run(chunks)
        assert (sent, outcome) == (CHOSEN, expected), [c.hex() for c in chunks]
        assert rest in ([], [b""])


@pytest.mark.parametrize("name", ["curl-debian-default", "curl-socks5-ipv4", "curl-ipv6-literal"])
def test_every_three_read_split_of_curls_bytes_gives_the_same_request(name):
    data, expected = VALID[name]
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            chunks = [data[:first], data[first:second], data[second:]]
            assert run(chunks)[:2] == (CHOSEN, expected), (first, second)


def test_every_split_keeps_every_early_byte():
    data = CURL_GREETING + CURL_HOSTNAME_REQUEST + TLS_START
    for chunks in every_split(data):
        sent, outcome, rest = run(chunks)
        assert (sent, outcome.host, outcome.port) == (CHOSEN, KMS, 443)
        assert outcome.early_data + b"".join(rest) == TLS_START


@pytest.mark.parametrize("data,label", [(d, label) for d, label, _ in GREETING_REFUSALS.values()]
                         + [(CURL_GREETING + d, label) for d, label, _ in REQUEST_REFUSALS.values()],
                         ids=[*GREETING_REFUSALS, *REQUEST_REFUSALS])
def test_every_split_of_a_refused_exchange_gives_the_same_refusal(data, label):
    sent, outcome = one_read(data)
    assert outcome.outcome == label
    for chunks in every_split(data):
        split_sent, split_outcome, _ = run(chunks)
        assert (split_sent, split_outcome.outcome, split_outcome.reply) == (sent, label, outcome.reply)


def test_every_stream_is_decided_within_the_longest_exchange():
    """Nothing is waited for past 519 bytes, so the parser never holds MAX_REQUEST_BYTES (TOO_LARGE
    cannot arise from the protocol: the server's limit only backs this up)."""
    assert LONGEST == len(VALID["longest"][0]) == 519 < MAX_REQUEST_BYTES
    parser = Socks5Parser()
    data = VALID["longest"][0]
    for index in range(len(data) - 1):
        assert parser.feed(data[index:index + 1])[1] is None
    assert parser.feed(data[-1:]) == (b"", VALID["longest"][1])


# --------------------------------------------------------------------------- bypass spellings (tests/test_bypass.py)

def authorize_or_refuse(data: bytes, allowlist, dns: GlibcLikeDNS):
    """Parse ``data`` and, if it is a Request, ask the allowlist: the parser's Refusal, or NotAllowed."""
    sent, outcome = one_read(CURL_GREETING + data)
    if isinstance(outcome, Refusal):
        assert outcome.outcome == "malformed" and outcome.reply == reply_bytes(0x01), outcome
        return outcome
    assert isinstance(outcome, Request)
    return bypass.assert_refused(allowlist, outcome.host, outcome.port, dns)


NO_LOOKUP_SPELLINGS = {**{f"ipv4-{s}": s for s in bypass.NON_CANONICAL_IPV4},
                       **{f"bare-{s}": s for s in bypass.BARE_NUMBERS},
                       **bypass.INVALID_LOOKALIKES}
# SOCKS5 cannot carry a name over 255 bytes; the longest one it can is still over DNS's 253.
NO_LOOKUP_SPELLINGS["name-too-long"] = ("a" * 63 + ".") * 3 + "a" * 63


@pytest.mark.parametrize("remote", NO_LOOKUP_SPELLINGS.values(), ids=NO_LOOKUP_SPELLINGS.keys())
def test_bypass_spelling_as_a_domain_name_is_refused_without_a_lookup(remote):
    """What test_bypass asks of REMOTE_ADDR, asked of a SOCKS5 domain name: refused, no DNS question."""
    name = remote.encode("utf-8")
    assert len(name) <= 255
    dns = GlibcLikeDNS({bypass.KMS: [bypass.KMS_IP], "1234.corp.example": ["10.9.9.9"],
                        **({remote: [bypass.KMS_IP]} if remote else {})})
    allowlist = bypass.allowlist_of((bypass.KMS, 443), ("127.0.0.1", 443), ("1234.corp.example", 443),
                                    ("10.9.9.9", 443))
    authorize_or_refuse(request(3, name, 443), allowlist, dns)
    assert dns.asked == [], f"{remote!r} was handed to getaddrinfo"


@pytest.mark.parametrize("remote", bypass.DIFFERENT_NAMES.values(), ids=bypass.DIFFERENT_NAMES.keys())
def test_bypass_different_name_as_a_domain_name_is_refused(remote):
    dns = GlibcLikeDNS({bypass.KMS: [bypass.KMS_IP], remote.lower(): [bypass.ATTACKER_IP]})
    authorize_or_refuse(domain_request(remote, 443), bypass.allowlist_of((bypass.KMS, 443)), dns)
    assert set(dns.asked) <= {remote.lower(), bypass.KMS}, dns.asked


@pytest.mark.parametrize("remote", ["::ffff:127.0.0.1", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1", "::127.0.0.1",
                                    "64:ff9b::127.0.0.1", "0.0.0.0", "::"])
def test_other_spellings_of_loopback_are_refused_as_addresses_and_as_names(remote):
    """IPv4-mapped/compatible/NAT64 and unspecified addresses do not match an allowlisted 127.0.0.1 or ::1."""
    allowlist = bypass.allowlist_of(("127.0.0.1", 443), ("::1", 443))
    authorize_or_refuse(address_request(remote, 443), allowlist, GlibcLikeDNS())
    authorize_or_refuse(domain_request(remote, 443), allowlist, GlibcLikeDNS())


def test_ipv4_mapped_address_is_allowed_only_when_that_literal_is_listed():
    dns = GlibcLikeDNS()
    _, outcome = one_read(CURL_GREETING + address_request("::ffff:127.0.0.1", 443))
    target = bypass.allowlist_of(("::ffff:127.0.0.1", 443)).authorize(outcome.host, outcome.port,
                                                                    bypass.resolver_over(dns))
    assert target.host == str(ipaddress.ip_address("::ffff:7f00:1")) and dns.asked == []
    authorize_or_refuse(address_request("127.0.0.1", 443), bypass.allowlist_of(("::ffff:127.0.0.1", 443)), dns)


@pytest.mark.parametrize("remote", ["::1%lo", "fe80::1%bogus0", "fe80::1%eth0", "fe80::1%1"])
def test_ipv6_zone_index_as_a_domain_name_is_refused(remote):
    authorize_or_refuse(domain_request(remote, 443), bypass.allowlist_of((KMS, 443)), GlibcLikeDNS({KMS: ["10.1.2.3"]}))


@pytest.mark.parametrize("remote", ["example.com", "example.com.", "badexample.com", "a.badexample.com",
                                    "example.com.evil.net", ".example.com", "a..example.com", "*.example.com"])
def test_wildcard_admits_no_look_alike_domain_name(remote):
    dns = GlibcLikeDNS({remote.lower().rstrip("."): [bypass.ATTACKER_IP]})
    authorize_or_refuse(domain_request(remote, 443), bypass.allowlist_of(("*.example.com", 443)), dns)


def test_port_not_listed_is_refused():
    authorize_or_refuse(CURL_HOSTNAME_REQUEST[:-2] + (80).to_bytes(2, "big"), bypass.allowlist_of((KMS, [443, 8443])),
                        GlibcLikeDNS({KMS: ["10.1.2.3"]}))


# --------------------------------------------------------------------------- fuzz

FUZZ_CASES = {
    "random_bytes": 2000,           # any bytes, in random reads
    "socks5_prefixed_bytes": 2000,  # 05 then any bytes: reaches the greeting and request checks
    "structured_exchanges": 3000,   # greeting + request + early data, fields valid, tricky or random
    "mutated_exchanges": 4000,      # those exchanges with bytes flipped, set, inserted, dropped, cut
}
FUZZ_TOTAL = sum(FUZZ_CASES.values())
CASES_RUN: dict[str, int] = {}

FUZZ_ENTRIES = [
    (KMS, 443),
    ("*.example.com", [443, 8443]),
    ("10.0.0.0/8", 443),
    ("127.0.0.1", [443, 1080]),
    ("::1", 443),
    ("2001:db8::/32", 443),
    ("192.0.2.1", 80),
]
FUZZ_DNS = {
    KMS: ["52.94.0.1"],
    "alias.internal": ["10.0.0.1"],                   # admitted through 10.0.0.0/8: pinned
    "kms-alias.test": ["52.94.0.1"],                  # admitted through KMS's address: pinned
    "mixed.test": ["203.0.113.66", "10.9.9.9"],       # pinned to 10.9.9.9 only
    "sneaky.test": ["::ffff:127.0.0.1"],              # not admitted by 127.0.0.1
    "evil.test": ["203.0.113.66"],
    "a.example.com": ["203.0.113.66"],                # named by the wildcard: its addresses do not matter
}
FUZZ_ALLOWLIST = parse_document({"allowlist": [{"address": a, "port": p} for a, p in FUZZ_ENTRIES]},
                                "fuzz.yaml").allowlist

INTERESTING_NAMES = sorted({*FUZZ_DNS, KMS.upper() + ".", KMS + "..", "A.Example.COM.", "example.com",
                            "x.example.com.evil.net", "*.example.com", "0x7f000001", "127.1", "2130706433",
                            "127.0.0.1", "127.0.0.1.", "::1", "::ffff:127.0.0.1", "fe80::1%lo", "10.1.2.3", "010.1.2.3",
                            "1234", "localhost", "2001:db8::1", "2001:DB8::1", "[::1]", KMS + ":443",
                            *bypass.NON_CANONICAL_IPV4, *bypass.BARE_NUMBERS,
                            *(s for s in bypass.INVALID_LOOKALIKES.values() if len(s.encode()) <= 255),
                            *bypass.DIFFERENT_NAMES.values()})
INTERESTING_ADDRESSES = ["127.0.0.1", "0.0.0.0", "10.0.0.1", "10.255.255.255", "11.0.0.0", "52.94.0.1",
                         "192.0.2.1", "203.0.113.66", "::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                         "::127.0.0.1", "2001:db8::1", "2001:db9::1", "64:ff9b::a00:1", "fe80::1"]
PORTS = [0, 1, 80, 443, 1080, 8443, 65535]
# Targets some entry may admit (by name, by wildcard, by network, or through their addresses): so that the
# fuzz also reaches the allowlist's "allowed" paths, not only its refusals.
LIKELY_ALLOWED = [KMS, KMS.upper() + ".", "alias.internal", "kms-alias.test", "mixed.test", "sneaky.test",
                  "a.example.com", "B.C.Example.Com.", "10.1.2.3", "127.0.0.1", "::1", "2001:db8::5", "192.0.2.1"]
LABELS = {"not-socks5": {b""}, "no-method": {NO_METHOD}, "malformed": {NO_METHOD, reply_bytes(0x01)},
          "unsupported": {reply_bytes(0x07)}, "address-type": {reply_bytes(0x08)}}


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def parse_literal(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_network(entry: str):
    try:
        return ipaddress.ip_network(entry)
    except ValueError:
        return None


def entries_for(port: int) -> list[str]:
    return [entry for entry, ports in FUZZ_ENTRIES if port in (ports if isinstance(ports, list) else [ports])]


def entry_names(entry: str, host: str) -> bool:
    """Oracle, independent of allowlist.py: the entry names the canonical ``host`` (README's rules)."""
    if entry.startswith("*."):
        return host.endswith(entry[1:])
    network = parse_network(entry)
    if network is not None:
        address = parse_literal(host)
        return address is not None and address in network
    return host == entry


def entry_admits(entry: str, address) -> bool:
    """Oracle: ``address`` is one the entry stands for (its network, or its name's addresses in FUZZ_DNS)."""
    if entry.startswith("*."):
        return False
    network = parse_network(entry)
    if network is not None:
        return address in network
    return any(ipaddress.ip_address(a) == address for a in FUZZ_DNS.get(entry, []))


def check_request_against_the_allowlist(outcome: Request) -> None:
    """The real matcher allows ``outcome`` only to a target an entry admits, per the independent oracle."""
    dns = GlibcLikeDNS(FUZZ_DNS)
    resolver = Resolver(socket.AF_UNSPEC, 30.0, getaddrinfo=dns)
    try:
        target = FUZZ_ALLOWLIST.authorize(outcome.host, outcome.port, resolver)
    except NotAllowed as exc:
        assert_one_line(str(exc))
        return
    literal = parse_literal(outcome.host)
    expected = str(literal) if literal is not None else outcome.host.lower()
    expected = expected[:-1] if literal is None and expected.endswith(".") else expected
    assert target.host == expected and target.port == outcome.port, (outcome, target)
    entries = entries_for(target.port)
    if target.pinned_to is None:
        assert any(entry_names(entry, target.host) for entry in entries), (outcome, target)
    else:
        if literal is None:  # a name admitted through its addresses: never a loose spelling of a number
            assert not inet_aton_reads(target.host) and not target.host.rsplit(".", 1)[-1].isdigit(), target
        endpoints = target.endpoints(resolver)
        assert endpoints and all(any(entry_admits(entry, e.ip) for entry in entries) for e in endpoints), endpoints
    for asked in dns.asked:  # no loose spelling of a number reached getaddrinfo
        assert parse_literal(asked) is not None or not inet_aton_reads(asked), asked


def check_case(name: str, data: bytes, chunks: list[bytes]) -> None:
    """Every invariant of one fuzz case; ``chunks`` is ``data`` in the reads the server would make."""
    CASES_RUN[name] += 1
    sent, outcome, rest = run(chunks)
    whole_sent, whole = one_read(data)
    if outcome is None:
        assert len(data) < LONGEST and whole is None and sent in (b"", CHOSEN), data.hex()
        return
    assert sent == whole_sent and sent in (b"", CHOSEN)
    if isinstance(outcome, Refusal):
        assert (outcome.outcome, outcome.reply) == (whole.outcome, whole.reply), (data.hex(), outcome, whole)
        assert outcome.outcome in LABELS and outcome.reply in LABELS[outcome.outcome], outcome
        assert (sent == CHOSEN) == (outcome.reply not in (b"", NO_METHOD)), (sent, outcome)
        assert_one_line(outcome.reason)
        return
    assert isinstance(outcome, Request) and sent == CHOSEN
    assert (outcome.host, outcome.port) == (whole.host, whole.port)
    assert outcome.early_data + b"".join(rest) == whole.early_data and data.endswith(whole.early_data)
    assert 1 <= outcome.port <= 65535 and outcome.host
    assert all(0x21 <= ord(c) <= 0x7E for c in outcome.host), outcome.host
    check_request_against_the_allowlist(outcome)


cuts = st.lists(st.integers(0, 1000), max_size=6)
methods = st.one_of(st.sampled_from([[0], [0, 2], [0, 1], [0, 1, 2]]),
                    st.lists(st.integers(0, 255), min_size=0, max_size=8))
hosts = st.one_of(st.sampled_from(LIKELY_ALLOWED).map(lambda s: (3, s.encode())),
                  st.sampled_from(LIKELY_ALLOWED).filter(lambda s: parse_literal(s) is not None).map(
                      lambda a: (1 if parse_literal(a).version == 4 else 4, parse_literal(a).packed)),
                  st.sampled_from(INTERESTING_NAMES).map(lambda s: (3, s.encode("utf-8"))),
                  st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
                  .map(lambda s: (3, s.encode())),
                  st.binary(min_size=0, max_size=255).map(lambda b: (3, b)),
                  st.sampled_from(INTERESTING_ADDRESSES).map(
                      lambda a: (1 if ipaddress.ip_address(a).version == 4 else 4, ipaddress.ip_address(a).packed)),
                  st.binary(min_size=4, max_size=4).map(lambda b: (1, b)),
                  st.binary(min_size=16, max_size=16).map(lambda b: (4, b)))
ports = st.one_of(st.sampled_from(PORTS), st.just(443), st.integers(0, 65535))
early = st.one_of(st.just(b""), st.just(TLS_START), st.binary(max_size=64))


@st.composite
def exchanges(draw) -> bytes:
    offered = draw(methods)
    atyp, address = draw(hosts)
    return (bytes([5, len(offered), *offered]) + request(atyp, address[:255], draw(ports))
            + draw(early))


def test_fuzz_budget_is_at_least_10000_cases():
    assert FUZZ_TOTAL >= 10_000, FUZZ_CASES
    print(f"fuzz budget: {FUZZ_TOTAL} generated cases per run: {FUZZ_CASES}")


def test_fuzz_random_bytes():
    @fuzz_settings(FUZZ_CASES["random_bytes"])
    @given(st.binary(max_size=700), cuts)
    def inner(data, points):
        check_case("random_bytes", data, split(data, points))

    run_counted("random_bytes", inner, FUZZ_CASES, CASES_RUN)


def test_fuzz_socks5_prefixed_bytes():
    @fuzz_settings(FUZZ_CASES["socks5_prefixed_bytes"])
    @given(st.sampled_from([b"\x05", b"\x05\x01\x00", b"\x05\x02\x00\x01\x05\x01\x00", b"\x05\x02\x00\x02\x05"]),
           st.binary(max_size=600), cuts)
    def inner(prefix, tail, points):
        data = prefix + tail
        check_case("socks5_prefixed_bytes", data, split(data, points))

    run_counted("socks5_prefixed_bytes", inner, FUZZ_CASES, CASES_RUN)


def test_fuzz_structured_exchanges():
    @fuzz_settings(FUZZ_CASES["structured_exchanges"])
    @given(exchanges(), cuts)
    def inner(data, points):
        check_case("structured_exchanges", data, split(data, points))

    run_counted("structured_exchanges", inner, FUZZ_CASES, CASES_RUN)


def test_fuzz_mutated_exchanges():
    mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.integers(0, 600),
                         st.integers(0, 255))

    @fuzz_settings(FUZZ_CASES["mutated_exchanges"])
    @given(exchanges(), st.lists(mutation, min_size=1, max_size=3), cuts)
    def inner(data, mutations, points):
        buffer = bytearray(data)
        for kind, position, value in mutations:
            at = position % (len(buffer) + 1)
            if kind == "insert":
                buffer[at:at] = bytes([value])
            elif kind == "truncate":
                del buffer[at:]
            elif at < len(buffer):
                if kind == "delete":
                    del buffer[at]
                elif kind == "flip":
                    buffer[at] ^= value or 1
                else:
                    buffer[at] = value
        data = bytes(buffer)
        check_case("mutated_exchanges", data, split(data, points))

    run_counted("mutated_exchanges", inner, FUZZ_CASES, CASES_RUN)

