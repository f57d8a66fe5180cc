"""Mode ``sni``: the target is the server_name of the enclave's TLS ClientHello, which then reaches it unchanged.

The proxy never terminates TLS.  It reads TLS records (RFC 8446 section 5.1) until
they hold one whole ClientHello (section 4.1.2, which may be split over several
records and any number of reads), takes the host_name of its server_name extension
(RFC 6066 section 3), and hands every byte it read to the target first, so the
handshake runs end to end.  The port is the service's.

Parsing is strict, and anything it cannot read is refused rather than guessed at:

* a first byte other than 22 (handshake) is ``not-tls``, refused in silence: an
  alert means nothing to a client that does not speak TLS.  The one exception is an
  SSL 2.0-format ClientHello (first byte >= 0x80, message type 1, version 3.x), which
  TLS servers still read but which cannot carry a server_name: ``no-sni``;
* a record version or legacy_version other than 0x0300..0x0304 (SSL 3.0 to TLS 1.3;
  RFC 5246 appendix E.1 lets clients put 0x0300 in the record layer), a record that
  is not handshake, empty, or over 2^14 bytes, a length field that does not fit,
  a ClientHello that does not end exactly where its last record ends (TLS 1.3 forbids
  sharing that record), a duplicated extension, a server_name list that is not
  exactly one host_name, or a name outside letters, digits, ``-``, ``.`` and ``_``
  (underscores because the allowlist takes them) or 1..255 bytes long: ``malformed``,
  with a ``decode_error`` alert;
* no server_name extension, or an IP literal as the name (RFC 6066 forbids literals):
  ``no-sni``, with an ``unrecognized_name`` alert;
* a ClientHello that does not end within MAX_REQUEST_BYTES of input is TOO_LARGE,
  answered with ``internal_error``: the ClientHello may be valid, the proxy's limit
  is what refuses it.

The outcome depends only on the first MAX_REQUEST_BYTES bytes, never on how they
were split into reads; bytes after the ClientHello (TLS 1.3 early data) are kept.
Every alert is fatal and carries record version 0x0303, which every TLS 1.0 to 1.3
client takes before the version is negotiated.

``verify_sni`` (``http-connect`` and ``socks5`` services) uses the same class: feed
the first bytes the enclave relays to a fresh ``SniParser(requested_port)`` until it
gives an outcome.  A Request carries the stream's SNI as ``host``; a Refusal with
outcome NOT_TLS means the stream is not TLS and goes on as is; any other Refusal is
a TLS stream without a usable SNI, and its ``reply`` is the alert to close it with.
"""

from __future__ import annotations

from typing import Optional, Tuple

from vsockproxy.handshake import (
    CONNECTED, MAX_REQUEST_BYTES, NOT_ALLOWED, REFUSED, TIMED_OUT, TOO_LARGE, TOO_SLOW, UNREACHABLE, Outcome,
    Refusal, Request,
)
from vsockproxy.hostnames import parse_ip, short_repr

# Refusal outcomes of this mode, besides TOO_LARGE.
NOT_TLS = "not-tls"
NO_SNI = "no-sni"
MALFORMED = "malformed"

# TLS alert descriptions (RFC 8446 section 6).
ACCESS_DENIED = 49
DECODE_ERROR = 50
INTERNAL_ERROR = 80
UNRECOGNIZED_NAME = 112

_HANDSHAKE = 22            # record content type
_CLIENT_HELLO = 1          # handshake message type
_SERVER_NAME = 0           # extension type
_HOST_NAME = 0             # server_name name_type
_VERSIONS = range(0x0300, 0x0305)
_RECORD_HEADER = 5
_MAX_FRAGMENT = 2 ** 14
_MAX_NAME = 255
_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


def alert(description: int) -> bytes:
    """One fatal alert record: the last thing the enclave's TLS client reads before the proxy closes."""
    return bytes((21, 3, 3, 0, 2, 2, description))


_REPLIES = {
    CONNECTED: b"",                        # the target answers the replayed ClientHello
    NOT_ALLOWED: alert(ACCESS_DENIED),
    UNREACHABLE: alert(INTERNAL_ERROR),
    REFUSED: alert(INTERNAL_ERROR),
    TIMED_OUT: alert(INTERNAL_ERROR),
    TOO_LARGE: alert(INTERNAL_ERROR),
    TOO_SLOW: b"",                         # it may have sent nothing, or stopped reading: just close
}


class _Malformed(ValueError):
    """The bytes break the TLS wire format; the message says where."""


