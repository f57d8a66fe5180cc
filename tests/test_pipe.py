"""vsockproxy.pipe on socketpairs: bytes verbatim, EOF becomes SHUT_WR, errors name the failing side."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import socket
import struct
import termios

import gevent
import gevent.socket
import pytest

from tests.helpers import recv_all, recv_exactly, wait_until
from vsockproxy.pipe import CHUNK_BYTES, FAIR_SHARE_BYTES, LARGE_BUFFERS, SMALL_BUFFERS, SMALL_CHUNK_BYTES, Flow, FreeList, PeerError, _unmap, pipe

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sockets():
    """Make gevent socketpairs / TCP pairs; all closed at teardown."""
    made: list[socket.socket] = []

    def unix_pair():
        a, b = gevent.socket.socketpair()
        for s in (a, b):
            s.settimeout(10)
        made.extend((a, b))
        return a, b

    def tcp_pair():
        with gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            a = gevent.socket.create_connection(listener.getsockname(), timeout=10)
            b, _ = listener.accept()
        for s in (a, b):
            s.settimeout(10)
        made.extend((a, b))
        return a, b

    yield unix_pair, tcp_pair
    for s in made:
        s.close()


def rig(make_pair):
    """writer -> source ==pipe==> sink -> reader; returns (writer, flow, reader)."""
    writer, source = make_pair()
    sink, reader = make_pair()
    return writer, Flow(source, "enclave", sink, "target"), reader


def run_pipe(flow):
    """Run pipe() in a greenlet, returning the greenlet; exceptions stay on it (not printed)."""
    def quietly():
        try:
            pipe(flow)
        except BaseException as exc:
            return exc
        return None
    return gevent.spawn(quietly)


@pytest.mark.parametrize("size", [0, 1, 4096, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024 + 7])
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_bytes_move_verbatim_then_eof(sockets, kind, size):
    unix_pair, tcp_pair = sockets
    writer, flow, reader = rig(unix_pair if kind == "unix" else tcp_pair)
    payload = os.urandom(size)
    worker = run_pipe(flow)
    sender = gevent.spawn(lambda: (writer.sendall(payload), writer.shutdown(socket.SHUT_WR)))
    received = recv_all(reader)
    sender.get(timeout=10)
    assert worker.get(timeout=10) is None
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert flow.bytes == size


def test_eof_shuts_down_only_the_sinks_write_side(sockets):
    unix_pair, _ = sockets
    writer, flow, reader = rig(unix_pair)
    worker = run_pipe(flow)
    writer.sendall(b"last words")
    writer.shutdown(socket.SHUT_WR)
    assert recv_all(reader) == b"last words"
    assert worker.get(timeout=5) is None
    # The sink can still receive: the other direction of a half-closed connection keeps flowing.
    reader.sendall(b"reply after EOF")
    assert flow.sink.recv(100) == b"reply after EOF"
    # And the source was not shut down for writing.
    flow.source.sendall(b"still open")
    assert writer.recv(100) == b"still open"


def test_pipe_does_not_close_either_socket(sockets):
    unix_pair, _ = sockets
    writer, flow, reader = rig(unix_pair)
    writer.shutdown(socket.SHUT_WR)
    assert run_pipe(flow).get(timeout=5) is None
    assert flow.source.fileno() >= 0 and flow.sink.fileno() >= 0


def test_many_small_writes_arrive_in_order(sockets):
    unix_pair, _ = sockets
    writer, flow, reader = rig(unix_pair)
    worker = run_pipe(flow)
    messages = [struct.pack("!I", i) * (i % 7 + 1) for i in range(2000)]

    def send():
        for message in messages:
            writer.sendall(message)
            if len(message) == 4:
                gevent.sleep(0)
        writer.shutdown(socket.SHUT_WR)

    sender = gevent.spawn(send)
    assert recv_all(reader) == b"".join(messages)
    sender.get(timeout=10)
    assert worker.get(timeout=5) is None


def test_backpressure_holds_bytes_in_the_kernel_not_in_memory(sockets):
    """A reader that stops reading stalls the pipe; nothing piles up in the process."""
    _, tcp_pair = sockets
    writer, flow, reader = rig(tcp_pair)
    worker = run_pipe(flow)
    writer.setblocking(False)
    chunk = os.urandom(64 * 1024)
    sent = bytearray()
    stalled_since = None
    while True:  # fill until the writer cannot send for 0.3 s
        try:
            n = writer.send(chunk)
            sent += chunk[:n]
            stalled_since = None
        except BlockingIOError:
            now = gevent.get_hub().loop.now()
            stalled_since = stalled_since or now
            if now - stalled_since > 0.3:
                break
            gevent.sleep(0.01)
        assert len(sent) < 256 * 1024 * 1024, "the pipe never pushed back"
    # What the pipe has read but not yet written is all it holds; the kernel holds the rest.
    # (Checked by the queues, not by waiting for silence: a loaded kernel may still reopen a window.)
    taken_from_source = len(sent) - _queued(writer, termios.TIOCOUTQ) - _queued(flow.source, termios.FIONREAD)
    held = taken_from_source - flow.bytes
    assert 0 <= held <= CHUNK_BYTES, f"the pipe holds {held} bytes while its sink is full"
    writer.setblocking(True)
    writer.settimeout(10)
    writer.shutdown(socket.SHUT_WR)
    received = recv_all(reader)
    assert worker.get(timeout=10) is None
    assert hashlib.sha256(received).digest() == hashlib.sha256(bytes(sent)).digest()


def _queued(sock, request: int) -> int:
    """Bytes in a socket's kernel queue: FIONREAD for what waits to be read, TIOCOUTQ for what is not yet acked."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def test_reset_source_raises_peer_error_naming_the_source(sockets):
    _, tcp_pair = sockets
    writer, flow, reader = rig(tcp_pair)
    worker = run_pipe(flow)
    writer.sendall(b"partial")
    assert reader.recv(100) == b"partial"
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()  # RST
    error = worker.get(timeout=5)
    assert isinstance(error, PeerError), error
    assert error.side == "enclave"
    assert error.error.errno == errno.ECONNRESET
    assert str(error).startswith("enclave ")


