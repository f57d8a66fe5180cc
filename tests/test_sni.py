"""Mode ``sni`` (issue 13 item 3): the ClientHello reader, on real and hand-built ClientHellos.

Real ClientHellos come from Python's ssl module (OpenSSL) writing into a MemoryBIO, for TLS 1.2
and 1.3, with and without server_hostname; no socket is opened.  Hand-built ones cover what
OpenSSL never sends: a ClientHello split over 2 or 3 records, every length field off by one,
oversized ones, bad names.  Every valid ClientHello is also fed split at every byte boundary
and byte by byte.

The hypothesis fuzz runs ``FUZZ_TOTAL`` (11,000) derandomized cases: random bytes, random
records, mutated real ClientHellos, hand-built ones carrying random names (IDNA, Unicode, empty,
IP literals, the spellings of tests/test_bypass.py), and random splits into records and reads.
Each case checks that feed never raises, that the outcome does not depend on how the bytes were
split, that every Refusal has a one-line reason, a fixed label and its exact reply, and that
every Request goes through the real allowlist matcher to NotAllowed or to a Target a rule
really admits.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import GlibcLikeDNS
from tests.test_bypass import BARE_NUMBERS, DIFFERENT_NAMES, INVALID_LOOKALIKES, KMS, KMS_IP, NON_CANONICAL_IPV4
from tests.fuzzing import fuzz_settings, run_counted
from vsockproxy.allowlist import NotAllowed
from vsockproxy.config import parse_document
from vsockproxy.handshake import (
    CONNECTED, MAX_REQUEST_BYTES, NOT_ALLOWED, REFUSED, TIMED_OUT, TOO_LARGE, TOO_SLOW, UNREACHABLE, Refusal, Request,
)
from vsockproxy.hostnames import canonical_host
from vsockproxy.resolver import ResolveError, Resolver
from vsockproxy.sni import MALFORMED, NO_SNI, NOT_TLS, SniParser, alert

PORT = 443

ACCESS_DENIED_ALERT = b"\x15\x03\x03\x00\x02\x02\x31"
DECODE_ERROR_ALERT = b"\x15\x03\x03\x00\x02\x02\x32"
INTERNAL_ERROR_ALERT = b"\x15\x03\x03\x00\x02\x02\x50"
UNRECOGNIZED_NAME_ALERT = b"\x15\x03\x03\x00\x02\x02\x70"

#: Each refusal label and the exact bytes the enclave gets with it.
REFUSAL_REPLIES = {NOT_TLS: b"", NO_SNI: UNRECOGNIZED_NAME_ALERT, MALFORMED: DECODE_ERROR_ALERT,
                   TOO_LARGE: INTERNAL_ERROR_ALERT}

FUZZ_CASES = {
    "random_bytes": 2500,      # arbitrary bytes, half of them behind a plausible record header
    "random_records": 1500,    # well-framed handshake records around random handshake bytes
    "mutated_real": 3000,      # real ClientHellos with bytes flipped, inserted, deleted
    "random_names": 2500,      # hand-built ClientHellos carrying random server names
    "random_splits": 1500,     # real and hand-built ClientHellos (some over 8 KiB) cut into random records and reads
}
FUZZ_TOTAL = sum(FUZZ_CASES.values())


# --------------------------------------------------------------------------- building ClientHellos

@functools.lru_cache(maxsize=None)
def real_hello(server_hostname: str | None, version: str) -> bytes:
    """The first flight OpenSSL writes for a client: one record holding the ClientHello."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = server_hostname is not None
    context.maximum_version = getattr(ssl.TLSVersion, version)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def extension(kind: int, data: bytes) -> bytes:
    return u16(kind) + u16(len(data)) + data


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + u16(len(name)) + name for name in names)
    return extension(0, u16(len(entries)) + entries)


SUPPORTED_VERSIONS = extension(43, b"\x04\x03\x04\x03\x03")
EC_POINT_FORMATS = extension(11, b"\x01\x00")


