"""Mode ``http-connect`` (issue 13 item 1): the CONNECT request parser, its replies, and what reaches the allowlist.

* every reply and refusal, as exact bytes; the requests curl 7.88.1, urllib3 and http.client really send
  (captured from the tools on 127.0.0.1);
* every valid (and refused) request split at every byte boundary and fed byte by byte gives the same outcome;
* the bypass spellings of tests/test_bypass.py, requested as CONNECT targets: refused by the parser or by the
  allowlist, never allowed;
* hypothesis fuzz, derandomized: ``FUZZ_TOTAL`` (10,500) generated cases, ``FUZZ_CASES`` per kind.  Each one
  ends in a Refusal (one-line reason, fixed outcome label, one of the fixed replies) or a Request, and every
  Request goes through the real allowlist matcher with a DNS stand-in that never touches the network: it is
  refused, or allowed to a target that an entry really admits.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import GlibcLikeDNS
from tests.test_bypass import BARE_NUMBERS, DIFFERENT_NAMES, INVALID_LOOKALIKES, NON_CANONICAL_IPV4
from tests.fuzzing import fuzz_settings, run_counted
from vsockproxy.allowlist import NotAllowed
from vsockproxy.config import parse_document
from vsockproxy.handshake import (
    CONNECTED, MAX_REQUEST_BYTES, NOT_ALLOWED, REFUSED, TIMED_OUT, TOO_LARGE, TOO_SLOW, UNREACHABLE, Refusal, Request,
)
from vsockproxy.hostnames import HostError, canonical_host, parse_ip
from vsockproxy.http_connect import MALFORMED, METHOD, VERSION, HttpConnectParser
from vsockproxy.resolver import ResolveError, Resolver

KMS = "kms.us-east-1.amazonaws.com"
KMS_IP = "10.1.2.3"
ATTACKER_IP = "203.0.113.66"
CLIENT_HELLO = bytes.fromhex("160301020001000200") + bytes(range(256))  # a TLS record's start, then anything

# Captured from the real clients with a listener on 127.0.0.1.
CURL_7_88_1 = (b"CONNECT kms.us-east-1.amazonaws.com:443 HTTP/1.1\r\n"
               b"Host: kms.us-east-1.amazonaws.com:443\r\n"
               b"User-Agent: curl/7.88.1\r\n"
               b"Proxy-Connection: Keep-Alive\r\n"
               b"\r\n")
CURL_7_88_1_IPV6 = (b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n"
                    b"Host: [2001:db8::1]:8443\r\n"
                    b"User-Agent: curl/7.88.1\r\n"
                    b"Proxy-Connection: Keep-Alive\r\n"
                    b"\r\n")
# urllib3 2.7 (botocore's HTTPS_PROXY path) tunnels through http.client: up to Python 3.11 that is HTTP/1.0 and
# no header at all; from 3.12 on, HTTP/1.1 with a Host header.
URLLIB3_PY311 = b"CONNECT kms.us-east-1.amazonaws.com:443 HTTP/1.0\r\n\r\n"
URLLIB3_PY312 = b"CONNECT kms.us-east-1.amazonaws.com:443 HTTP/1.1\r\nHost: kms.us-east-1.amazonaws.com:443\r\n\r\n"

EXPECTED_REPLIES = {
    CONNECTED: b"HTTP/1.1 200 Connection established\r\n\r\n",
    NOT_ALLOWED: b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 37\r\nConnection: close\r\n"
                 b"\r\nnot allowed by the proxy's allowlist\n",
    UNREACHABLE: b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 32\r\nConnection: close\r\n"
                 b"\r\nthe target could not be reached\n",
    REFUSED: b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 34\r\nConnection: close\r\n"
             b"\r\nthe target refused the connection\n",
    TIMED_OUT: b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain\r\nContent-Length: 34\r\n"
               b"Connection: close\r\n\r\nthe target did not answer in time\n",
    TOO_LARGE: b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 38\r\n"
               b"Connection: close\r\n\r\nthe request is larger than 8192 bytes\n",
    TOO_SLOW: b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 35\r\nConnection: close\r\n"
              b"\r\nthe request did not arrive in time\n",
    MALFORMED: b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 41\r\nConnection: close\r\n"
               b"\r\nnot a CONNECT host:port HTTP/1.1 request\n",
    METHOD: b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Type: text/plain\r\nContent-Length: 37\r\n"
            b"Connection: close\r\n\r\nthis proxy only tunnels: use CONNECT\n",
    VERSION: b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\nContent-Length: 41\r\n"
             b"Connection: close\r\n\r\nonly HTTP/1.0 and HTTP/1.1 are supported\n",
}
OTHER_FAILURE = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 42\r\nConnection: close\r\n"
                 b"\r\nthe proxy could not connect to the target\n")
REFUSAL_OUTCOMES = {MALFORMED, METHOD, VERSION, TOO_LARGE}


# --------------------------------------------------------------------------- helpers

def parse(*chunks: bytes):
    """Feed ``chunks`` to a fresh parser until it decides; (outcome or None, the bytes fed)."""
    parser = HttpConnectParser()
    fed = b""
    for chunk in chunks:
        fed += chunk
        sent, outcome = parser.feed(chunk)
        assert sent == b"", "http-connect sends nothing before the outcome"
        if outcome is not None:
            return outcome, fed
    return None, fed


def request_of(data: bytes) -> Request:
    outcome, _ = parse(data)
    assert isinstance(outcome, Request), outcome
    return outcome


def refusal_of(data: bytes) -> Refusal:
    outcome, _ = parse(data)
    assert isinstance(outcome, Refusal), outcome
    return outcome


def assert_well_formed_refusal(refusal: Refusal) -> None:
    assert isinstance(refusal.reason, str) and refusal.reason
    assert "\n" not in refusal.reason and "\r" not in refusal.reason, refusal.reason
    assert refusal.outcome in REFUSAL_OUTCOMES, refusal.outcome
    assert refusal.reply == EXPECTED_REPLIES[refusal.outcome]


def assert_same_when_split(data: bytes) -> None:
    """Split in two at every byte boundary, and byte by byte: the outcome of ``data`` fed whole, each time.

    A Request decided before all of ``data`` was fed carries the early data fed so far; the rest follows it.
    """
    whole, _ = parse(data)
    splits = [(data[:i], data[i:]) for i in range(len(data) + 1)] + [[data[i:i + 1] for i in range(len(data))]]
    for chunks in splits:
        outcome, fed = parse(*chunks)
        if isinstance(whole, Request):
            assert isinstance(outcome, Request), (chunks, outcome)
            assert (outcome.host, outcome.port) == (whole.host, whole.port)
            assert outcome.early_data + data[len(fed):] == whole.early_data
        else:
            assert outcome == whole, (chunks, outcome, whole)


def connect(target: bytes, version: bytes = b"HTTP/1.1", headers: bytes = b"") -> bytes:
    return b"CONNECT " + target + b" " + version + b"\r\n" + headers + b"\r\n"


# --------------------------------------------------------------------------- replies

@pytest.mark.parametrize("outcome", sorted(EXPECTED_REPLIES))
def test_reply_is_exactly(outcome):
    assert HttpConnectParser().reply(outcome) == EXPECTED_REPLIES[outcome]


def test_an_outcome_this_mode_does_not_know_still_gets_a_502():
    assert HttpConnectParser().reply("some-future-outcome") == OTHER_FAILURE


class _Wire:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str):
        return io.BytesIO(self.data)


@pytest.mark.parametrize("outcome", sorted(EXPECTED_REPLIES))
def test_every_reply_is_a_response_an_http_client_reads(outcome):
    """Python's own HTTP client reads each reply: status, headers, and a body of exactly Content-Length."""
    response = http.client.HTTPResponse(_Wire(HttpConnectParser().reply(outcome) + b"TRAILING"), method="CONNECT")
    response.begin()
    if outcome == CONNECTED:
        assert (response.status, response.reason) == (200, "Connection established")
        assert response.getheaders() == []
        return
    assert response.getheader("Connection") == "close" and response.getheader("Content-Type") == "text/plain"
    body = response.read()
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and b"TRAILING" not in body
    assert int(response.getheader("Content-Length")) == len(body)
    assert (response.getheader("Allow") == "CONNECT") == (outcome == METHOD)


