"""What a request-routed service learns from a connection's first bytes: the target the enclave asks for.

A ``fixed`` service knows its target before anyone connects.  A service in mode
``http-connect``, ``socks5`` or ``sni`` reads it from the connection: a parser is
fed the bytes as they arrive and says what to send back meanwhile, then gives a
Request or a Refusal.  The server does the reading (bounded in bytes and time)
and the allowlist the deciding; parsers only parse, so they are fuzzed without
sockets.  Nothing here imports gevent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple, Union

#: A request (and, with ``verify_sni``, the relayed stream's ClientHello) must fit in this many bytes.
MAX_REQUEST_BYTES = 8 * 1024

# How a request ended, as the enclave is told (Parser.reply) and as metrics and logs name it.
CONNECTED = "connected"        # the target accepted: relay
NOT_ALLOWED = "not-allowed"    # the allowlist does not admit host:port
UNREACHABLE = "unreachable"    # no address: DNS failed, or every address failed but not by refusal or timeout
REFUSED = "refused"            # every address refused the connection
TIMED_OUT = "timed-out"        # connecting took longer than connect_timeout
TOO_LARGE = "too-large"        # the request did not fit in MAX_REQUEST_BYTES
TOO_SLOW = "too-slow"          # the request did not arrive within the handshake timeout


@dataclass(frozen=True)
class Request:
    """The target a connection asks for, and the bytes it sent after asking, which go to the target first."""

    host: str                 # a DNS name or an IP literal (no brackets), as requested; the allowlist judges it
    port: int
    early_data: bytes = b""   # for ``sni``: every byte read, the whole ClientHello


@dataclass(frozen=True)
class Refusal:
    """A request that cannot be served: why (for the log), its outcome label, and the enclave's last words."""

    reason: str      # one line; logs.py escapes it, so it may quote the request
    outcome: str     # a short fixed label for metrics, e.g. "malformed", "unsupported"; never request text
    reply: bytes = b""


Outcome = Optional[Union[Request, Refusal]]


class Parser(Protocol):
    """One connection's request reader; a fresh one per connection."""

    def feed(self, data: bytes) -> Tuple[bytes, Outcome]:
        """Take the next bytes read.  Returns what to send the enclave now (SOCKS5's method choice, say)
        and the outcome: None while more bytes are needed.  After an outcome, feed is not called again."""

    def reply(self, outcome: str) -> bytes:
        """What the enclave is told when the request ends as ``outcome`` (one of the constants above)."""