def hello_body(extensions: bytes | None, version: int = 0x0303, session_id: bytes = bytes(range(32)),
               suites: bytes = b"\x13\x01\x13\x02\xc0\x2f", compression: bytes = b"\x00") -> bytes:
    body = u16(version) + bytes(range(100, 132)) + bytes([len(session_id)]) + session_id
    body += u16(len(suites)) + suites + bytes([len(compression)]) + compression
    return body if extensions is None else body + u16(len(extensions)) + extensions


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(message: bytes, cuts=(), version: int = 0x0301) -> bytes:
    """``message`` as handshake records, cut at the offsets ``cuts``."""
    bounds = [0, *cuts, len(message)]
    return b"".join(bytes([22]) + u16(version) + u16(end - start) + message[start:end]
                    for start, end in zip(bounds, bounds[1:]))


def client_hello(name: bytes = KMS.encode(), cuts=(), extensions: bytes | None = None, **fields) -> bytes:
    """A ClientHello with SNI ``name`` between two other extensions, as records cut at ``cuts``."""
    if extensions is None:
        extensions = SUPPORTED_VERSIONS + sni_extension(name) + EC_POINT_FORMATS
    return records(handshake(hello_body(extensions, **fields)), cuts)


def feed_all(data: bytes, chunks=None, port: int = PORT):
    """Feed ``data`` in ``chunks`` (sizes; default one read) and return the outcome, checking the protocol."""
    parser = SniParser(port)
    sizes = list(chunks) if chunks is not None else [len(data)]
    at = 0
    for size in sizes + [len(data)]:
        piece, at = data[at:at + size], at + size
        sent, outcome = parser.feed(piece)
        assert sent == b""
        if outcome is not None:
            return outcome
        if at >= len(data):
            return None
    return None


def splits(data: bytes):
    """Every two-read split, then byte by byte."""
    for cut in range(len(data) + 1):
        yield [cut, len(data) - cut]
    yield [1] * len(data)


# --------------------------------------------------------------------------- real ClientHellos

@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("name", [KMS, "a.example.com", "Mixed-Case.Example.COM", "under_score.example"])
def test_real_client_hello_gives_its_server_name_and_every_byte(name, version):
    data = real_hello(name, version)
    assert name.encode() in data
    assert feed_all(data) == Request(name, PORT, data)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_real_client_hello_of_an_idn_carries_its_ascii_form(version):
    data = real_hello("b\u00fccher.example", version)
    assert feed_all(data) == Request("xn--bcher-kva.example", PORT, data)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("server_hostname", [None, "10.1.2.3", "::1"])
def test_real_client_hello_without_sni_is_refused_with_unrecognized_name(server_hostname, version):
    """OpenSSL sends no SNI for an IP address (RFC 6066), nor without server_hostname."""
    outcome = feed_all(real_hello(server_hostname, version))
    assert outcome == Refusal("the ClientHello has no server_name (SNI)", NO_SNI, UNRECOGNIZED_NAME_ALERT)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_real_client_hello_split_at_every_byte_boundary_gives_the_same_request(version):
    data = real_hello(KMS, version)
    for chunks in splits(data):
        assert feed_all(data, chunks) == Request(KMS, PORT, data), chunks


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_bytes_after_the_client_hello_are_kept_for_the_target(version):
    """TLS 1.3 early data (and a compatibility ChangeCipherSpec) may follow in the same read."""
    data = real_hello(KMS, version) + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x03abc"
    assert feed_all(data) == Request(KMS, PORT, data)


def test_the_service_port_is_the_requests_port():
    assert feed_all(real_hello(KMS, "TLSv1_3"), port=8443).port == 8443


# --------------------------------------------------------------------------- hand-built: records

@pytest.mark.parametrize("cuts", [(1,), (3,), (4,), (5,), (50,), (120,), (1, 2), (4, 90), (60, 130), (2, 3)])
def test_client_hello_split_across_records_gives_the_same_request(cuts):
    data = client_hello(cuts=cuts)
    assert feed_all(data) == Request(KMS, PORT, data)


@pytest.mark.parametrize("cuts", [(), (1,), (77, 120)])
def test_split_records_split_at_every_byte_boundary_give_the_same_request(cuts):
    data = client_hello(cuts=cuts)
    for chunks in splits(data):
        assert feed_all(data, chunks) == Request(KMS, PORT, data), (cuts, chunks)


@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0302, 0x0303, 0x0304])
def test_record_and_legacy_versions_from_ssl3_to_tls13_are_read(version):
    data = records(handshake(hello_body(sni_extension(b"a.example"), version=version)), version=version)
    assert feed_all(data) == Request("a.example", PORT, data)


