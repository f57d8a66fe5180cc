"""Reading a request-routed connection's request, and answering it, within its limits.

The enclave's socket is a raw non-blocking one (see server.py), so waits park the
greenlet on the descriptor.  Every wait ends by a deadline, and nothing is kept
beyond MAX_REQUEST_BYTES: a slow or endless request costs its worker the
handshake timeout at most, and its memory 8 KiB.
"""

from __future__ import annotations

import socket
import time
from typing import Union

import gevent.select
import gevent.socket

from vsockproxy.handshake import MAX_REQUEST_BYTES, TOO_SLOW, Outcome, Parser, Refusal, Request
from vsockproxy.hostnames import HostError, canonical_host, parse_ip
from vsockproxy.sni import NO_SNI, NOT_TLS, SniParser

_RECV_SIZE = 4096
#: After a refusal, how long and how much of the client's remaining input is read and dropped.
LINGER_SECONDS = 1.0
LINGER_READS = 16


class HandshakeTimeout(Exception):
    """The deadline passed while waiting on the enclave."""


def read_request(sock: socket.socket, parser: Parser, deadline: float) -> Union[Request, Refusal]:
    """Feed ``parser`` what ``sock`` sends until it decides, answering it as it asks meanwhile."""
    received = 0
    try:
        while True:
            data = _recv(sock, min(_RECV_SIZE, MAX_REQUEST_BYTES + 1 - received), deadline)
            if not data:
                return Refusal(f"the enclave closed the connection after {received} byte(s), "
                               f"before its request was complete", "incomplete")
            received += len(data)
            to_send, outcome = parser.feed(data)
            if to_send:
                send_all(sock, to_send, deadline)
            if outcome is not None:
                return outcome
            if received > MAX_REQUEST_BYTES:  # a parser must refuse sooner; this keeps the bound if one does not
                return Refusal(f"no complete request in {MAX_REQUEST_BYTES} bytes", "too-large")
    except HandshakeTimeout:
        return Refusal(f"no complete request within the handshake timeout ({received} byte(s) read)",
                       TOO_SLOW, parser.reply(TOO_SLOW))
    except OSError as exc:
        return Refusal(f"the enclave's connection failed: {exc.strerror or exc}", "incomplete")


def answer(sock: socket.socket, data: bytes, deadline: float) -> bool:
    """Send a reply the enclave may never read; whether it all went out before the deadline."""
    try:
        send_all(sock, data, deadline)
    except (HandshakeTimeout, OSError):
        return False
    return True


def answer_and_close(sock: socket.socket, data: bytes, deadline: float) -> None:
    """Send a refusal, then read and drop what the client still sends until it closes (briefly, and bounded).

    Closing a TCP socket with unread input sends a reset, and a reset can destroy
    the reply before the client reads it (RFC 9112's "lingering close").
    """
    if not answer(sock, data, deadline) or not data:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = min(deadline, time.monotonic() + LINGER_SECONDS)
        for _ in range(LINGER_READS):
            if not _recv(sock, _RECV_SIZE, deadline):
                return
    except (HandshakeTimeout, OSError):
        pass


def client_hello_check(sock: socket.socket, target: socket.socket, requested_host: str, early_data: bytes,
                       deadline: float) -> tuple[str | None, bytes, int]:
    """``verify_sni``: when the relayed stream starts with a TLS ClientHello, its name must be the one requested.

    Returns a reason to refuse (None when the stream may go on), every byte read so
    far, which the target gets first, and how many bytes the target sent meanwhile:
    they go on to the enclave at once (a server that speaks first, as SMTP's and SSH's
    do, waits for nothing).  A stream that is not TLS goes on as it is.
    """
    parser = SniParser(0)
    read = early_data
    outcome: Outcome = parser.feed(early_data)[1] if early_data else None
    meanwhile = _TargetFirst(target, sock)
    try:
        while outcome is None:
            data = meanwhile.recv(MAX_REQUEST_BYTES + 1 - len(read), deadline)
            if not data:
                return "the enclave closed the connection inside its ClientHello", read, meanwhile.relayed
            read += data
            outcome = parser.feed(data)[1]
            if outcome is None and len(read) > MAX_REQUEST_BYTES:
                return f"no complete ClientHello in {MAX_REQUEST_BYTES} bytes", read, meanwhile.relayed
    except HandshakeTimeout:
        return "no complete ClientHello within the handshake timeout", read, meanwhile.relayed
    except OSError as exc:
        return f"the enclave's connection failed: {exc.strerror or exc}", read, meanwhile.relayed
    if isinstance(outcome, Refusal):
        if outcome.outcome == NOT_TLS or (outcome.outcome == NO_SNI and parse_ip(requested_host) is not None):
            return None, read, meanwhile.relayed  # not TLS at all; or no name to check, as for an address as such
        return f"its ClientHello cannot be checked: {outcome.reason}", read, meanwhile.relayed
    if _same_host(outcome.host, requested_host):
        return None, read, meanwhile.relayed
    return (f"its ClientHello names {outcome.host!r}, not the requested {requested_host!r}", read,
            meanwhile.relayed)


class _TargetFirst:
    """Reads the enclave while passing on to it whatever the target sends first.

    The target's bytes go out as they come and nothing of them is kept.  Once the
    target's side ends or fails, it is left alone: the relay that follows finds out.
    """

    def __init__(self, target: socket.socket, enclave: socket.socket) -> None:
        self.target = target
        self.enclave = enclave
        self.relayed = 0
        self._target_done = False

    def recv(self, size: int, deadline: float) -> bytes:
        """The enclave's next bytes (b"" at its end); raises HandshakeTimeout, or OSError from the enclave."""
        while True:
            try:
                return self.enclave.recv(size)
            except BlockingIOError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandshakeTimeout()
            watched = [self.enclave] if self._target_done else [self.enclave, self.target]
            readable = gevent.select.select(watched, [], [], remaining)[0]
            if self.target in readable:
                self._pass_on(deadline)

    def _pass_on(self, deadline: float) -> None:
        try:
            data = self.target.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._target_done = True
            return
        send_all(self.enclave, data, deadline)
        self.relayed += len(data)


def _same_host(a: str, b: str) -> bool:
    try:
        return canonical_host(a) == canonical_host(b)
    except HostError:
        return False


def send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            _wait(gevent.socket.wait_write, sock, deadline)


def _recv(sock: socket.socket, size: int, deadline: float) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            _wait(gevent.socket.wait_read, sock, deadline)


def _wait(wait, sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise HandshakeTimeout()
    wait(sock.fileno(), remaining, HandshakeTimeout())