def test_broken_sink_raises_peer_error_naming_the_sink(sockets):
    unix_pair, _ = sockets
    writer, flow, reader = rig(unix_pair)
    reader.close()
    worker = run_pipe(flow)
    writer.sendall(b"nobody will read this")
    error = worker.get(timeout=5)
    assert isinstance(error, PeerError), error
    assert error.side == "target"
    assert error.error.errno in (errno.EPIPE, errno.ECONNRESET)
    assert "target" in str(error)


def test_side_names_come_from_the_flow(sockets):
    unix_pair, _ = sockets
    writer, source = unix_pair()
    sink, reader = unix_pair()
    reader.close()
    flow = Flow(source, "upstream-name", sink, "downstream-name")
    worker = run_pipe(flow)
    writer.sendall(b"x")
    error = worker.get(timeout=5)
    assert isinstance(error, PeerError) and error.side == "downstream-name"


def test_killing_the_pipe_greenlet_releases_its_watchers(sockets):
    """Greenlets are killed when the other direction fails; the sockets must stay usable (no stuck watchers)."""
    unix_pair, _ = sockets
    writer, flow, reader = rig(unix_pair)
    worker = gevent.spawn(pipe, flow)
    gevent.sleep(0.05)
    worker.kill(block=True, timeout=5)
    assert worker.dead
    # A second pipe on the same sockets works: the first left no io watcher behind.
    second = run_pipe(flow)
    writer.sendall(b"after kill")
    writer.shutdown(socket.SHUT_WR)
    assert recv_all(reader) == b"after kill"
    assert second.get(timeout=5) is None


def test_two_directions_at_once(sockets):
    """Both pipes of a connection run together on the same pair of sockets."""
    unix_pair, _ = sockets
    enclave_client, enclave = unix_pair()
    target, target_server = unix_pair()
    up = run_pipe(Flow(enclave, "enclave", target, "target"))
    down = run_pipe(Flow(target, "target", enclave, "enclave"))
    up_data, down_data = os.urandom(2 << 20), os.urandom(3 << 20)

    def send(sock, data):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    senders = [gevent.spawn(send, enclave_client, up_data), gevent.spawn(send, target_server, down_data)]
    got_down = gevent.spawn(recv_all, enclave_client)
    got_up = gevent.spawn(recv_all, target_server)
    assert got_up.get(timeout=10) == up_data
    assert got_down.get(timeout=10) == down_data
    gevent.joinall(senders, raise_error=True, timeout=10)
    assert up.get(timeout=5) is None and down.get(timeout=5) is None


