"""The metrics endpoint: a small HTTP responder that no client can make costly to the proxy.

gevent's WSGI server kept every connection for as long as its client liked,
so idle or trickling clients could take the descriptors the enclave's
connections need.  This one serves at most MAX_SCRAPES connections at once
(further clients wait in a small kernel backlog, which costs the process
nothing), gives each REQUEST_DEADLINE seconds in all to send a request head of
at most MAX_HEAD_BYTES and take the answer, then closes it.  Only ``GET`` (or
``HEAD``) of ``/metrics`` or ``/`` is served; anything else gets a 4xx status.
What clients send reaches the log only escaped and at debug level, and no
failure prints a traceback.
"""

from __future__ import annotations

import logging
import re
import socket
from http import HTTPStatus

import gevent
import gevent.socket
from gevent.pool import Pool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from vsockproxy.hostnames import short_repr
from vsockproxy.listen import AcceptingServer, describe_peer

log = logging.getLogger("vsockproxy")

MAX_SCRAPES = 4
BACKLOG = 8
REQUEST_DEADLINE = 5.0
MAX_HEAD_BYTES = 8 * 1024
MAX_HEADER_LINES = 100

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_VERSION = re.compile(rb"HTTP/1\.[01]")


class DeadlinePassed(Exception):
    """The client took more than REQUEST_DEADLINE seconds for its whole exchange."""


def metrics_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises OSError, or socket.gaierror if ``host`` does not resolve.

    A name binds its first IPv4 address, as before; an IPv6 address literal binds IPv6.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    family, kind, proto, _, address = gevent.socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                                                socket.AI_PASSIVE)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


class MetricsServer(AcceptingServer):
    """Answers each scrape with ``registry`` in Prometheus' text format, then closes the connection."""

    log_prefix = "metrics: "

    def __init__(self, listener: socket.socket, registry: CollectorRegistry) -> None:
        super().__init__(listener, spawn=Pool(MAX_SCRAPES))
        self.registry = registry

    def handle(self, client: socket.socket, address: object) -> None:
        """Answer one request; gevent closes ``client`` when this returns.  Never raises."""
        peer = describe_peer(address)
        try:
            with gevent.Timeout(REQUEST_DEADLINE, DeadlinePassed):
                client.sendall(self._answer(*_read_head(client), peer))
        except DeadlinePassed:
            log.debug("metrics: %s took more than %g s, closed", peer, REQUEST_DEADLINE)
        except OSError as exc:
            log.debug("metrics: %s: %s", peer, exc.strerror or exc)
        except Exception as exc:  # a bug: one line, and the endpoint carries on
            log.error("metrics: internal error answering %s: %s", peer, short_repr(exc))

    def _answer(self, head: bytes, whole: bool, peer: str) -> bytes:
        lines = _LINE_END.split(head)
        parts = lines[0].split(b" ")
        if not whole or len(lines) - 1 > MAX_HEADER_LINES:
            status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
        elif len(parts) != 3 or not _VERSION.fullmatch(parts[2]):
            status = HTTPStatus.BAD_REQUEST
        elif parts[0] not in (b"GET", b"HEAD"):
            status = HTTPStatus.METHOD_NOT_ALLOWED
        elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            status = HTTPStatus.NOT_FOUND
        else:
            return _response(HTTPStatus.OK, generate_latest(self.registry), CONTENT_TYPE_LATEST,
                             head_only=parts[0] == b"HEAD")
        log.debug("metrics: %d for %s from %s", status, short_repr(lines[0]), peer)
        return _response(status, f"{status.value} {status.phrase}\n".encode(), "text/plain; charset=utf-8")


def _read_head(client: socket.socket) -> tuple[bytes, bool]:
    """The request head without its blank line and True, or its first MAX_HEAD_BYTES and False.

    Raises ConnectionError if the client closes before the head is whole.
    """
    head = b""
    while len(head) < MAX_HEAD_BYTES:
        chunk = client.recv(MAX_HEAD_BYTES - len(head))
        if not chunk:
            raise ConnectionError("closed before sending a whole request")
        head += chunk
        end = _END_OF_HEAD.search(head)
        if end is not None:
            return head[:end.start()], True
    return head, False


def _response(status: HTTPStatus, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    allow = "Allow: GET, HEAD\r\n" if status == HTTPStatus.METHOD_NOT_ALLOWED else ""
    head = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{allow}Connection: close\r\n\r\n").encode()
    return head if head_only else head + body
