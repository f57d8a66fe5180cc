"""Mode ``http-connect``: the target comes from an HTTP ``CONNECT host:port`` request (RFC 9110 9.3.6).

What ``curl --proxy`` sends (urllib3 and botocore, through ``HTTPS_PROXY``, tunnel with
Python's http.client: the same request line, in HTTP/1.0 with no header up to Python 3.11,
in HTTP/1.1 with only ``Host`` from 3.12)::

    CONNECT kms.us-east-1.amazonaws.com:443 HTTP/1.1\\r\\n
    Host: kms.us-east-1.amazonaws.com:443\\r\\n
    User-Agent: curl/7.88.1\\r\\n
    Proxy-Connection: Keep-Alive\\r\\n
    \\r\\n

The target must be in authority form (``host:port`` or ``[IPv6]:port``); header
lines must be well formed but their contents are ignored (Host, Proxy-Authorization,
User-Agent...): only the request line names the target.  Lines may end in CRLF or a
bare LF, as tolerant servers accept.  Bytes after the empty line are the client's
first bytes for the target (a pipelined TLS ClientHello).  A request line that
cannot be HTTP (a TLS or SOCKS client on the wrong port) is refused as soon as its
first bytes arrive, not after the handshake timeout.

Replies never quote the request: each one is a fixed text, so nothing the enclave
sends can inject headers or a response.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Optional, Tuple, Union

from vsockproxy.handshake import (
    CONNECTED, MAX_REQUEST_BYTES, NOT_ALLOWED, REFUSED, TIMED_OUT, TOO_LARGE, TOO_SLOW, UNREACHABLE, Outcome, Refusal,
    Request,
)
from vsockproxy.hostnames import parse_ip, short_repr

# This mode's refusal outcomes (fixed labels, besides handshake.TOO_LARGE).
MALFORMED = "malformed"   # 400: not an HTTP/1.x CONNECT request with an authority-form target
METHOD = "method"         # 405: a well-formed request for another method (GET, POST...)
VERSION = "version"       # 505: a well-formed request line of another HTTP version (HTTP/2.0...)

_END_OF_HEADERS = re.compile(rb"\n\r?\n")               # an empty line, after CRLF or LF line endings
_BAD_PARTIAL_LINE = re.compile(rb"[^\x20-\x7e\r]|\r(?!\Z)")  # a request line so far: a CR only last, LF pending
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")    # RFC 9110 5.6.2: methods and header names
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")  # no CR, NUL or other CTLs
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=]+")  # RFC 3986 reg-name without %-encoding
_PORT = re.compile(r"[0-9]{1,5}")


def _response(status: int, phrase: str, body: str = "", headers: Iterable[str] = ()) -> bytes:
    """One HTTP/1.1 response: the status line, then for errors a one-line text body and ``Connection: close``."""
    head = [f"HTTP/1.1 {status} {phrase}"]
    if body:
        content = (body + "\n").encode("ascii")
        head += [*headers, "Content-Type: text/plain", f"Content-Length: {len(content)}", "Connection: close"]
    else:
        content = b""
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + content


_REPLIES = {
    CONNECTED: _response(200, "Connection established"),
    NOT_ALLOWED: _response(403, "Forbidden", "not allowed by the proxy's allowlist"),
    UNREACHABLE: _response(502, "Bad Gateway", "the target could not be reached"),
    REFUSED: _response(502, "Bad Gateway", "the target refused the connection"),
    TIMED_OUT: _response(504, "Gateway Timeout", "the target did not answer in time"),
    TOO_LARGE: _response(431, "Request Header Fields Too Large",
                         f"the request is larger than {MAX_REQUEST_BYTES} bytes"),
    TOO_SLOW: _response(408, "Request Timeout", "the request did not arrive in time"),
    MALFORMED: _response(400, "Bad Request", "not a CONNECT host:port HTTP/1.1 request"),
    METHOD: _response(405, "Method Not Allowed", "this proxy only tunnels: use CONNECT", ["Allow: CONNECT"]),
    VERSION: _response(505, "HTTP Version Not Supported", "only HTTP/1.0 and HTTP/1.1 are supported"),
}
# An outcome added to handshake.py later still gets an answer, never an exception in the connection's handler.
_OTHER_FAILURE = _response(502, "Bad Gateway", "the proxy could not connect to the target")


class HttpConnectParser:
    """Reads one CONNECT request; a fresh parser per connection."""

    def __init__(self) -> None:
        self._buffer = b""                                   # never more than MAX_REQUEST_BYTES
        self._target: Optional[Tuple[str, int]] = None       # from the request line, once it is complete

    def feed(self, data: bytes) -> Tuple[bytes, Outcome]:
        """Take the next bytes read; nothing is sent before the outcome, which comes with the whole header section."""
        held = len(self._buffer)
        room = MAX_REQUEST_BYTES - held
        self._buffer += data[:room]
        beyond = data[room:]  # past the limit: only ever early data of a request whose header section fits
        return b"", self._parse(held, beyond)

    def reply(self, outcome: str) -> bytes:
        """The response for ``outcome``: 200 to relay, else an error response after which the proxy closes."""
        return _REPLIES.get(outcome, _OTHER_FAILURE)

    def _parse(self, held: int, beyond: bytes) -> Outcome:
        """The outcome once the buffer (``held`` bytes of it already seen) decides one, else None."""
        if self._target is None:
            newline = self._buffer.find(b"\n", held)  # the first line had no LF in the part already seen
            if newline < 0:
                if _BAD_PARTIAL_LINE.search(self._buffer, max(0, held - 1)):  # a CR last time, and now?
                    return self._refuse(MALFORMED, "the request line is not printable ASCII")
            else:
                target = self._request_line(self._buffer[:newline])
                if isinstance(target, Refusal):
                    return target
                self._target = target
        end = _END_OF_HEADERS.search(self._buffer, max(0, held - 2))  # an end that straddles two reads too
        if end is None:
            if len(self._buffer) >= MAX_REQUEST_BYTES:
                return self._refuse(TOO_LARGE, f"no end of the request headers in the first {MAX_REQUEST_BYTES} bytes")
            return None
        for line in self._buffer[:end.start()].split(b"\n")[1:]:
            refusal = self._header_line(line[:-1] if line.endswith(b"\r") else line)
            if refusal is not None:
                return refusal
        host, port = self._target  # set: the request line ends at or before the empty line
        return Request(host, port, self._buffer[end.end():] + beyond)

    def _request_line(self, line: bytes) -> Union[Tuple[str, int], Refusal]:
        """``(host, port)`` from ``CONNECT host:port HTTP/1.x``, or the Refusal of any other request line."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if _NOT_PRINTABLE.search(line):
            return self._refuse(MALFORMED, "the request line is not printable ASCII")
        parts = line.split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _HTTP_VERSION.fullmatch(parts[2]):
            return self._refuse(MALFORMED, f"request line {short_repr(line.decode('ascii'))} is not "
                                           "METHOD TARGET HTTP/x.y")
        method, target, version = (part.decode("ascii") for part in parts)
        if method != "CONNECT":
            return self._refuse(METHOD, f"method {short_repr(method)} is not CONNECT")
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return self._refuse(VERSION, f"{short_repr(version)} is not HTTP/1.0 or HTTP/1.1")
        authority = _authority(target)
        if authority is None:
            return self._refuse(MALFORMED, f"CONNECT target {short_repr(target)} is not host:port or [IPv6]:port")
        return authority

    def _header_line(self, line: bytes) -> Optional[Refusal]:
        """None for a ``name: value`` line; a Refusal for anything else, obs-fold included (RFC 9112 5.2)."""
        if line[:1] in (b" ", b"\t"):
            return self._refuse(MALFORMED, f"folded header line {short_repr(line)}")
        if not _FIELD_LINE.fullmatch(line):
            return self._refuse(MALFORMED, f"header line {short_repr(line)} is not 'name: value'")
        return None

    def _refuse(self, outcome: str, reason: str) -> Refusal:
        return Refusal(reason, outcome, self.reply(outcome))


def _authority(target: str) -> Optional[Tuple[str, int]]:
    """``(host, port)`` from ``host:port`` or ``[IPv6]:port`` (brackets dropped), or None if it is neither.

    The host is kept as spelled (case, trailing dot, loose IPv4 forms): the allowlist judges it.
    Only what cannot be an authority is refused here: userinfo, paths, %-encoding, zone indexes.
    """
    if target.startswith("["):
        host, separator, port = target[1:].partition("]:")
        if not isinstance(parse_ip(host), ipaddress.IPv6Address):
            return None
    else:
        host, separator, port = target.partition(":")
        if not _REG_NAME.fullmatch(host):
            return None
    if not separator or not _PORT.fullmatch(port) or not 0 < int(port) <= 65535:
        return None
    return host, int(port)
