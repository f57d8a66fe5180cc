"""Moves one direction of a connection's bytes, verbatim, with backpressure and half-close.

Each chunk is read into a large buffer and written out before the next read,
on raw non-blocking file descriptors driven by the gevent hub's own io
watchers (what gevent's sockets do inside), so one loop serves vsock, TCP and
Unix sockets alike.  A sink that stops reading leaves the chunk parked and the
source unread: the kernel's windows push back on the sender.

Copying, not splice(2): the proxy's real path has vsock on one side, which
cannot splice without a kernel copy of its own, and a large user-space chunk
per wake-up moves a single stream faster than a kernel pipe's worth.
Buffers are anonymous mappings, so only the pages a read fills are ever
resident.

A read that fails with ENOTCONN is an end of stream: vsock reports it instead
of EOF once the peer has closed and we have shut down our own write side (its
shutdown clears SOCK_DONE), and a stream socket that is no longer connected
has nothing left to read.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import time
from typing import Callable, Generic, TypeVar

from gevent.hub import Waiter, get_hub

#: A flow reads into a small buffer until a read fills one (the source has a backlog: bulk),
#: then into a large one until a read brings less than a small one again: a large chunk per
#: wake-up is what makes a single bulk stream fast, and a small one keeps ping-pong latency low.
SMALL_CHUNK_BYTES = 64 * 1024
CHUNK_BYTES = 2 * 1024 * 1024
#: Bytes a pipe moves before it lets other connections run (see _copy_loop and _write_all).
FAIR_SHARE_BYTES = 512 * 1024
#: While a write waits for the peer's window, how often to make sure the peer still exists.
PEER_CHECK_SECONDS = 1.0
READ, WRITE = 1, 2
T = TypeVar("T")


class PeerError(Exception):
    """A socket failed mid-stream; ``side`` names which peer it belongs to."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error

    def __str__(self) -> str:
        return f"{self.side} {self.error.strerror or self.error}"


class FreeList(Generic[T]):
    """Spare buffers shared by every connection in the process.

    A buffer is taken only while a chunk is in flight and given back as soon
    as it is not, so idle connections hold none; at most ``keep`` spares are
    kept, the rest are discarded.
    """

    def __init__(self, make: Callable[[], T], keep: int, discard: Callable[[T], None] | None = None) -> None:
        self._make = make
        self._discard = discard
        self.keep = keep
        self._free: list[T] = []

    def take(self) -> T:
        return self._free.pop() if self._free else self._make()

    def give(self, item: T) -> None:
        if len(self._free) < self.keep:
            self._free.append(item)
        elif self._discard is not None:
            self._discard(item)


def _unmap(buffer: mmap.mmap) -> None:
    """Unmap a spare now or, while an unwinding traceback still views it, when its last view goes."""
    try:
        buffer.close()
    except BufferError:
        pass


SMALL_BUFFERS: FreeList[mmap.mmap] = FreeList(lambda: mmap.mmap(-1, SMALL_CHUNK_BYTES), keep=64, discard=_unmap)
LARGE_BUFFERS: FreeList[mmap.mmap] = FreeList(lambda: mmap.mmap(-1, CHUNK_BYTES), keep=8, discard=_unmap)


class Flow:
    """One direction of a connection: the bytes its sink has taken so far, and when a byte last moved."""

    __slots__ = ("source", "sink", "source_name", "sink_name", "bytes", "last_active")

    def __init__(self, source: socket.socket, source_name: str, sink: socket.socket, sink_name: str) -> None:
        self.source = source
        self.sink = sink
        self.source_name = source_name
        self.sink_name = sink_name
        self.bytes = 0
        self.last_active = time.monotonic()


def pipe(flow: Flow) -> None:
    """Move ``flow.source`` to ``flow.sink`` until EOF, then shut down the sink's write side.

    Returns normally on EOF; raises PeerError naming the side that failed.
    """
    hub = get_hub()
    readable = hub.loop.io(flow.source.fileno(), READ)
    try:
        _copy_loop(flow, readable, hub)
        try:
            flow.sink.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # vsock (unlike TCP) says ENOTCONN once the peer has closed completely:
            # everything was delivered and there is nobody left to tell about EOF.
            if exc.errno != errno.ENOTCONN:
                raise PeerError(flow.sink_name, exc) from None
    finally:
        readable.close()


