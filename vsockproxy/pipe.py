"""Moves one direction of a connection's bytes, verbatim, with backpressure and half-close.

Each chunk is read into a large buffer and written out before the next read,
on raw non-blocking file descriptors driven by the gevent hub's own io
watchers (what gevent's sockets do inside), so one loop serves vsock, TCP and
Unix sockets alike.  A sink that stops reading leaves the chunk parked and the
source unread: the kernel's windows push back on the sender.

Why copying and not splice(2): the proxy's real path has vsock on one side,
which cannot splice without a kernel copy of its own.  In scripts/bench,
copying ran single TCP streams about 50% faster than splice through a 1 MiB
kernel pipe, and over real vsock the two were within a few percent (the
commit that made the change has the numbers).
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

from gevent.hub import get_hub

#: A flow reads into a small buffer until a read fills one (the source has a backlog: bulk),
#: then into a large one until a read brings less than a small one again.  scripts/bench chose
#: both sizes: a large chunk per wake-up is what makes a single bulk stream fast, and a small
#: one keeps ping-pong latency low.
SMALL_CHUNK_BYTES = 64 * 1024
CHUNK_BYTES = 2 * 1024 * 1024
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
    """One direction of a connection and the bytes it has moved so far."""

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
    """Read a chunk, write all of it, repeat until EOF; wait on the hub whenever a side would block."""
    source_fd, sink_fd = flow.source.fileno(), flow.sink.fileno()
    backlog = False
    while True:
        buffers = LARGE_BUFFERS if backlog else SMALL_BUFFERS
        buffer = buffers.take()
        try:
            received = os.readv(source_fd, (buffer,))
            if received:
                _write_all(sink_fd, memoryview(buffer)[:received], hub, flow.sink_name)
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
        elif received:
            flow.bytes += received
            flow.last_active = time.monotonic()
            backlog = received >= SMALL_CHUNK_BYTES
        else:
            return


def _write_all(fd: int, data: memoryview, hub, side: str) -> None:
    """Write all of ``data``, parking the greenlet whenever the peer's window is full.

    Most chunks go out in one write, so the io watcher is made only when one blocks.
    """
    writable = None
    try:
        while data:
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                if writable is None:
                    writable = hub.loop.io(fd, WRITE)
                hub.wait(writable)
            except OSError as exc:
                raise PeerError(side, exc) from None
    finally:
        if writable is not None:
            writable.close()