def malformed(data: bytes, chunks=None) -> Refusal:
    outcome = feed_all(data, chunks)
    assert isinstance(outcome, Refusal) and outcome.outcome == MALFORMED, outcome
    assert outcome.reply == DECODE_ERROR_ALERT
    assert outcome.reason.startswith("malformed ClientHello: ") and "\n" not in outcome.reason
    return outcome


@pytest.mark.parametrize("version", [0x0200, 0x0299, 0x0305, 0x0400, 0x0303 + 0x0100, 0xFFFF])
def test_record_version_outside_ssl3_to_tls13_is_malformed(version):
    assert "record version" in malformed(records(handshake(hello_body(None)), version=version)).reason


@pytest.mark.parametrize("version", [0x0200, 0x0305, 0x0403])
def test_legacy_version_outside_ssl3_to_tls13_is_malformed(version):
    assert "legacy_version" in malformed(client_hello(version=version)).reason


def test_a_malformed_record_header_is_refused_as_soon_as_it_is_read():
    assert SniParser(PORT).feed(b"\x16\x03\x05\x00\x10")[1].outcome == MALFORMED
    assert SniParser(PORT).feed(b"\x16\x03\x01\x00\x00")[1].outcome == MALFORMED
    assert SniParser(PORT).feed(b"\x16\x03\x01\x00")[1] is None


def test_empty_and_oversized_records_are_malformed():
    assert "0 bytes" in malformed(b"\x16\x03\x01\x00\x00" + client_hello()).reason
    assert "16385 bytes" in malformed(b"\x16\x03\x01\x40\x01" + bytes(100)).reason


@pytest.mark.parametrize("content_type", [20, 21, 23, 24, 0, 255])
def test_a_record_other_than_handshake_before_the_hello_ends_is_malformed(content_type):
    data = client_hello(cuts=(40,))
    second = 5 + 40
    assert "content type" in malformed(data[:second] + bytes([content_type]) + data[second + 1:]).reason


@pytest.mark.parametrize("msg_type", [0, 2, 11, 16, 20, 255])
def test_a_handshake_message_other_than_client_hello_is_malformed(msg_type):
    assert "not ClientHello" in malformed(records(handshake(hello_body(None), msg_type), cuts=(1,))).reason


def test_a_message_sharing_the_client_hellos_last_record_is_malformed():
    message = handshake(hello_body(sni_extension(b"a.example")))
    assert "follow the ClientHello" in malformed(records(message + b"\x14\x00\x00\x00")).reason


# --------------------------------------------------------------------------- hand-built: the ClientHello

def test_client_hello_without_extensions_block_or_with_an_empty_one_has_no_sni():
    for extensions in (None, b"", SUPPORTED_VERSIONS + EC_POINT_FORMATS):
        outcome = feed_all(records(handshake(hello_body(extensions))))
        assert outcome == Refusal("the ClientHello has no server_name (SNI)", NO_SNI, UNRECOGNIZED_NAME_ALERT)


@pytest.mark.parametrize("name", ["10.1.2.3", "127.0.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "2001:db8::1",
                                  "0:0:0:0:0:ffff:7f00:1"])
def test_ip_literal_server_name_is_refused_with_unrecognized_name(name):
    outcome = feed_all(client_hello(name.encode()))
    assert outcome == Refusal(f"the ClientHello's server_name {name!r} is an IP literal, which RFC 6066 forbids",
                              NO_SNI, UNRECOGNIZED_NAME_ALERT)


@pytest.mark.parametrize("fields,needle", [
    ({"session_id": bytes(33)}, "legacy_session_id is longer"),
    ({"suites": b""}, "cipher_suites is 0 bytes"),
    ({"suites": b"\x13\x01\x13"}, "cipher_suites is 3 bytes"),
    ({"compression": b""}, "legacy_compression_methods is empty"),
])
def test_bad_client_hello_fields_are_malformed(fields, needle):
    assert needle in malformed(client_hello(**fields)).reason


