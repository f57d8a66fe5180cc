"""Mode ``socks5``: the target of a SOCKS5 CONNECT (RFC 1928), without authentication.

The exchange has two steps.  The client greets with the methods it offers; we
choose "no authentication" (``05 00``), or refuse with ``05 FF``.  It then asks
for a target: an IPv4 or IPv6 address or a domain name, and a port.  A client
may send both in one write (pipelining), so one ``feed`` can answer the
greeting and return the request.

Every field has a fixed or length-prefixed size, so a stream is decided after
at most 2 + 255 bytes of greeting and 4 + 1 + 255 + 2 of request: far below
MAX_REQUEST_BYTES, and nothing here waits for more.
"""

from __future__ import annotations

import ipaddress

from vsockproxy.handshake import (
    CONNECTED, NOT_ALLOWED, REFUSED, TIMED_OUT, TOO_LARGE, TOO_SLOW, UNREACHABLE, Outcome, Refusal, Request,
)
from vsockproxy.hostnames import short_repr

VERSION = 0x05
NO_AUTHENTICATION = 0x00
NO_ACCEPTABLE_METHODS = 0xFF
CONNECT = 0x01
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04

# Reply codes (RFC 1928, section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED_BY_RULESET = 0x02
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

#: The method choice sent once the greeting offers "no authentication".
METHOD_CHOSEN = bytes([VERSION, NO_AUTHENTICATION])
#: The method choice that ends a greeting we cannot serve; the client closes.
NO_METHOD = bytes([VERSION, NO_ACCEPTABLE_METHODS])

_REPLY_CODES: dict[str, int] = {
    CONNECTED: SUCCEEDED,
    NOT_ALLOWED: NOT_ALLOWED_BY_RULESET,
    UNREACHABLE: HOST_UNREACHABLE,
    REFUSED: CONNECTION_REFUSED,
    TIMED_OUT: TTL_EXPIRED,
    TOO_LARGE: GENERAL_FAILURE,
    TOO_SLOW: GENERAL_FAILURE,
}

_ADDRESS_LENGTHS = {ATYP_IPV4: 4, ATYP_IPV6: 16}


def request_reply(code: int) -> bytes:
    """The reply to a request: ``05 REP 00 01 0.0.0.0:0``.

    BND.ADDR and BND.PORT are always zero: the client has no use for them in a
    CONNECT, and they would disclose the parent's addresses.
    """
    return bytes([VERSION, code, 0x00, ATYP_IPV4]) + bytes(4 + 2)


def _refuse(outcome: str, code: int, reason: str) -> Refusal:
    """A refused request, answered with reply ``code``."""
    return Refusal(reason, outcome, request_reply(code))


class Socks5Parser:
    """One connection's SOCKS5 greeting and CONNECT request; see handshake.Parser."""

    def __init__(self) -> None:
        self._buffer = b""
        self._method_chosen = False

    def feed(self, data: bytes) -> tuple[bytes, Outcome]:
        """Take the next bytes read; returns the method choice once, when the greeting completes."""
        self._buffer += data
        if self._method_chosen:
            return b"", self._request()
        refusal = self._greeting()
        if refusal is not None or not self._method_chosen:
            return b"", refusal
        return METHOD_CHOSEN, self._request()

    def reply(self, outcome: str) -> bytes:
        """The reply for ``outcome``.

        Before the method choice (a handshake timeout mid-greeting) the client
        reads a method choice: it gets 05 FF, since the request reply's 05 01
        would read as "GSS-API chosen".
        """
        if not self._method_chosen:
            return NO_METHOD
        return request_reply(_REPLY_CODES[outcome])

    def _greeting(self) -> Refusal | None:
        """Check VER, NMETHODS, METHODS; on success drop them from the buffer and choose the method."""
        buffer = self._buffer
        if buffer and buffer[0] != VERSION:
            return Refusal(f"not a SOCKS5 greeting: version byte {buffer[0]:#04x} in {short_repr(buffer[:16])}",
                           "not-socks5")
        if len(buffer) < 2:
            return None
        count = buffer[1]
        if count == 0:
            return Refusal("SOCKS5 greeting offers no authentication method (NMETHODS 0)", "malformed", NO_METHOD)
        if len(buffer) < 2 + count:
            return None
        methods = buffer[2:2 + count]
        if NO_AUTHENTICATION not in methods:
            return Refusal(f"SOCKS5 client does not offer 'no authentication' (00): methods {short_repr(methods)}",
                           "no-method", NO_METHOD)
        self._buffer = buffer[2 + count:]
        self._method_chosen = True
        return None

    def _request(self) -> Outcome:
        """The Request once VER CMD RSV ATYP DST.ADDR DST.PORT are in; a Refusal at the first bad field."""
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        version, command, reserved, address_type = buffer[:4]
        if version != VERSION or reserved != 0x00:
            return _refuse("malformed", GENERAL_FAILURE,
                           f"malformed SOCKS5 request header {buffer[:4].hex(' ')} (VER must be 05, RSV 00)")
        if command != CONNECT:
            return _refuse("unsupported", COMMAND_NOT_SUPPORTED,
                           f"SOCKS5 command {command:#04x} is not supported (only CONNECT, 0x01)")
        if address_type == ATYP_DOMAIN:
            if len(buffer) < 5:
                return None
            start, end = 5, 5 + buffer[4]
            if end == start:
                return _refuse("malformed", GENERAL_FAILURE, "SOCKS5 request has an empty domain name")
        elif address_type in _ADDRESS_LENGTHS:
            start, end = 4, 4 + _ADDRESS_LENGTHS[address_type]
        else:
            return _refuse("address-type", ADDRESS_TYPE_NOT_SUPPORTED,
                           f"SOCKS5 address type {address_type:#04x} is not supported")
        if len(buffer) < end + 2:
            return None
        address = buffer[start:end]
        port = int.from_bytes(buffer[end:end + 2], "big")
        if address_type == ATYP_DOMAIN:
            if not all(0x21 <= byte <= 0x7E for byte in address):
                return _refuse("malformed", GENERAL_FAILURE,
                               f"SOCKS5 domain name {short_repr(address)} is not printable ASCII without spaces")
            host = address.decode("ascii")
        else:
            host = str(ipaddress.ip_address(address))
        if port == 0:
            return _refuse("malformed", GENERAL_FAILURE, f"SOCKS5 request for {short_repr(host)} names port 0")
        return Request(host, port, buffer[end + 2:])