def _copy_loop(flow: Flow, readable, hub) -> None:
    """Read a chunk, write all of it, repeat until EOF; wait on the hub whenever a side would block.

    A read that brings less than a small chunk has emptied the source, so the pipe
    waits for it before reading again: the read straight after would only say EAGAIN,
    a system call per message (two per short connection) for nothing.

    Every FAIR_SHARE_BYTES moved, the pipe waits for its source again even if it
    has more: a bulk stream whose source and sink never block would otherwise hold
    the event loop for as long as it lasts, and every other connection's latency
    with it.  (A plain ``gevent.sleep(0)`` would not do: the hub runs callbacks for
    up to a switch interval before it polls the sockets again.)
    """
    source_fd = flow.source.fileno()
    backlog = False
    since_yield = 0
    while True:
        buffers = LARGE_BUFFERS if backlog else SMALL_BUFFERS
        buffer = buffers.take()
        try:
            received = os.readv(source_fd, (buffer,))
            if received:
                flow.last_active = time.monotonic()
                _write_all(flow, memoryview(buffer)[:received], hub)
        except BlockingIOError:
            received = None
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise PeerError(flow.source_name, exc) from None
            received = 0  # see the module docstring
        finally:
            buffers.give(buffer)
        if received is None:
            hub.wait(readable)
            since_yield = 0
        elif received:
            backlog = received >= SMALL_CHUNK_BYTES
            since_yield += received
            if not backlog:
                since_yield = 0
                hub.wait(readable)  # the source is empty for now
            elif since_yield >= FAIR_SHARE_BYTES:
                since_yield = 0
                hub.wait(readable)  # a turn of the loop: the other connections' ready sockets first
        else:
            return


def _write_all(flow: Flow, data: memoryview, hub) -> None:
    """Write all of ``data``, counting each byte as it goes out, parking whenever the peer's window is full.

    A large chunk goes out FAIR_SHARE_BYTES at a time, with a turn of the loop
    between them, so that one bulk stream does not hold up its process for a
    whole 2 MiB chunk.  Most chunks go out in one write, so the watchers are made
    only when one blocks or a turn is due.  While parked, the peer is checked
    every PEER_CHECK_SECONDS: a vsock whose peer has closed with our data unread
    never reports writable, nor an error, but a zero-byte send on it fails with
    EPIPE.
    """
    fd = flow.sink.fileno()
    writable = peer_check = None
    try:
        while data:
            try:
                written = os.write(fd, data[:FAIR_SHARE_BYTES])
            except BlockingIOError:
                written = 0
            except OSError as exc:
                raise PeerError(flow.sink_name, exc) from None
            if written:
                data = data[written:]
                flow.bytes += written
                flow.last_active = time.monotonic()
                if written < FAIR_SHARE_BYTES or not data:
                    continue
            if writable is None:
                writable = hub.loop.io(fd, WRITE)
                peer_check = hub.loop.timer(PEER_CHECK_SECONDS)
            if not _wait_writable(hub, writable, peer_check):
                _check_peer(flow)
    finally:
        if writable is not None:
            writable.close()
            peer_check.close()


def _wait_writable(hub, writable, peer_check) -> bool:
    """Park until the sink can take more (True) or the peer check is due (False)."""
    waiter = Waiter(hub)
    writable.start(waiter.switch, True)
    peer_check.start(waiter.switch, False)
    try:
        return waiter.get()
    finally:
        writable.stop()
        peer_check.stop()


def _check_peer(flow: Flow) -> None:
    """Raise PeerError if the sink's peer can no longer receive anything."""
    try:
        flow.sink.send(b"")
    except BlockingIOError:
        pass
    except OSError as exc:
        raise PeerError(flow.sink_name, exc) from None