class _Fields:
    """A cursor over one part of the ClientHello; every read checks that the bytes are there."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def left(self) -> int:
        return len(self._data) - self._at

    def take(self, size: int, what: str) -> bytes:
        if size > self.left():
            raise _Malformed(f"{what} needs {size} bytes, {self._what} has {self.left()} left")
        self._at += size
        return self._data[self._at - size:self._at]

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> bytes:
        """A TLS vector: a ``length_size``-byte length, then that many bytes."""
        return self.take(self.number(length_size, f"the length of {what}"), what)


def _check_version(version: int, what: str) -> None:
    if version not in _VERSIONS:
        raise _Malformed(f"{what} {version:#06x} is not SSL 3.0 to TLS 1.3 (0x0300..0x0304)")


def _server_name(body: bytes) -> Optional[bytes]:
    """The host_name in a ClientHello's body (after the 4-byte header), or None if it has no server_name."""
    hello = _Fields(body, "the ClientHello")
    _check_version(hello.number(2, "legacy_version"), "legacy_version")
    hello.take(32, "random")
    if len(hello.vector(1, "legacy_session_id")) > 32:
        raise _Malformed("legacy_session_id is longer than 32 bytes")
    suites = hello.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise _Malformed(f"cipher_suites is {len(suites)} bytes, not a non-zero even number")
    if not hello.vector(1, "legacy_compression_methods"):
        raise _Malformed("legacy_compression_methods is empty")
    if not hello.left():
        return None  # no extensions block at all: allowed before TLS 1.3, and without SNI
    extensions = _Fields(hello.vector(2, "extensions"), "the extensions")
    if hello.left():
        raise _Malformed(f"{hello.left()} bytes follow the extensions")
    seen = set()
    name = None
    while extensions.left():
        kind = extensions.number(2, "an extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise _Malformed(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(data: bytes) -> bytes:
    """The one host_name of a server_name extension's data (RFC 6066 section 3)."""
    extension = _Fields(data, "the server_name extension")
    names = _Fields(extension.vector(2, "server_name_list"), "server_name_list")
    if extension.left():
        raise _Malformed(f"{extension.left()} bytes follow server_name_list")
    name_type = names.number(1, "a name_type")
    if name_type != _HOST_NAME:
        raise _Malformed(f"server_name has name_type {name_type}, not host_name (0)")
    name = names.vector(2, "host_name")
    if names.left():
        raise _Malformed("server_name_list holds more than one name")
    return name


class SniParser:
    """One connection's ClientHello reader, for a service whose targets listen on ``port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._data = bytearray()   # every byte fed: the early data of the Request
        self._record_at = 0        # where the next record header starts in _data
        self._hello = bytearray()  # the handshake bytes of the records read so far

    def feed(self, data: bytes) -> Tuple[bytes, Outcome]:
        """Take the next bytes; the proxy never sends anything before the target answers."""
        self._data += data
        try:
            outcome = self._read()
        except _Malformed as exc:
            outcome = Refusal(f"malformed ClientHello: {exc}", MALFORMED, alert(DECODE_ERROR))
        if outcome is None and len(self._data) > MAX_REQUEST_BYTES:
            outcome = Refusal(f"no complete ClientHello in the first {MAX_REQUEST_BYTES} bytes", TOO_LARGE,
                              alert(INTERNAL_ERROR))
        return b"", outcome

    def reply(self, outcome: str) -> bytes:
        """Nothing if the target was reached (it answers the ClientHello), else a fatal alert or a plain close."""
        return _REPLIES[outcome]

    def _read(self) -> Outcome:
        """Read the records complete within the limit; an outcome once the ClientHello is whole or cannot be."""
        data = self._data
        if data and data[0] != _HANDSHAKE:
            return self._not_handshake()
        end = min(len(data), MAX_REQUEST_BYTES)
        while self._record_at + _RECORD_HEADER <= end:
            at = self._record_at
            if data[at] != _HANDSHAKE:
                raise _Malformed(f"a record of content type {data[at]} comes before the ClientHello ends")
            _check_version(int.from_bytes(data[at + 1:at + 3], "big"), "record version")
            size = int.from_bytes(data[at + 3:at + 5], "big")
            if not 0 < size <= _MAX_FRAGMENT:
                raise _Malformed(f"a handshake record of {size} bytes (allowed: 1 to {_MAX_FRAGMENT})")
            if at + _RECORD_HEADER + size > end:
                return None
            self._hello += data[at + _RECORD_HEADER:at + _RECORD_HEADER + size]
            self._record_at = at + _RECORD_HEADER + size
            outcome = self._hello_if_whole()
            if outcome is not None:
                return outcome
        return None

    def _hello_if_whole(self) -> Outcome:
        """The outcome once the reassembled handshake bytes hold the whole ClientHello, else None."""
        hello = self._hello
        if hello[0] != _CLIENT_HELLO:
            raise _Malformed(f"the first handshake message has type {hello[0]}, not ClientHello (1)")
        if len(hello) < 4:
            return None
        size = 4 + int.from_bytes(hello[1:4], "big")
        if len(hello) < size:
            return None
        if len(hello) > size:
            raise _Malformed(f"{len(hello) - size} bytes follow the ClientHello in its last record")
        name = _server_name(bytes(hello[4:]))
        if name is None:
            return Refusal("the ClientHello has no server_name (SNI)", NO_SNI, alert(UNRECOGNIZED_NAME))
        text = name.decode("latin-1")
        if parse_ip(text) is not None:
            return Refusal(f"the ClientHello's server_name {short_repr(text)} is an IP literal, which RFC 6066 "
                           "forbids", NO_SNI, alert(UNRECOGNIZED_NAME))
        if not 0 < len(name) <= _MAX_NAME or not set(name) <= _NAME_BYTES:
            raise _Malformed(f"server_name {short_repr(text)} is not a host name")
        return Request(text, self.port, bytes(self._data))

    def _not_handshake(self) -> Outcome:
        """The outcome for a stream whose first byte is not a handshake record's: not TLS, or SSL 2.0's format."""
        data = self._data
        if data[0] & 0x80:  # SSL 2.0 record header: 2 length bytes, then msg_type 1 and version major 3
            for index, expected in ((2, _CLIENT_HELLO), (3, 3)):
                if len(data) <= index:
                    return None
                if data[index] != expected:
                    break
            else:
                return Refusal("an SSL 2.0-format ClientHello, which cannot carry a server_name", NO_SNI,
                               alert(UNRECOGNIZED_NAME))
        return Refusal(f"not TLS: the first byte is {data[0]:#04x}, not a handshake record's (0x16)", NOT_TLS)