@pytest.mark.parametrize("extensions,needle", [
    (sni_extension(b"a.example") + sni_extension(b"b.example"), "extension 0 appears twice"),
    (SUPPORTED_VERSIONS + SUPPORTED_VERSIONS + sni_extension(b"a.example"), "extension 43 appears twice"),
    (extension(0, b""), "the length of server_name_list"),
    (extension(0, b"\x00\x00"), "a name_type"),
    (sni_extension(b"a.example", name_type=1), "name_type 1"),
    (sni_extension(b"a.example", b"b.example"), "more than one name"),
    (sni_extension(b""), "is not a host name"),
    (extension(0, u16(12) + b"\x00" + u16(9) + b"a.example" + b"\x00"), "1 bytes follow server_name_list"),
    (sni_extension(b"a.example") + b"\x00", "an extension type needs 2 bytes"),
])
def test_bad_extensions_are_malformed(extensions, needle):
    assert needle in malformed(client_hello(extensions=extensions)).reason


def test_bytes_after_the_extensions_are_malformed():
    message = handshake(hello_body(sni_extension(b"a.example")) + b"\x00")
    assert "1 bytes follow the extensions" in malformed(records(message)).reason


@pytest.mark.parametrize("name", ["a", "a.example.", "A.EXAMPLE", "under_score.example", "x-y.z9", "-.-", "1234",
                                  "127.1", "0x7f000001", "a" * 255, "a..b"])
def test_any_name_of_host_name_characters_is_taken_as_is_for_the_allowlist_to_judge(name):
    data = client_hello(name.encode())
    assert feed_all(data) == Request(name, PORT, data)


@pytest.mark.parametrize("name", [b"a" * 256, b"a b", b"a\x00", b"a\tb", b"a/b", b"a:b", b"a%2eb", b"*.example",
                                  b"a@b", b"a\\b", b"a\x7f", b"\xff", "b\u00fccher.example".encode(),
                                  "kms.us-east-1.amazonaws.c\u03bfm".encode(), b"fe80::1%eth0", b"a\r\nb"])
def test_a_name_with_other_bytes_or_too_long_is_malformed(name):
    reason = malformed(client_hello(name)).reason
    assert "is not a host name" in reason and "\n" not in reason and "\r" not in reason


def length_fields(data: bytes) -> dict:
    """Where each length field of the default one-record ``client_hello()`` is: name -> (offset, size)."""
    fields = {"record": (3, 2), "handshake": (6, 3), "session_id": (43, 1), "cipher_suites": (76, 2),
              "compression_methods": (84, 1), "extensions": (86, 2)}
    at = 88
    for number in range(3):
        fields[f"extension #{number}"] = (at + 2, 2)
        if int.from_bytes(data[at:at + 2], "big") == 0:
            fields["server_name_list"] = (at + 4, 2)
            fields["host_name"] = (at + 7, 2)
        at += 4 + int.from_bytes(data[at + 2:at + 4], "big")
    assert at == len(data)
    return fields


#: Off-by-one lengths that leave a valid prefix waiting for bytes that never come (the handshake timeout's case).
INCOMPLETE = {("record", -1), ("record", +1), ("handshake", +1)}


@pytest.mark.parametrize("delta", [-1, +1])
@pytest.mark.parametrize("field", ["record", "handshake", "session_id", "cipher_suites", "compression_methods",
                                   "extensions", "extension #0", "extension #1", "extension #2",
                                   "server_name_list", "host_name"])
def test_every_length_field_off_by_one_is_refused(field, delta):
    data = bytearray(client_hello())
    offset, size = length_fields(bytes(data))[field]
    data[offset:offset + size] = (int.from_bytes(data[offset:offset + size], "big") + delta).to_bytes(size, "big")
    if (field, delta) in INCOMPLETE:
        assert feed_all(bytes(data)) is None
        # whatever comes next does not complete it: garbage is malformed, and a full record ends it too
        assert feed_all(bytes(data) + bytes(5)).outcome == MALFORMED
    else:
        malformed(bytes(data))


# --------------------------------------------------------------------------- not TLS, SSL 2.0

@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"CONNECT kms:443 HTTP/1.1\r\n", b"\x05\x01\x00",
                                  b"\x00", b"\x15\x03\x03\x00\x02\x02\x28", b"\x17\x03\x03", b"SSH-2.0-x\r\n",
                                  b"\x80\x2e\x02\x03\x01", b"\x80\x2e\x01\x02\x00", b"\x7f"])
def test_a_stream_that_is_not_tls_is_refused_without_a_reply(data):
    outcome = feed_all(data)
    assert outcome.outcome == NOT_TLS and outcome.reply == b"" and "not TLS" in outcome.reason