def test_more_stalled_bulk_flows_than_spare_buffers(sockets):
    """Each stalled flow holds a large chunk; when they drain, spares beyond the kept few are unmapped."""
    _, tcp_pair = sockets
    flows = LARGE_BUFFERS.keep + 4
    rigs = [rig(tcp_pair) for _ in range(flows)]
    for _, flow, reader in rigs:  # small kernel buffers past the pipe: it stalls holding its chunk
        flow.sink.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    payloads = [os.urandom(3 * CHUNK_BYTES + i) for i in range(flows)]
    workers = [run_pipe(flow) for _, flow, _ in rigs]

    def send(sock, data):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    senders = [gevent.spawn(send, writer, data) for (writer, _, _), data in zip(rigs, payloads)]
    wait_until(lambda: all(flow.bytes for _, flow, _ in rigs), 10, "every flow to start")
    gevent.sleep(0.3)  # ... and to stall
    received = [gevent.spawn(recv_all, reader) for _, _, reader in rigs]  # only now do the readers start
    for got, data in zip(received, payloads):
        assert got.get(timeout=20) == data
    gevent.joinall(senders, raise_error=True, timeout=10)
    assert [worker.get(timeout=5) for worker in workers] == [None] * flows
    assert 0 < len(LARGE_BUFFERS._free) <= LARGE_BUFFERS.keep
    assert not any(buffer.closed for buffer in LARGE_BUFFERS._free)


def test_free_list_reuses_and_bounds_its_spares():
    pool = FreeList(lambda: bytearray(16), keep=2)
    a, b, c = pool.take(), pool.take(), pool.take()
    assert len(a) == 16 and a is not b
    for buffer in (a, b, c):
        pool.give(buffer)
    assert len(pool._free) == 2
    assert pool.take() in (a, b)


def test_free_list_unmaps_the_buffers_it_does_not_keep():
    pool = FreeList(lambda: mmap.mmap(-1, CHUNK_BYTES), keep=1, discard=_unmap)
    kept, extra = pool.take(), pool.take()
    pool.give(kept)
    pool.give(extra)
    assert extra.closed and not kept.closed
    assert pool.take() is kept


def test_a_buffer_still_viewed_is_unmapped_by_its_last_view():
    """A killed pipe's traceback may still view its chunk when the buffer is discarded."""
    buffer = mmap.mmap(-1, CHUNK_BYTES)
    view = memoryview(buffer)[:10]
    _unmap(buffer)  # does not raise
    assert not buffer.closed
    view.release()
    _unmap(buffer)
    assert buffer.closed


def test_wait_until_helper_fails_loudly():
    with pytest.raises(AssertionError, match="never"):
        wait_until(lambda: False, timeout=0.05, what="never")