# --------------------------------------------------------------------------- what real clients send

@pytest.mark.parametrize("data, host, port", [
    (CURL_7_88_1, KMS, 443),
    (CURL_7_88_1_IPV6, "2001:db8::1", 8443),
    (URLLIB3_PY311, KMS, 443),
    (URLLIB3_PY312, KMS, 443),
], ids=["curl-7.88.1", "curl-7.88.1-ipv6", "urllib3-python3.11", "urllib3-python3.12"])
def test_real_clients_requests(data, host, port):
    assert request_of(data) == Request(host, port, b"")
    assert request_of(data + CLIENT_HELLO) == Request(host, port, CLIENT_HELLO)


VALID = {
    "curl": CURL_7_88_1,
    "curl-with-client-hello": CURL_7_88_1 + CLIENT_HELLO,
    "curl-ipv6": CURL_7_88_1_IPV6,
    "urllib3-py311-with-client-hello": URLLIB3_PY311 + CLIENT_HELLO,
    "urllib3-py312": URLLIB3_PY312,
    "bare-lf": b"CONNECT a.example:443 HTTP/1.1\nHost: a.example:443\n\n",
    "mixed-endings": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\nX: y\r\n\nearly",
    "lf-then-crlf": b"CONNECT a.example:443 HTTP/1.1\n\r\n",
    "proxy-authorization": connect(b"a.example:443", headers=b"Proxy-Authorization: Basic dTpw\r\n"),
    "empty-value-and-no-space": connect(b"a.example:443", headers=b"X-Empty:\r\nHost:a.example\r\n"),
    "obs-text-value": connect(b"a.example:443", headers=b"X-Name: caf\xc3\xa9\t!\r\n"),
    "ipv4": connect(b"10.1.2.3:1"),
    "mapped-ipv6": connect(b"[::FFFF:10.1.2.3]:65535"),
    "leading-zeros-in-port": connect(b"a.example:00443"),
    "upper-case-and-trailing-dot": connect(b"KMS.US-EAST-1.AMAZONAWS.COM.:443"),
}


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
def test_valid_request_gives_the_same_request_however_it_is_split(data):
    assert isinstance(parse(data)[0], Request)
    assert_same_when_split(data)