def test_not_tls_is_known_from_the_first_byte():
    assert SniParser(PORT).feed(b"G")[1].outcome == NOT_TLS


SSL2_HELLO = bytes.fromhex("802e0103010015000000100000390000380000350000160000130000")


def test_an_ssl2_format_client_hello_has_no_sni():
    """SSL 2.0's record format has no extensions: refused as no-sni, decided at its fourth byte."""
    parser = SniParser(PORT)
    assert [parser.feed(bytes([byte]))[1] for byte in SSL2_HELLO[:3]] == [None, None, None]
    assert parser.feed(SSL2_HELLO[3:4])[1] == Refusal(
        "an SSL 2.0-format ClientHello, which cannot carry a server_name", NO_SNI, UNRECOGNIZED_NAME_ALERT)


# --------------------------------------------------------------------------- the 8 KiB limit

def padded_hello(total: int, cuts=()) -> bytes:
    """A valid ClientHello of exactly ``total`` bytes, padded with extension 21 (RFC 7685)."""
    def hello_with(padding: int, cuts=()) -> bytes:
        extensions = SUPPORTED_VERSIONS + sni_extension(KMS.encode()) + extension(21, bytes(padding))
        return client_hello(extensions=extensions, cuts=cuts)

    hello = hello_with(total - len(hello_with(0)) - 5 * len(cuts), cuts)
    assert len(hello) == total
    return hello


def test_client_hello_ending_exactly_at_the_limit_is_read():
    data = padded_hello(MAX_REQUEST_BYTES, cuts=(5000,))
    assert feed_all(data) == Request(KMS, PORT, data)
    assert feed_all(data, [1000] * 9) == Request(KMS, PORT, data)


TOO_LARGE_REFUSAL = Refusal(f"no complete ClientHello in the first {MAX_REQUEST_BYTES} bytes", TOO_LARGE,
                            INTERNAL_ERROR_ALERT)


@pytest.mark.parametrize("chunks", [None, [1000] * 9, [MAX_REQUEST_BYTES, 1]])
def test_client_hello_one_byte_over_the_limit_is_too_large(chunks):
    assert feed_all(padded_hello(MAX_REQUEST_BYTES + 1, cuts=(5000,)), chunks) == TOO_LARGE_REFUSAL