class VsockLikeSink:
    """A sink whose peer has closed with our data unread, as vsock shows it: never writable, no error.

    Only a zero-byte send tells (EPIPE); the socket is a real, full socketpair end.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.probes = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes) -> int:
        self.probes += 1
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def test_a_write_parked_on_a_departed_vsock_peer_ends_within_the_peer_check(sockets, monkeypatch):
    """The enclave closed with replies unread: the pipe must fail, not wait for writable forever."""
    monkeypatch.setattr("vsockproxy.pipe.PEER_CHECK_SECONDS", 0.2)
    unix_pair, _ = sockets
    writer, source = unix_pair()
    sink, _never_read = unix_pair()
    vsock_sink = VsockLikeSink(sink)
    worker = run_pipe(Flow(source, "target", vsock_sink, "enclave"))
    sender = gevent.spawn(writer.sendall, os.urandom(4 * CHUNK_BYTES))  # more than the sink's buffers take
    error = worker.get(timeout=5)
    sender.kill()
    assert isinstance(error, PeerError), error
    assert (error.side, error.error.errno) == ("enclave", errno.EPIPE)
    assert vsock_sink.probes == 1


def test_a_write_parked_on_a_live_peer_waits_and_the_check_changes_nothing(sockets, monkeypatch):
    monkeypatch.setattr("vsockproxy.pipe.PEER_CHECK_SECONDS", 0.05)
    unix_pair, _ = sockets
    writer, flow, reader = rig(unix_pair)
    payload = os.urandom(3 * CHUNK_BYTES)
    worker = run_pipe(flow)
    sender = gevent.spawn(lambda: (writer.sendall(payload), writer.shutdown(socket.SHUT_WR)))
    gevent.sleep(0.5)  # several peer checks while the reader reads nothing
    assert not worker.ready()
    received = recv_all(reader)
    sender.get(timeout=10)
    assert worker.get(timeout=10) is None
    assert received == payload


def test_bytes_count_as_they_are_written_not_per_chunk(sockets):
    """A connection cut mid-chunk reports exactly the bytes its sink took."""
    unix_pair, _ = sockets
    writer, flow, reader = rig(unix_pair)
    worker = run_pipe(flow)
    sender = gevent.spawn(writer.sendall, os.urandom(3 * CHUNK_BYTES))
    moved = wait_stalled_bytes(flow)
    worker.kill()
    sender.kill()
    delivered = 0
    reader.setblocking(False)
    while True:
        try:
            chunk = reader.recv(1 << 20)
        except BlockingIOError:
            break
        delivered += len(chunk)
    assert flow.bytes == moved == delivered


def wait_stalled_bytes(flow, quiet: float = 0.3) -> int:
    """``flow.bytes`` once it has stopped changing for ``quiet`` seconds."""
    last = -1
    while flow.bytes != last:
        last = flow.bytes
        gevent.sleep(quiet)
    return last


def test_a_flow_that_never_blocks_lets_other_connections_run(tmp_path, sockets):
    """A source and a sink that are always ready must not keep other sockets' events waiting."""
    size = 64 * CHUNK_BYTES
    source_path = tmp_path / "source"
    source_path.write_bytes(bytes(size))
    unix_pair, _ = sockets
    other, other_peer = unix_pair()
    other_peer.sendall(b"!")  # another connection with a byte ready, which its greenlet waits on
    with open(source_path, "rb") as source, open(os.devnull, "wb") as sink:
        flow = Flow(AlwaysReady(source), "target", AlwaysReady(sink), "enclave")
        seen_at_ticks: list[int] = []

        def tick() -> None:
            while True:
                seen_at_ticks.append(flow.bytes)
                gevent.socket.wait_read(other.fileno())

        ticker = gevent.spawn(tick)
        worker = run_pipe(flow)
        assert worker.get(timeout=20) is None
        ticker.kill()
    assert flow.bytes == size
    gaps = [b - a for a, b in zip(seen_at_ticks, seen_at_ticks[1:])]
    # Both are woken by the same poll, in either order: a gap may span two of the flow's turns,
    # but never a whole large chunk: it goes out a fair share at a time.
    assert max(gaps) <= 2 * FAIR_SHARE_BYTES + SMALL_CHUNK_BYTES < CHUNK_BYTES, (max(gaps), len(seen_at_ticks))


class AlwaysReady:
    """A file as a flow's end: reads and writes never block, and EOF needs no shutdown."""

    def __init__(self, file) -> None:
        self._file = file

    def fileno(self) -> int:
        return self._file.fileno()

    def shutdown(self, how: int) -> None:
        pass


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_short_message_costs_one_read_and_eof_one_more(sockets, kind, monkeypatch):
    """After a read that emptied the source, the pipe waits for it instead of reading again:
    a read straight after would only say EAGAIN, one system call per message for nothing."""
    unix_pair, tcp_pair = sockets
    writer, flow, reader = rig(unix_pair if kind == "unix" else tcp_pair)
    reads = []
    real_readv = os.readv

    def counting_readv(fd, buffers):
        try:
            result = real_readv(fd, buffers)
        except BlockingIOError:
            reads.append("EAGAIN")
            raise
        reads.append(result)
        return result

    monkeypatch.setattr("vsockproxy.pipe.os.readv", counting_readv)
    worker = run_pipe(flow)
    writer.sendall(b"hello")
    assert recv_exactly(reader, 5) == b"hello"
    wait_until(lambda: flow.bytes == 5)
    gevent.sleep(0.1)  # the pipe is parked now, with the source empty
    writer.shutdown(socket.SHUT_WR)
    assert worker.get(timeout=10) is None
    assert reads == [5, 0]
