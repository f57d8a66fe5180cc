"""Moves one direction of a connection's bytes, verbatim, with backpressure and half-close.

The copy runs on raw non-blocking file descriptors driven by the gevent hub's
own io watchers (what gevent's sockets do inside), so one loop serves vsock,
TCP and Unix sockets alike.  Buffers come from a shared free list and are held
only while a chunk is in flight: an idle connection holds no buffer at all, and
a slow reader holds exactly one, which is the backpressure bound.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from gevent.hub import get_hub

CHUNK_BYTES = 256 * 1024
READ, WRITE = 1, 2


class PeerError(Exception):
    """A socket failed mid-stream; ``side`` names which peer it belongs to."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error

    def __str__(self) -> str:
        return f"{self.side} {self.error.strerror or self.error}"


class BufferPool:
    """Reusable chunk buffers shared by every pipe in the process."""

    def __init__(self, size: int = CHUNK_BYTES, keep: int = 64) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buffer)


BUFFERS = BufferPool()


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


def pipe(flow: Flow, buffers: BufferPool = BUFFERS) -> None:
    """Copy ``flow.source`` to ``flow.sink`` until EOF, then shut down the sink's write side.

    Returns normally on EOF; raises PeerError naming the side that failed.
    """
    hub = get_hub()
    source_fd = flow.source.fileno()
    sink_fd = flow.sink.fileno()
    readable = hub.loop.io(source_fd, READ)
    writable = hub.loop.io(sink_fd, WRITE)
    try:
        while True:
            buffer = buffers.take()
            try:
                received = os.readv(source_fd, (buffer,))
                if received:
                    _write_all(sink_fd, memoryview(buffer)[:received], writable, hub, flow.sink_name)
            except BlockingIOError:
                received = None
            except OSError as exc:
                raise PeerError(flow.source_name, exc) from None
            finally:
                buffers.give(buffer)
            if received is None:
                hub.wait(readable)
            elif received:
                flow.bytes += received
                flow.last_active = time.monotonic()
            else:
                break
        try:
            flow.sink.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # vsock (unlike TCP) says ENOTCONN once the peer has closed completely:
            # everything was delivered and there is nobody left to tell about EOF.
            if exc.errno != errno.ENOTCONN:
                raise PeerError(flow.sink_name, exc) from None
    finally:
        readable.close()
        writable.close()


def _write_all(fd: int, data: memoryview, writable, hub, side: str) -> None:
    """Write all of ``data``, parking the greenlet whenever the peer's window is full."""
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            hub.wait(writable)
        except OSError as exc:
            raise PeerError(side, exc) from None