def test_a_record_that_cannot_end_within_the_limit_is_too_large_past_the_limit():
    parser = SniParser(PORT)
    assert parser.feed(b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc")[1] is None
    assert parser.feed(bytes(MAX_REQUEST_BYTES - 9))[1] is None
    assert parser.feed(b"\x00")[1] == TOO_LARGE_REFUSAL


def test_tiny_records_that_never_complete_the_hello_are_too_large_past_the_limit():
    """One-byte records of a ClientHello that claims 2,000 bytes: a record header for every byte."""
    message = handshake(bytes(2000))
    data = records(message, cuts=range(1, len(message)))
    parser = SniParser(PORT)
    outcomes = [parser.feed(data[at:at + 128])[1] for at in range(0, MAX_REQUEST_BYTES, 128)]
    assert outcomes[-1] is None
    assert parser.feed(data[MAX_REQUEST_BYTES:MAX_REQUEST_BYTES + 1])[1] == TOO_LARGE_REFUSAL


def test_more_than_the_limit_in_one_read_after_a_complete_hello_is_all_early_data():
    data = real_hello(KMS, "TLSv1_3") + b"\x17\x03\x03\x40\x00" + bytes(2 ** 14)
    assert feed_all(data) == Request(KMS, PORT, data)


# --------------------------------------------------------------------------- replies

@pytest.mark.parametrize("outcome,reply", [
    (CONNECTED, b""), (NOT_ALLOWED, ACCESS_DENIED_ALERT), (UNREACHABLE, INTERNAL_ERROR_ALERT),
    (REFUSED, INTERNAL_ERROR_ALERT), (TIMED_OUT, INTERNAL_ERROR_ALERT), (TOO_LARGE, INTERNAL_ERROR_ALERT),
    (TOO_SLOW, b""),
])
def test_reply_for_every_outcome(outcome, reply):
    assert SniParser(PORT).reply(outcome) == reply


def test_alert_is_a_fatal_alert_record():
    assert alert(112) == bytes([21, 3, 3, 0, 2, 2, 112]) == UNRECOGNIZED_NAME_ALERT


# --------------------------------------------------------------------------- verify_sni

def verify(stream: bytes, requested: str):
    """What the lead's verify_sni does with a relayed stream's first bytes (see vsockproxy/sni.py)."""
    outcome = feed_all(stream, [7] * len(stream), port=PORT)
    if isinstance(outcome, Request):
        return "relay" if canonical_host(outcome.host) == canonical_host(requested) else "close"
    if isinstance(outcome, Refusal) and outcome.outcome == NOT_TLS:
        return "relay"
    return "close" if outcome is not None else "wait"


def test_verify_sni_use():
    assert verify(real_hello(KMS, "TLSv1_3"), KMS.upper() + ".") == "relay"
    assert verify(real_hello("front.example.com", "TLSv1_3"), KMS) == "close"
    assert verify(real_hello(None, "TLSv1_2"), KMS) == "close"
    assert verify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", KMS) == "relay"
    assert verify(real_hello(KMS, "TLSv1_3")[:100], KMS) == "wait"


# --------------------------------------------------------------------------- bypass spellings as SNI

BYPASS_CASES = (
    [(name, [("127.0.0.1", 443)], {}) for name in NON_CANONICAL_IPV4]
    + [(name, [("1234.corp.example", 443), ("10.9.9.9", 443)], {"1234.corp.example": ["10.9.9.9"],
                                                                 name: ["10.9.9.9"]}) for name in BARE_NUMBERS]
    + [(name, [(KMS, 443)], {KMS: [KMS_IP], name: [KMS_IP]}) for name in INVALID_LOOKALIKES.values()]
    + [(name, [(KMS, 443)], {KMS: [KMS_IP], name.lower(): ["203.0.113.66"]}) for name in DIFFERENT_NAMES.values()]
    + [(name, [("127.0.0.1", 443), ("::1", 443)], {}) for name in ["0.0.0.0", "::", "::ffff:127.0.0.1", "::1"]]
)


@pytest.mark.parametrize("name,entries,records_", BYPASS_CASES, ids=[repr(c[0]) for c in BYPASS_CASES])
def test_bypass_spelling_as_server_name_is_refused(name, entries, records_):
    """Refused by the parser, or by the allowlist without a look-up of the spelling, as test_bypass expects."""
    data = client_hello(name.encode("utf-8"))
    outcome = feed_all(data)
    if isinstance(outcome, Refusal):
        assert outcome.outcome in (MALFORMED, NO_SNI), outcome
        return
    assert outcome == Request(name, PORT, data)
    allowlist = parse_document({"allowlist": [{"address": a, "port": p} for a, p in entries]}, "bypass.yaml").allowlist
    dns = GlibcLikeDNS(records_)
    with pytest.raises(NotAllowed) as info:
        target = allowlist.authorize(outcome.host, outcome.port, Resolver(socket.AF_UNSPEC, 30.0, getaddrinfo=dns))
        pytest.fail(f"{name!r} allowed as {target}")
    assert "\n" not in str(info.value)
    if name not in DIFFERENT_NAMES.values():
        assert dns.asked == [], f"{name!r} was handed to getaddrinfo"


# --------------------------------------------------------------------------- fuzz

FUZZ_ALLOWLIST = parse_document({"allowlist": [
    {"address": KMS, "port": 443},
    {"address": "*.example.com", "port": [443, 8443]},
    {"address": "10.1.2.0/24", "port": 443},
]}, "fuzz.yaml").allowlist
FUZZ_DNS = {KMS: [KMS_IP], "front.example.org": ["10.1.2.9"], "evil.example.org": ["203.0.113.66"],
            "mixed.example.org": ["203.0.113.66", "10.1.2.7"]}
ADMITTED_NETWORK = ipaddress.ip_network("10.1.2.0/24")

CASES_RUN: dict[str, int] = {}


def check_case(data: bytes, chunks, port: int = PORT):
    """Feed ``data`` whole and in ``chunks``: same ending, and that ending is sound."""
    whole = feed_all(data, port=port)
    split = feed_all(data, chunks, port=port)
    assert type(whole) is type(split)
    if isinstance(whole, Request):
        assert whole.host == split.host and whole.port == split.port == port
        assert whole.early_data == data and data.startswith(split.early_data)
        check_request(whole)
    elif isinstance(whole, Refusal):
        assert whole.outcome == split.outcome
        for refusal in (whole, split):
            assert refusal.reason and "\n" not in refusal.reason and "\r" not in refusal.reason, refusal
            assert refusal.outcome in REFUSAL_REPLIES, refusal
            assert refusal.reply == REFUSAL_REPLIES[refusal.outcome], refusal
    else:  # still waiting: the server ends it at the handshake timeout
        assert len(data) <= MAX_REQUEST_BYTES
        assert SniParser(port).reply(TOO_SLOW) == b""
    return whole


def check_request(request: Request) -> None:
    """The name is plain ASCII host-name bytes, and the real allowlist refuses it or admits it for real."""
    host = request.host
    assert 0 < len(host) <= 255 and host.isascii() and set(host) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"), host
    assert ipaddress_of(host) is None
    resolver = Resolver(socket.AF_UNSPEC, 30.0, getaddrinfo=GlibcLikeDNS(FUZZ_DNS))
    try:
        target = FUZZ_ALLOWLIST.authorize(host, request.port, resolver)
    except NotAllowed as exc:
        assert "\n" not in str(exc)
        return
    expected = host.lower()[:-1] if host.endswith(".") else host.lower()
    assert target.host == expected and target.port == request.port in target.allowed_by.ports
    if target.pinned_to is None:
        assert expected == KMS or expected.endswith(".example.com"), target
        return
    try:
        endpoints = target.endpoints(resolver)
    except ResolveError:
        return
    assert endpoints and all(e.ip in ADMITTED_NETWORK or str(e.ip) == KMS_IP for e in endpoints), endpoints


def ipaddress_of(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def chunk_sizes(draw, size: int):
    rng = random.Random(draw(st.integers(0, 2 ** 32), label="split seed"))
    sizes = []
    while sum(sizes) < size:
        sizes.append(rng.choice([1, 1, 2, 3, 5, rng.randint(1, 64), rng.randint(1, 600)]))
    return sizes


REAL_HELLOS = [("TLSv1_2", KMS), ("TLSv1_3", KMS), ("TLSv1_3", "a.example.com"), ("TLSv1_2", None),
               ("TLSv1_3", "evil.example.org"), ("TLSv1_2", "front.example.org")]


def test_fuzz_budget_is_at_least_10000_cases():
    assert FUZZ_TOTAL >= 10_000, FUZZ_CASES


def test_fuzz_random_bytes():
    @fuzz_settings(FUZZ_CASES["random_bytes"])
    @given(st.data())
    def inner(data):
        prefix = data.draw(st.sampled_from([b"", b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x03\x02\x00",
                                            b"\x80", b"\x16\x03\x01\x00\x40\x01\x00\x00"]))
        payload = prefix + data.draw(st.binary(max_size=600))
        check_case(payload, chunk_sizes(data.draw, len(payload)))
        CASES_RUN["random_bytes"] += 1

    run_counted("random_bytes", inner, FUZZ_CASES, CASES_RUN)


def test_fuzz_random_records():
    @fuzz_settings(FUZZ_CASES["random_records"])
    @given(st.data())
    def inner(data):
        body = data.draw(st.binary(max_size=400))
        declared = data.draw(st.sampled_from([len(body), len(body), len(body) + 1, len(body) - 1, 0, 2 ** 24 - 1]))
        message = bytes([data.draw(st.sampled_from([1, 1, 1, 2]))]) + (declared % 2 ** 24).to_bytes(3, "big") + body
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(message) - 1)), max_size=3))))
        payload = records(message, [c for c in cuts if c < len(message)],
                          version=data.draw(st.sampled_from([0x0301, 0x0303, 0x0300, 0x0304, 0x0305])))
        check_case(payload, chunk_sizes(data.draw, len(payload)))
        CASES_RUN["random_records"] += 1

    run_counted("random_records", inner, FUZZ_CASES, CASES_RUN)