@pytest.mark.parametrize("target, host, port", [
    (b"a.example:443", "a.example", 443),
    (b"KMS.US-EAST-1.AMAZONAWS.COM.:443", "KMS.US-EAST-1.AMAZONAWS.COM.", 443),  # as spelled: the allowlist judges
    (b"10.1.2.3:1", "10.1.2.3", 1),
    (b"0x7f000001:443", "0x7f000001", 443),  # a loose IPv4 spelling is the allowlist's to refuse
    (b"1234:443", "1234", 443),
    (b"[::FFFF:10.1.2.3]:65535", "::FFFF:10.1.2.3", 65535),
    (b"[2001:DB8:0::1]:8443", "2001:DB8:0::1", 8443),
    (b"a.example:00443", "a.example", 443),  # RFC 3986 port = *DIGIT, decimal; at most 5 digits here
    (b"under_score.example:443", "under_score.example", 443),
], ids=["name", "case-and-dot", "ipv4", "loose-ipv4", "bare-number", "mapped-ipv6", "ipv6-as-spelled",
        "leading-zeros", "underscore"])
def test_target_host_is_kept_as_requested(target, host, port):
    assert request_of(connect(target) + b"x") == Request(host, port, b"x")


# --------------------------------------------------------------------------- refusals

REFUSED_REQUESTS = {
    # method: any well-formed token but CONNECT (case-sensitive, RFC 9110 9.1)
    "get-absolute-form": (b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", METHOD),
    "get-origin-form": (b"GET / HTTP/1.1\r\n\r\n", METHOD),
    "post": (b"POST a.example:443 HTTP/1.1\r\n\r\n", METHOD),
    "lower-case-connect": (b"connect a.example:443 HTTP/1.1\r\n\r\n", METHOD),
    "options-asterisk": (b"OPTIONS * HTTP/1.1\r\n\r\n", METHOD),
    # version: well-formed, but not 1.0 or 1.1
    "http-2.0": (connect(b"a.example:443", b"HTTP/2.0"), VERSION),
    "http-1.2": (connect(b"a.example:443", b"HTTP/1.2"), VERSION),
    "http-0.9": (connect(b"a.example:443", b"HTTP/0.9"), VERSION),
    # request line
    "lower-case-version": (connect(b"a.example:443", b"http/1.1"), MALFORMED),
    "version-without-minor": (connect(b"a.example:443", b"HTTP/2"), MALFORMED),
    "version-two-digits": (connect(b"a.example:443", b"HTTP/1.10"), MALFORMED),
    "no-version": (b"CONNECT a.example:443\r\n\r\n", MALFORMED),
    "four-parts": (b"CONNECT a.example:443 HTTP/1.1 x\r\n\r\n", MALFORMED),
    "double-space": (b"CONNECT  a.example:443 HTTP/1.1\r\n\r\n", MALFORMED),
    "leading-space": (b" CONNECT a.example:443 HTTP/1.1\r\n\r\n", MALFORMED),
    "trailing-space": (b"CONNECT a.example:443 HTTP/1.1 \r\n\r\n", MALFORMED),
    "tab-separator": (b"CONNECT\ta.example:443 HTTP/1.1\r\n\r\n", MALFORMED),
    "empty-request-line": (b"\r\n\r\n", MALFORMED),
    "leading-empty-line": (b"\r\nCONNECT a.example:443 HTTP/1.1\r\n\r\n", MALFORMED),
    "bare-cr-endings": (b"CONNECT a.example:443 HTTP/1.1\rHost: a\r\r", MALFORMED),
    "nul-in-method": (b"CONN\x00ECT a.example:443 HTTP/1.1\r\n\r\n", MALFORMED),
    "method-not-a-token": (b"CONNECT(x) a.example:443 HTTP/1.1\r\n\r\n", MALFORMED),
    "tls-client-hello": (CLIENT_HELLO, MALFORMED),
    "socks5-greeting": (b"\x05\x01\x00", MALFORMED),
    # target: authority form only
    "no-port": (connect(b"a.example"), MALFORMED),
    "empty-port": (connect(b"a.example:"), MALFORMED),
    "port-0": (connect(b"a.example:0"), MALFORMED),
    "port-65536": (connect(b"a.example:65536"), MALFORMED),
    "port-99999": (connect(b"a.example:99999"), MALFORMED),
    "port-six-digits": (connect(b"a.example:000443"), MALFORMED),
    "port-plus-sign": (connect(b"a.example:+443"), MALFORMED),
    "port-minus-sign": (connect(b"a.example:-443"), MALFORMED),
    "port-hex": (connect(b"a.example:0x1bb"), MALFORMED),
    "port-trailing-dot": (connect(b"a.example:443."), MALFORMED),
    "port-arabic-indic-digits": (connect("a.example:\u0664\u0664\u0663".encode()), MALFORMED),
    "two-ports": (connect(b"a.example:443:443"), MALFORMED),
    "empty-host": (connect(b":443"), MALFORMED),
    "userinfo": (connect(b"user@a.example:443"), MALFORMED),
    "userinfo-with-password": (connect(b"user:pw@a.example:443"), MALFORMED),
    "path": (connect(b"a.example:443/"), MALFORMED),
    "scheme": (connect(b"https://a.example:443"), MALFORMED),
    "absolute-uri": (connect(b"http://a.example:443/x"), MALFORMED),
    "percent-encoded-host": (connect(b"a%2eexample:443"), MALFORMED),
    "query": (connect(b"a.example?x:443"), MALFORMED),
    "fragment": (connect(b"a.example#x:443"), MALFORMED),
    "backslash": (connect(b"a.example\\evil:443"), MALFORMED),
    "unbracketed-ipv6": (connect(b"2001:db8::1:443"), MALFORMED),
    "bracketed-name": (connect(b"[a.example]:443"), MALFORMED),
    "bracketed-ipv4": (connect(b"[10.1.2.3]:443"), MALFORMED),
    "brackets-without-port": (connect(b"[::1]"), MALFORMED),
    "brackets-without-colon": (connect(b"[::1]443"), MALFORMED),
    "ipv6-zone-index": (connect(b"[fe80::1%eth0]:443"), MALFORMED),
    "ipv6-zone-index-rfc6874": (connect(b"[fe80::1%25eth0]:443"), MALFORMED),
    "ipvfuture": (connect(b"[v1.fe]:443"), MALFORMED),
    "bracket-inside-name": (connect(b"a[b]:443"), MALFORMED),
    "utf8-host": (connect("kms.us-east-1.amazonaws.c\u03bfm:443".encode()), MALFORMED),
    "latin1-host": (connect(b"caf\xe9.example:443"), MALFORMED),
    "nul-in-host": (connect(b"a.example\x00.evil:443"), MALFORMED),
    "del-in-host": (connect(b"a.example\x7f:443"), MALFORMED),
    "cr-in-target": (connect(b"a.example\r:443"), MALFORMED),
    # header lines
    "obs-fold-space": (connect(b"a.example:443", headers=b"X: a\r\n b\r\n"), MALFORMED),
    "obs-fold-tab": (connect(b"a.example:443", headers=b"X: a\r\n\tb\r\n"), MALFORMED),
    "space-before-colon": (connect(b"a.example:443", headers=b"Host : a.example\r\n"), MALFORMED),
    "no-colon": (connect(b"a.example:443", headers=b"Host\r\n"), MALFORMED),
    "empty-name": (connect(b"a.example:443", headers=b": x\r\n"), MALFORMED),
    "name-with-space": (connect(b"a.example:443", headers=b"Ho st: x\r\n"), MALFORMED),
    "bare-cr-in-value": (connect(b"a.example:443", headers=b"X: a\rInjected: b\r\n"), MALFORMED),
    "nul-in-value": (connect(b"a.example:443", headers=b"X: a\x00b\r\n"), MALFORMED),
    "control-in-value": (connect(b"a.example:443", headers=b"X: \x01\r\n"), MALFORMED),
    "utf8-name": (connect(b"a.example:443", headers="Ho\u0455t: x\r\n".encode()), MALFORMED),
    # size
    "request-line-over-the-limit": (b"CONNECT " + b"a" * MAX_REQUEST_BYTES + b":443 HTTP/1.1\r\n\r\n", TOO_LARGE),
    "headers-over-the-limit": (connect(b"a.example:443", headers=b"X: " + b"y" * MAX_REQUEST_BYTES + b"\r\n"),
                               TOO_LARGE),
}


@pytest.mark.parametrize("data, outcome", REFUSED_REQUESTS.values(), ids=REFUSED_REQUESTS.keys())
def test_refusal(data, outcome):
    refusal = refusal_of(data)
    assert refusal.outcome == outcome, refusal
    assert refusal.reply == EXPECTED_REPLIES[outcome]
    assert_well_formed_refusal(refusal)


@pytest.mark.parametrize("data", [data for data, outcome in REFUSED_REQUESTS.values() if outcome != TOO_LARGE],
                         ids=[name for name, (data, outcome) in REFUSED_REQUESTS.items() if outcome != TOO_LARGE])
def test_refusal_is_the_same_however_the_request_is_split(data):
    assert_same_when_split(data)


@pytest.mark.parametrize("data, reason", [
    (b"GET / HTTP/1.1\r\n\r\n", "method 'GET' is not CONNECT"),
    (connect(b"a.example:443", b"HTTP/2.0"), "'HTTP/2.0' is not HTTP/1.0 or HTTP/1.1"),
    (connect(b"user@a.example:443"), "CONNECT target 'user@a.example:443' is not host:port or [IPv6]:port"),
    (b"CONNECT a.example:443\r\n\r\n", "request line 'CONNECT a.example:443' is not METHOD TARGET HTTP/x.y"),
    (CLIENT_HELLO, "the request line is not printable ASCII"),
    (connect(b"a.example:443", headers=b"X: a\r\n b\r\n"), "folded header line b' b'"),
    (connect(b"a.example:443", headers=b"Host : a\r\n"), "header line b'Host : a' is not 'name: value'"),
    (connect(b"a.example:443", headers=b"X: " + b"y" * MAX_REQUEST_BYTES + b"\r\n"),
     f"no end of the request headers in the first {MAX_REQUEST_BYTES} bytes"),
])
def test_refusal_reason_names_the_problem(data, reason):
    assert refusal_of(data).reason == reason


@pytest.mark.parametrize("data", [
    connect(b"evil.example:443\r\nInjected: yes"),
    connect(b"a.example:443", headers=b"X" * 5000 + b"\r\nHTTP/1.1 200 OK\r\n"),
    connect(b"a.example:443", headers=b"Bad Name: x\rHTTP/1.1 200 OK\r\n"),
    b"GET" + b"x" * 5000 + b"\r / HTTP/1.1\r\n\r\n",
    b"G\xc3\x89T / HTTP/1.1\r\n\r\n",
], ids=["crlf-in-target", "long-header", "cr-in-header", "long-method", "utf8-method"])
def test_reason_is_one_bounded_line_and_the_reply_quotes_nothing(data):
    """The log may quote the request (escaped, cut short); the enclave is only ever told a fixed text."""
    refusal = refusal_of(data)
    assert len(refusal.reason) < 120, refusal.reason
    assert_well_formed_refusal(refusal)


def test_a_client_speaking_another_protocol_is_refused_at_its_first_byte():
    """TLS or SOCKS5 sent to an http-connect port: 400 at once, not after the handshake timeout."""
    assert parse(b"\x16")[0].outcome == MALFORMED
    assert parse(b"\x05")[0].outcome == MALFORMED
    assert parse(b"CONNECT a.example:443 HTTP/1.1\r")[0] is None  # a CR may still be followed by its LF
    assert parse(b"CONNECT a.example:443 HTTP/1.1\r", b"H")[0].outcome == MALFORMED


# --------------------------------------------------------------------------- size

def padded(size: int) -> bytes:
    """A valid request whose header section (empty line included) is exactly ``size`` bytes."""
    head = b"CONNECT a.example:443 HTTP/1.1\r\nX: "
    return head + b"y" * (size - len(head) - 4) + b"\r\n\r\n"


def test_header_section_of_exactly_the_limit_is_accepted():
    data = padded(MAX_REQUEST_BYTES)
    assert len(data) == MAX_REQUEST_BYTES
    assert request_of(data + b"early") == Request("a.example", 443, b"early")
    assert parse(*[data[i:i + 1] for i in range(len(data))])[0] == Request("a.example", 443, b"")


def test_header_section_one_byte_over_the_limit_is_too_large():
    data = padded(MAX_REQUEST_BYTES + 1)
    for chunks in ([data], [data[:-1], data[-1:]], [data[:MAX_REQUEST_BYTES - 1], data[MAX_REQUEST_BYTES - 1:]]):
        outcome, fed = parse(*chunks)
        assert outcome == refusal_of(data) and outcome.outcome == TOO_LARGE, chunks
        assert outcome.reply == EXPECTED_REPLIES[TOO_LARGE]
    outcome, fed = parse(*[data[i:i + 1] for i in range(len(data))])
    assert outcome.outcome == TOO_LARGE and len(fed) == MAX_REQUEST_BYTES, "refused as soon as it cannot fit"


def test_parser_never_holds_more_than_the_limit():
    parser = HttpConnectParser()
    sent, outcome = parser.feed(b"CONNECT a.example:443 HTTP/1.1\r\nX: " + b"y" * (1 << 20))
    assert outcome.outcome == TOO_LARGE
    assert len(parser._buffer) <= MAX_REQUEST_BYTES


def test_early_data_past_the_limit_is_kept_whole():
    """The limit is on the header section; a large first read after it is the target's, unparsed."""
    early = bytes(range(256)) * 100
    assert request_of(CURL_7_88_1 + early) == Request(KMS, 443, early)
    data = padded(MAX_REQUEST_BYTES)
    assert request_of(data + early) == Request("a.example", 443, early)
    assert parse(data[:100], data[100:] + early)[0] == Request("a.example", 443, early)


# --------------------------------------------------------------------------- bypass spellings as CONNECT targets

def allowlist_of(*entries):
    return parse_document({"allowlist": [{"address": a, "port": p} for a, p in entries]}, "bypass.yaml").allowlist


def connect_to(host: str, port: int = 443) -> bytes:
    """The CONNECT request a client would write for ``host`` (IPv6-looking hosts in brackets), as UTF-8."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return connect(authority.encode("utf-8", "surrogatepass"), headers=b"Host: " + authority.encode("utf-8") + b"\r\n")


def requested(host: str):
    """The parser's outcome for a CONNECT to ``host``: a Refusal (malformed), or the Request naming it unchanged."""
    outcome, _ = parse(connect_to(host))
    if isinstance(outcome, Refusal):
        assert outcome.outcome == MALFORMED, outcome
        assert_well_formed_refusal(outcome)
        return None
    assert outcome.host == host and outcome.port == 443
    return outcome


def assert_not_allowed(allowlist, request: Request, dns: GlibcLikeDNS) -> None:
    resolver = Resolver(socket.AF_UNSPEC, 30.0, getaddrinfo=dns)
    with pytest.raises(NotAllowed) as info:
        target = allowlist.authorize(request.host, request.port, resolver)
        pytest.fail(f"{request.host!r} was ALLOWED as {target}")
    assert "\n" not in str(info.value)


def _reg_name(host: str) -> bool:
    return bool(host) and all(c.isascii() and (c.isalnum() or c in "-._~!$&'()*+,;=") for c in host)


@pytest.mark.parametrize("remote", NON_CANONICAL_IPV4)
def test_bypass_non_canonical_ipv4(remote):
    request = requested(remote)
    assert request is not None or not _reg_name(remote)
    if request is not None:
        dns = GlibcLikeDNS()
        assert_not_allowed(allowlist_of(("127.0.0.1", 443)), request, dns)
        assert dns.asked == []


@pytest.mark.parametrize("remote", ["0.0.0.0", "::", "0:0:0:0:0:0:0:0"])
def test_bypass_unspecified_address(remote):
    assert_not_allowed(allowlist_of(("127.0.0.1", 443), ("::1", 443)), requested(remote), GlibcLikeDNS())


@pytest.mark.parametrize("remote", ["::ffff:127.0.0.1", "::FFFF:7F00:1", "0:0:0:0:0:ffff:7f00:1", "::127.0.0.1",
                                    "64:ff9b::127.0.0.1"])
def test_bypass_ipv4_mapped_ipv6(remote):
    assert_not_allowed(allowlist_of(("127.0.0.1", 443)), requested(remote), GlibcLikeDNS())


@pytest.mark.parametrize("remote", BARE_NUMBERS)
def test_bypass_bare_number(remote):
    request = requested(remote)
    assert request is not None, "a bare number is a reg-name: the allowlist refuses it"
    dns = GlibcLikeDNS({"1234.corp.example": ["10.9.9.9"], remote: ["10.9.9.9"]})
    assert_not_allowed(allowlist_of(("1234.corp.example", 443), ("10.9.9.9", 443)), request, dns)
    assert dns.asked == []


@pytest.mark.parametrize("remote", INVALID_LOOKALIKES.values(), ids=INVALID_LOOKALIKES.keys())
def test_bypass_lookalike_spelling(remote):
    request = requested(remote)
    assert request is not None or not _reg_name(remote) or ":" in remote
    if request is not None:
        dns = GlibcLikeDNS({KMS: [KMS_IP], remote: [KMS_IP]})
        assert_not_allowed(allowlist_of((KMS, 443)), request, dns)
        assert dns.asked == []


@pytest.mark.parametrize("remote", DIFFERENT_NAMES.values(), ids=DIFFERENT_NAMES.keys())
def test_bypass_different_name(remote):
    request = requested(remote)
    assert request is not None
    dns = GlibcLikeDNS({KMS: [KMS_IP], remote.lower(): [ATTACKER_IP]})
    assert_not_allowed(allowlist_of((KMS, 443)), request, dns)
    assert set(dns.asked) <= {remote.lower(), KMS}


@pytest.mark.parametrize("remote", ["::1%lo", "fe80::1%bogus0", "fe80::1%eth0", "fe80::1%1"])
def test_bypass_ipv6_zone_index_is_malformed(remote):
    assert requested(remote) is None


# --------------------------------------------------------------------------- fuzz

FUZZ_CASES = {
    "random_bytes": 2500,      # arbitrary bytes, sometimes after "CONNECT ", fed in random pieces
    "token_soup": 3500,        # request lines and headers built from valid and broken parts
    "mutated": 3000,           # valid requests with bytes inserted, deleted and replaced
    "valid": 1500,             # valid requests: must give exactly the requested host and port
}
FUZZ_TOTAL = sum(FUZZ_CASES.values())
CASES_RUN = {name: 0 for name in FUZZ_CASES}

FUZZ_ALLOWLIST = [
    {"address": KMS, "port": 443},
    {"address": "*.amazonaws.com", "port": [443, 8443]},
    {"address": "10.0.0.0/8", "port": 443},
    {"address": "2001:db8::/32", "port": 8443},
    {"address": "127.0.0.1", "port": 8080},
]
FUZZ_RULES = parse_document({"allowlist": FUZZ_ALLOWLIST}, "fuzz.yaml").allowlist
FUZZ_DNS = {
    KMS: [KMS_IP],
    "sts.amazonaws.com": ["10.7.7.7"],
    "alias.example": [KMS_IP],                     # admitted through KMS's (and 10/8's) address, pinned
    "mixed.example": [ATTACKER_IP, KMS_IP],        # pinned to the admitted half
    "evil.example": [ATTACKER_IP],
    "v6.example": ["2001:db8::7"],
    "loopback.example": ["127.0.0.1"],
}
# Hosts the allowlist decides on in every way: by name, by wildcard, by network, pinned through addresses, refused.
RELEVANT_HOSTS = [KMS, KMS.upper() + ".", "sts.amazonaws.com", "s3.eu-west-1.amazonaws.com", "alias.example",
                  "mixed.example", "evil.example", "v6.example", "loopback.example", "10.1.2.3", "2001:db8::5",
                  "127.0.0.1", "::ffff:10.1.2.3"]
HOSTS = [*RELEVANT_HOSTS, "amazonaws.com", "amazonaws.com.evil.example", "10.255.0.1", "11.0.0.1", "2001:DB8::5",
         "::1", "0.0.0.0", "localhost", "0x0a010203", "10.1.2.03", "1234",
         *NON_CANONICAL_IPV4, *BARE_NUMBERS, *INVALID_LOOKALIKES.values(), *DIFFERENT_NAMES.values()]
ALLOWED_PORTS = [443, 8443, 8080]
PORTS = [*ALLOWED_PORTS, 443, 80, 1, 65535]
PORT_TEXTS = ["443", "8443", "8080", "0443", "00443", "000443", "0", "65536", "99999", "+443", "-1", "", " 443",
              "0x1bb", "443.", "\u0664\u0664\u0663", "443:443", "443/"]
METHODS = [b"CONNECT"] * 20 + [b"connect", b"GET", b"POST", b"CONNECT\x00", b"CON NECT", b"", b"\xc3\x89"]
VERSIONS = [b"HTTP/1.1"] * 14 + [b"HTTP/1.0"] * 6 + [b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1", b"HTTP/1.1 ",
                                                    b"HTTP/1.10", b""]
GOOD_HEADER_LINES = [b"Host: kms.us-east-1.amazonaws.com:443", b"User-Agent: curl/7.88.1",
                     b"Proxy-Connection: Keep-Alive", b"Proxy-Authorization: Basic dTpw", b"X-Empty:",
                     b"Host:evil.example:443", b"X: caf\xc3\xa9"]
BAD_HEADER_LINES = [b" folded", b"\tfolded", b"Host : a", b"NoColon", b": empty-name", b"X: a\rb", b"X: a\x00b"]
LONG_HEADER_LINE = b"X-Long: " + b"z" * 3000
ENDINGS = [b"\r\n"] * 12 + [b"\n"] * 3 + [b"\r", b"\r\r\n", b""]


def test_fuzz_budget_is_at_least_10000_cases():
    assert FUZZ_TOTAL >= 10_000, FUZZ_CASES


def authority(host: str, port) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed_by_name(host: str, port: int) -> bool:
    """The oracle, written out: which canonical hosts FUZZ_ALLOWLIST names, without DNS."""
    address = parse_ip(host)
    if address is None:
        return (host == KMS and port == 443) or (host.endswith(".amazonaws.com") and port in (443, 8443))
    return ((address in ipaddress.ip_network("10.0.0.0/8") and port == 443)
            or (address in ipaddress.ip_network("2001:db8::/32") and port == 8443)
            or (str(address) == "127.0.0.1" and port == 8080))


def address_admitted(address, port: int) -> bool:
    """Whether FUZZ_ALLOWLIST admits connecting to ``address`` (a name entry through the address it resolves to)."""
    return allowed_by_name(str(address), port) or (str(address) == KMS_IP and port == 443)


def check_case(data: bytes, cuts: list[int]) -> None:
    """One fuzz case: ``data`` fed in pieces cut at ``cuts``; the outcome checked, then judged by the allowlist."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    outcome, fed = parse(*chunks)
    whole, _ = parse(data)
    if outcome is None:
        assert whole is None
        assert len(data) < MAX_REQUEST_BYTES and b"\n\n" not in data.replace(b"\r\n", b"\n")
        return
    if isinstance(outcome, Refusal):
        assert outcome == whole
        assert_well_formed_refusal(outcome)
        return
    assert isinstance(whole, Request) and (whole.host, whole.port) == (outcome.host, outcome.port)
    assert outcome.early_data + data[len(fed):] == whole.early_data
    host, port = outcome.host, outcome.port
    assert isinstance(port, int) and 1 <= port <= 65535
    assert host and host.isascii() and host.isprintable() and not set(host) & set(" %/@[]\\?#")
    assert authority(host, "").encode("ascii") in data.split(b"\n", 1)[0], "the host is passed on as requested"
    judge(host, port)


def judge(host: str, port: int) -> None:
    """The real allowlist decides; the Target it returns must be one an entry admits, and so must its addresses."""
    allowlist = FUZZ_RULES
    resolver = Resolver(socket.AF_UNSPEC, 30.0, getaddrinfo=GlibcLikeDNS(FUZZ_DNS))
    try:
        canonical = canonical_host(host)
    except HostError:
        canonical = None
    try:
        target = allowlist.authorize(host, port, resolver)
    except NotAllowed as exc:
        assert "\n" not in str(exc)
        assert canonical is None or not allowed_by_name(canonical, port), f"{host!r}:{port} wrongly refused"
        return
    assert canonical is not None and target.host == canonical and target.port == port
    assert port in target.allowed_by.ports
    try:
        addresses = [endpoint.ip for endpoint in target.endpoints(resolver)]
    except ResolveError:
        addresses = []  # nothing to connect to: no connection
    if allowed_by_name(canonical, port):
        assert target.pinned_to is None
    else:
        assert target.pinned_to is not None, f"{host!r}:{port} allowed by name, but the oracle names no such entry"
        assert addresses and all(address_admitted(a, port) for a in addresses), (host, port, addresses)


cuts_st = st.lists(st.integers(min_value=0, max_value=20_000), max_size=6)


@fuzz_settings(FUZZ_CASES["random_bytes"])
@given(prefix=st.sampled_from([b"", b"CONNECT ", b"CONNECT a.example:443 HTTP/1.1\r\n"]),
       body=st.binary(max_size=300), suffix=st.sampled_from([b"", b"\r\n\r\n"]), cuts=cuts_st)
def _random_bytes(prefix, body, suffix, cuts):
    CASES_RUN["random_bytes"] += 1
    check_case(prefix + body + suffix, cuts)


@st.composite
def token_soup(draw) -> bytes:
    host = draw(st.one_of(st.sampled_from(RELEVANT_HOSTS), st.sampled_from(HOSTS),
                          st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20)))
    port = draw(st.one_of(st.sampled_from(PORTS), st.sampled_from(PORTS), st.sampled_from(PORT_TEXTS),
                          st.integers(0, 70000)))
    target = draw(st.sampled_from(["{a}"] * 6 + ["{h}:{p}", "[{h}]:{p}", "{h}", "http://{a}/", "u@{a}", "{a}/x"]))
    target = target.format(a=authority(host, port), h=host, p=port).encode("utf-8", "surrogatepass")
    separators = draw(st.lists(st.sampled_from([b" "] * 20 + [b"  ", b"\t", b""]), min_size=2, max_size=2))
    line = draw(st.sampled_from(METHODS)) + separators[0] + target + separators[1] + draw(st.sampled_from(VERSIONS))
    header = st.one_of(st.sampled_from(GOOD_HEADER_LINES), st.sampled_from(GOOD_HEADER_LINES),
                       st.sampled_from(BAD_HEADER_LINES + [LONG_HEADER_LINE]), st.binary(max_size=30))
    lines = [line] + draw(st.lists(header, max_size=4))
    endings = draw(st.lists(st.sampled_from(ENDINGS), min_size=len(lines) + 1, max_size=len(lines) + 1))
    early = draw(st.sampled_from([b"", CLIENT_HELLO, b"\r\n\r\n"]))
    return b"".join(text + ending for text, ending in zip(lines + [b""], endings)) + early


@fuzz_settings(FUZZ_CASES["token_soup"])
@given(data=token_soup(), cuts=cuts_st)
def _token_soup(data, cuts):
    CASES_RUN["token_soup"] += 1
    check_case(data, cuts)


@st.composite
def valid_requests(draw) -> tuple[bytes, str, int, int]:
    host = draw(st.one_of(
        st.sampled_from(RELEVANT_HOSTS),
        st.sampled_from(RELEVANT_HOSTS),
        st.sampled_from(RELEVANT_HOSTS),
        st.sampled_from(HOSTS).filter(_reg_name),
        st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?(\.[a-zA-Z0-9-]{1,12}){0,4}\.?", fullmatch=True),
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.sampled_from(["2001:db8::5", "::FFFF:10.1.2.3", "::1"]),
    ))
    port = draw(st.one_of(st.sampled_from(ALLOWED_PORTS), st.sampled_from(ALLOWED_PORTS), st.sampled_from(PORTS),
                          st.integers(1, 65535)))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    headers = draw(st.lists(st.sampled_from(GOOD_HEADER_LINES), max_size=4))
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    early = draw(st.binary(max_size=40))
    line = b"CONNECT " + authority(host, port).encode("ascii") + b" " + version
    head = b"".join(text + ending for text in [line, *headers, b""])
    return head + early, host, port, len(head)


@fuzz_settings(FUZZ_CASES["valid"])
@given(case=valid_requests(), cuts=cuts_st)
def _valid(case, cuts):
    CASES_RUN["valid"] += 1
    data, host, port, head_length = case
    assert request_of(data) == Request(host, port, data[head_length:])
    check_case(data, cuts)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.one_of(st.sampled_from(list(VALID.values()) + [CURL_7_88_1] * 4),
                                    valid_requests().map(lambda case: case[0]))))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.one_of(st.sampled_from(b" :[]@%/\r\n\t\x00\x7f\xff.0"), st.integers(0, 255)))
        if how == "insert":
            data.insert(where, byte)
        elif where < len(data):
            if how == "delete":
                del data[where]
            else:
                data[where] = byte
    return bytes(data)


@fuzz_settings(FUZZ_CASES["mutated"])
@given(data=mutated(), cuts=cuts_st)
def _mutated(data, cuts):
    CASES_RUN["mutated"] += 1
    check_case(data, cuts)


@pytest.mark.parametrize("name, run", [("random_bytes", _random_bytes), ("token_soup", _token_soup),
                                       ("mutated", _mutated), ("valid", _valid)])
def test_fuzz(name, run):
    run_counted(name, run, FUZZ_CASES, CASES_RUN)
