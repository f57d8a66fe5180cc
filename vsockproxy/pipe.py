"""Moves one direction of a connection's bytes, verbatim, with backpressure and half-close.

Bytes go socket -> kernel pipe -> socket with ``splice(2)``, so they never
pass through Python; where the kernel refuses to splice a socket, a copy loop
through a user-space buffer takes over.  Both run on raw non-blocking file
descriptors driven by the gevent hub's own io watchers (what gevent's sockets
do inside), so one loop serves vsock, TCP and Unix sockets alike.

A read that fails with ENOTCONN is an end of stream: vsock reports it instead
of EOF once the peer has closed and we have shut down our own write side (its
shutdown clears SOCK_DONE), and a stream socket that is no longer connected
has nothing left to read.

Kernel pipes and buffers come from shared free lists and are held only while
a chunk is in flight: an idle connection holds neither, and a slow reader
holds exactly one, which is the backpressure bound.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Callable, Generic, TypeVar

from gevent.hub import get_hub

CHUNK_BYTES = 256 * 1024
PIPE_BYTES = 1024 * 1024
READ, WRITE = 1, 2
T = TypeVar("T")
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class PeerError(Exception):
    """A socket failed mid-stream; ``side`` names which peer it belongs to."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error

    def __str__(self) -> str:
        return f"{self.side} {self.error.strerror or self.error}"


class FreeList(Generic[T]):
    """Spare buffers or pipes shared by every connection in the process.

    An item is taken only while a chunk is in flight and given back (empty)
    as soon as it is not, so idle connections hold none; at most ``keep``
    spares are kept, the rest are discarded.
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


class KernelPipe:
    """A non-blocking pipe used as the splice buffer between two sockets."""

    __slots__ = ("read_fd", "write_fd", "capacity")

    def __init__(self, size: int = PIPE_BYTES) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, size)
        except OSError:  # over the per-user pipe allowance: keep the default size
            self.capacity = fcntl.fcntl(self.write_fd, F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


BUFFERS: FreeList[bytearray] = FreeList(lambda: bytearray(CHUNK_BYTES), keep=64)
PIPES: FreeList[KernelPipe] = FreeList(KernelPipe, keep=16, discard=KernelPipe.close)


class SpliceRefused(Exception):
    """Splicing is impossible here (the socket does not support it, or no pipe can be had); copy instead."""


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


def pipe(flow: Flow, buffers: FreeList[bytearray] = BUFFERS, pipes: FreeList[KernelPipe] = PIPES) -> None:
    """Move ``flow.source`` to ``flow.sink`` until EOF, then shut down the sink's write side.

    Returns normally on EOF; raises PeerError naming the side that failed.
    """
    hub = get_hub()
    readable = hub.loop.io(flow.source.fileno(), READ)
    writable = hub.loop.io(flow.sink.fileno(), WRITE)
    try:
        try:
            _splice_loop(flow, readable, writable, hub, pipes)
        except SpliceRefused:
            _copy_loop(flow, readable, writable, hub, buffers)
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


def _splice_loop(flow: Flow, readable, writable, hub, pipes: FreeList[KernelPipe]) -> None:
    """Fill a kernel pipe from the source, drain it into the sink, until EOF."""
    source_fd, sink_fd = flow.source.fileno(), flow.sink.fileno()
    kernel_pipe: KernelPipe | None = None
    pending = 0
    try:
        while True:
            if kernel_pipe is None:
                try:
                    kernel_pipe = pipes.take()
                except OSError:  # out of fds: nothing is pending, so copying can carry on
                    raise SpliceRefused from None
            try:
                moved = os.splice(source_fd, kernel_pipe.write_fd, kernel_pipe.capacity, flags=SPLICE_FLAGS)
            except BlockingIOError:
                moved = None
            except OSError as exc:
                if exc.errno == errno.EINVAL and flow.bytes == 0:
                    raise SpliceRefused from None
                if exc.errno != errno.ENOTCONN:
                    raise PeerError(flow.source_name, exc) from None
                moved = 0  # see the module docstring
            pending = moved or 0
            while pending:
                try:
                    sent = os.splice(kernel_pipe.read_fd, sink_fd, pending, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    hub.wait(writable)
                    continue
                except OSError as exc:
                    raise PeerError(flow.sink_name, exc) from None
                pending -= sent
                flow.bytes += sent
            if moved == 0:
                return
            if moved is None:
                pipes.give(kernel_pipe)  # empty: idle connections hold no pipe
                kernel_pipe = None
                hub.wait(readable)
            else:
                flow.last_active = time.monotonic()
    finally:
        if kernel_pipe is not None:
            if pending:  # bytes left behind by a failure: this pipe cannot be reused
                kernel_pipe.close()
            else:
                pipes.give(kernel_pipe)


def _copy_loop(flow: Flow, readable, writable, hub, buffers: FreeList[bytearray]) -> None:
    """Copy through a user-space buffer until EOF."""
    source_fd, sink_fd = flow.source.fileno(), flow.sink.fileno()
    while True:
        buffer = buffers.take()
        try:
            received = os.readv(source_fd, (buffer,))
            if received:
                _write_all(sink_fd, memoryview(buffer)[:received], writable, hub, flow.sink_name)
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
        else:
            return


def _write_all(fd: int, data: memoryview, writable, hub, side: str) -> None:
    """Write all of ``data``, parking the greenlet whenever the peer's window is full."""
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            hub.wait(writable)
        except OSError as exc:
            raise PeerError(side, exc) from None