def test_fuzz_mutated_real_client_hellos():
    @fuzz_settings(FUZZ_CASES["mutated_real"])
    @given(st.data())
    def inner(data):
        version, name = data.draw(st.sampled_from(REAL_HELLOS))
        payload = bytearray(real_hello(name, version))
        rng = random.Random(data.draw(st.integers(0, 2 ** 32), label="mutation seed"))
        for _ in range(data.draw(st.integers(1, 4))):
            at = rng.randrange(len(payload))
            action = rng.choice(["flip", "flip", "insert", "delete", "set"])
            if action == "flip":
                payload[at] ^= 1 << rng.randrange(8)
            elif action == "insert":
                payload[at:at] = bytes([rng.randrange(256)])
            elif action == "delete":
                del payload[at]
            else:
                payload[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        check_case(bytes(payload), chunk_sizes(data.draw, len(payload)))
        CASES_RUN["mutated_real"] += 1

    run_counted("mutated_real", inner, FUZZ_CASES, CASES_RUN)


NAME_POOL = sorted({KMS, KMS.upper() + ".", "a.example.com", "front.example.org", "evil.example.org",
                    "mixed.example.org", "x.example.com.", "example.com", "b\u00fccher.example.com",
                    "xn--bcher-kva.example.com", "", ".", "10.1.2.3", "::1", "::ffff:10.1.2.3", "10.1.2.3.",
                    "0x0a010203", "167838211", *NON_CANONICAL_IPV4, *BARE_NUMBERS, *INVALID_LOOKALIKES.values(),
                    *DIFFERENT_NAMES.values()})


def expected_for_name(name: bytes) -> str:
    """The ending an independent reading of RFC 6066 gives a well-formed ClientHello carrying ``name``."""
    if ipaddress_of(name.decode("latin-1")) is not None and b"%" not in name:
        return NO_SNI
    if 0 < len(name) <= 255 and all(chr(b).isascii() and (chr(b).isalnum() or chr(b) in "-._") for b in name):
        return "request"
    return MALFORMED


def test_fuzz_random_names():
    @fuzz_settings(FUZZ_CASES["random_names"])
    @given(st.data())
    def inner(data):
        name = data.draw(st.one_of(
            st.sampled_from(NAME_POOL).map(lambda n: n.encode("utf-8")),
            st.text(max_size=40).map(lambda n: n.encode("utf-8")),
            st.text(alphabet="abcXYZ019-._:", max_size=300).map(str.encode),
            st.binary(max_size=40),
        ))
        extensions = data.draw(st.permutations([SUPPORTED_VERSIONS, EC_POINT_FORMATS, sni_extension(name)]))
        message = handshake(hello_body(b"".join(extensions)))
        cuts = sorted(set(data.draw(st.lists(st.integers(1, len(message) - 1), max_size=2))))
        payload = records(message, cuts)
        port = data.draw(st.sampled_from([443, 8443]))
        outcome = check_case(payload, chunk_sizes(data.draw, len(payload)), port=port)
        expected = expected_for_name(name)
        if expected == "request":
            assert isinstance(outcome, Request) and outcome.host == name.decode("ascii"), (name, outcome)
        else:
            assert isinstance(outcome, Refusal) and outcome.outcome == expected, (name, outcome)
        CASES_RUN["random_names"] += 1

    run_counted("random_names", inner, FUZZ_CASES, CASES_RUN)


def test_fuzz_random_splits_give_the_same_request():
    @fuzz_settings(FUZZ_CASES["random_splits"])
    @given(st.data())
    def inner(data):
        if data.draw(st.booleans()):
            version, name = data.draw(st.sampled_from([c for c in REAL_HELLOS if c[1] is not None]))
            message = real_hello(name, version)[5:]
        else:
            name = data.draw(st.sampled_from([KMS, "a.example.com", "evil.example.org"]))
            padding = extension(21, bytes(data.draw(st.one_of(st.integers(0, 3000), st.integers(7950, 8100)))))
            message = handshake(hello_body(SUPPORTED_VERSIONS + sni_extension(name.encode()) + padding))
        cuts = sorted(set(data.draw(st.lists(st.integers(1, len(message) - 1), max_size=6))))
        hello = records(message, cuts, version=data.draw(st.sampled_from([0x0301, 0x0303])))
        payload = hello + data.draw(st.binary(max_size=40), label="early data")
        outcome = check_case(payload, chunk_sizes(data.draw, len(payload)))
        if len(hello) <= MAX_REQUEST_BYTES:
            assert outcome == Request(name, PORT, payload)
        else:
            assert outcome == TOO_LARGE_REFUSAL
        CASES_RUN["random_splits"] += 1

    run_counted("random_splits", inner, FUZZ_CASES, CASES_RUN)
