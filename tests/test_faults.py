"""Faults injected end to end, on stand-ins: for each one the affected connection is closed, the
error is logged once for that connection, and the next connection works.

Two kinds of proxy run here, neither of which ever connects an AF_VSOCK socket:

* in this process: ``make_proxy`` (a VsockProxyServer on an injected TCP listener) with gevent
  targets and clients, and the log read from ``caplog``;
* in a subprocess: :class:`StandInProxy`, the real ``vsock-proxy`` command (CLI, supervisor,
  signal handling, log format) handed a TCP listener factory (scripts/bench_lib/run_vsockproxy.py) on
  127.0.0.1, so that its fds, RSS, CPU time and RLIMIT_NOFILE can be read and set from /proc.
  Its targets are threads and its clients blocking sockets, since this process then only waits.

The same faults over real vsock run in the VM: tests/e2e/test_vsock_faults.py.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import resource
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import gevent
import pytest
from gevent.server import StreamServer

from tests.helpers import (STAND_IN_RUNNER, FakeDNS, LoggedProcess, children_of, cli_env, echo, recv_all, recv_exactly,
                           tracked, wait_until)
from vsockproxy.pipe import CHUNK_BYTES
from vsockproxy.resolver import Resolver

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20


# =========================================================================== the stand-in subprocess

STAND_IN_VSOCK_PORT = 5005
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StandInProxy(LoggedProcess):
    """``vsock-proxy [options] 5005 127.0.0.1 TARGET_PORT`` on a TCP stand-in listener, in a subprocess.

    One process (``--processes 1``) unless the options say otherwise: the tests read its
    descriptors, memory, CPU time and limits, which a parent of workers would not show.
    """

    def __init__(self, config: Path, target_port: int, *options: str, start_timeout: float = 30) -> None:
        if "--processes" not in options:
            options = ("--processes", "1", *options)
        super().__init__([sys.executable, str(STAND_IN_RUNNER), "--stand-in", *options, str(STAND_IN_VSOCK_PORT),
                          "127.0.0.1", str(target_port), "--config", str(config)], cli_env())
        line = self.wait_for("stand-in listener:", timeout=start_timeout)
        host, _, port = line.rpartition(" ")[2].rpartition(":")
        self.address = (host, int(port))
        self.wait_for("listening on vsock port", timeout=start_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, timeout: float = 30) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def processes(self) -> list[int]:
        """Its PID, and its workers' with ``--processes N``."""
        return [self.pid, *sorted(children_of(self.pid))]

    def fds(self, pid: int | None = None) -> list[int]:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid or self.pid}/fd"))

    def socket_fds(self) -> int:
        """How many of its fds are sockets: the listener plus two per open connection."""
        return socket_fd_count(self.pid)

    def rss_kib(self, pid: int | None = None) -> int:
        with open(f"/proc/{pid or self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def set_nofile(self, limit: int) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (limit, limit))

    def wait_fds(self, predicate, timeout: float = 10, what: str = "fd count") -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            fds = self.fds()
            if predicate(len(fds)):
                return fds
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still {len(fds)} open fds after {timeout}s")
            time.sleep(0.05)

    def settled_fds(self, quiet: float = 0.5, timeout: float = 10, pid: int | None = None) -> list[int]:
        """The open fds once their number has not changed for ``quiet`` seconds (connections closing)."""
        deadline = time.monotonic() + timeout
        last, since = self.fds(pid), time.monotonic()
        while time.monotonic() - since < quiet:
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy's fd count kept changing for {timeout}s")
            time.sleep(0.05)
            fds = self.fds(pid)
            if len(fds) != len(last):
                last, since = fds, time.monotonic()
        return last

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        return self.finish(timeout=timeout)


@pytest.fixture
def stand_in(tmp_path):
    """``stand_in(target_port, *options)`` starts a StandInProxy; every one is killed at teardown."""
    started: list[StandInProxy] = []

    def start(target_port: int, *options: str) -> StandInProxy:
        config = tmp_path / f"allowlist-{len(started)}.yaml"
        config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {target_port}}}\n")
        proxy = StandInProxy(config, target_port, *options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.kill()


def socket_fd_count(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except FileNotFoundError:  # closed meanwhile
            pass
    return count


def wait_socket_fds(pid: int, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while socket_fd_count(pid) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the proxy has {socket_fd_count(pid)} sockets open, not {count}, "
                                 f"after {timeout}s")
        time.sleep(0.05)


def raise_own_nofile(at_least: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < at_least:
        wanted = at_least if hard == resource.RLIM_INFINITY else min(at_least, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def problems_in(lines: list[str]) -> list[str]:
    """Lines that must never appear: tracebacks, gevent's error reports, ERROR-level log lines."""
    return [line for line in lines
            if "Traceback" in line or " ERROR " in line or line.startswith("ERROR:") or "failed with" in line]


def closed_how(sock: socket.socket, timeout: float = 10) -> str:
    """'eof' or 'reset' once the peer has closed (discarding any bytes still arriving); fails on a hang."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except socket.timeout:
        raise AssertionError(f"the connection was still open after {timeout}s") from None
    return "eof"


def peer_name(sock: socket.socket) -> str:
    """How the proxy's log names this client: ``enclave=HOST:PORT``."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


# =========================================================================== in-process helpers

@pytest.fixture
def log(caplog, capfd):
    """The proxy's log records; at teardown, no ERROR line, no traceback, nothing printed by gevent."""
    caplog.set_level(logging.INFO, logger="vsockproxy")
    yield caplog
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], errors
    printed = capfd.readouterr().err
    assert "Traceback" not in printed and "failed with" not in printed, printed


def lines_for(caplog, peer: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vsockproxy" and f"enclave={peer} " in r.getMessage()]


def the_one_line(caplog, proxy, peer: str, timeout: float = 10) -> logging.LogRecord:
    """The single log line about connection ``peer``, once the proxy is done with it."""
    wait_until(lambda: lines_for(caplog, peer), timeout, f"a log line for enclave={peer}")
    wait_until(lambda: proxy.server.active_connections == 0, timeout, "the proxy to finish the connection")
    gevent.sleep(0.05)
    records = lines_for(caplog, peer)
    assert len(records) == 1, [r.getMessage() for r in records]
    return records[0]


def assert_next_connection_works(proxy, caplog, size: int = 256 * 1024) -> None:
    """A hash-checked echo of ``size`` bytes through ``proxy`` (whose target must echo), logged as eof."""
    payload = os.urandom(size)
    with proxy.connect(timeout=20) as client:
        peer = peer_name(client)
        sender = gevent.spawn(lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
        echoed = recv_all(client)
        sender.get(timeout=20)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest(), "echo corrupted"
    record = the_one_line(caplog, proxy, peer)
    assert f"up={size} down={size}" in record.getMessage() and "end=eof" in record.getMessage(), \
        record.getMessage()


class HeldPort:
    """A TCP port on 127.0.0.1 that is bound but not listening, so connects to it are refused (RST)
    without any race for the port; ``serve(handler)`` later makes it a working target."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server: StreamServer | None = None

    def serve(self, handler, backlog: int = 128) -> None:
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.server = StreamServer(self.sock, lambda sock, _address: handler(sock))
        self.server.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=1)
        self.sock.close()


@pytest.fixture
def held_port():
    yield from tracked(HeldPort, HeldPort.close)


def rst_close(sock) -> None:
    """Close with SO_LINGER 0: the peer gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# =========================================================================== target refuses

def test_target_refuses(make_proxy, held_port, log):
    refusing = held_port()
    proxy = make_proxy(refusing.port)
    with proxy.connect() as client:
        peer = peer_name(client)
        assert closed_how(client) == "eof"
    record = the_one_line(log, proxy, peer)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (f"refused enclave={peer} target=127.0.0.1:{refusing.port}: "
                                   f"127.0.0.1:{refusing.port}: Connection refused")

    refusing.serve(echo)
    assert_next_connection_works(proxy, log)


# =========================================================================== target resets mid-stream

def test_target_accepts_then_resets_mid_stream(make_proxy, tcp_target, log):
    partial = os.urandom(300 * 1024)

    def reset_mid_stream(sock):
        recv_exactly(sock, 5)
        sock.sendall(partial)
        gevent.sleep(0.2)  # the proxy has relayed the partial reply; now the RST
        rst_close(sock)

    target = tcp_target(reset_mid_stream)
    proxy = make_proxy(target.port)
    with proxy.connect() as client:
        peer = peer_name(client)
        client.sendall(b"hello")
        assert recv_exactly(client, len(partial)) == partial
        assert closed_how(client) in ("eof", "reset")
    record = the_one_line(log, proxy, peer)
    message = record.getMessage()
    assert message.startswith(f"closed enclave={peer} target=127.0.0.1:{target.port} "
                              f"up=5 down={len(partial)} "), message
    assert message.endswith("end=target-error(Connection reset by peer)"), message
    assert target.errors == []

    target.handler = echo
    assert_next_connection_works(proxy, log)


# =========================================================================== target blackholes

def test_target_blackholes_and_the_connect_timeout_fires(make_proxy, log):
    """A listener with listen(0) whose one queue slot is taken drops further SYNs: connects hang."""
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    server = None
    try:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        port = blackhole.getsockname()[1]
        for _ in range(3):  # the first fills the accept queue; the others stay in SYN-SENT
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(("127.0.0.1", port))
        gevent.sleep(0.1)
        with socket.socket() as probe:  # the stand-in really is a blackhole
            probe.settimeout(0.3)
            with pytest.raises(socket.timeout):
                probe.connect(("127.0.0.1", port))

        proxy = make_proxy(port, connect_timeout=0.5)
        with proxy.connect() as client:
            peer = peer_name(client)
            started = time.monotonic()
            assert closed_how(client) == "eof"
            waited = time.monotonic() - started
        assert 0.4 <= waited < 3, waited
        record = the_one_line(log, proxy, peer)
        assert record.levelno == logging.WARNING
        assert record.getMessage() == (f"refused enclave={peer} target=127.0.0.1:{port}: "
                                       f"127.0.0.1:{port}: timed out")

        for filler in fillers:
            filler.close()
        accepted = []
        blackhole.listen(128)  # the target comes back, with room in its queue
        blackhole.setblocking(False)
        server = StreamServer(blackhole, lambda sock, _address: (accepted.append(1), echo(sock)))
        server.start()
        wait_until(lambda: accepted, 5, "the queued filler to be taken")
        assert_next_connection_works(proxy, log)
    finally:
        for filler in fillers:
            filler.close()
        if server is not None:
            server.stop(timeout=1)
        blackhole.close()


# =========================================================================== DNS

@pytest.mark.parametrize("failure, reason", [
    ("EAI_AGAIN", "Temporary failure in name resolution"),
    ("NXDOMAIN", "Name or service not known"),
])
def test_dns_fails(make_proxy, tcp_target, log, failure, reason):
    """The name is allowed by name, so start-up needs no look-up; each connection resolves it."""
    target = tcp_target(echo)
    dns = FakeDNS({"svc.test": ["127.0.0.1"]})
    if failure == "EAI_AGAIN":
        dns.fail_next["svc.test"] = 1
    else:
        del dns.records["svc.test"]
    proxy = make_proxy(target.port, host="svc.test", resolver=Resolver(ttl=30, getaddrinfo=dns))
    with proxy.connect() as client:
        peer = peer_name(client)
        assert closed_how(client) == "eof"
    record = the_one_line(log, proxy, peer)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"refused enclave={peer} target=svc.test:{target.port}: " \
                                  f"cannot resolve svc.test: {reason}"
    assert target.accepted == 0

    dns.records["svc.test"] = ["127.0.0.1"]
    assert_next_connection_works(proxy, log)
    assert dns.count("svc.test") == 2  # the failure was not cached


# =========================================================================== enclave disconnects abruptly

def test_enclave_disconnects_abruptly_mid_transfer(make_proxy, tcp_target, log):
    """Bulk both ways, then the enclave sends an RST: the target's connection ends too, promptly."""
    outcome: dict[str, object] = {}
    block = os.urandom(CHUNK_BYTES)

    def bulk_both_ways(sock):
        def push():
            try:
                while True:
                    sock.sendall(block)
            except OSError as exc:
                return exc.errno

        pusher = gevent.spawn(push)
        received = 0
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    outcome["end"] = "eof"
                    break
                received += len(data)
        except OSError as exc:
            outcome["end"] = errno.errorcode.get(exc.errno, str(exc))
        outcome["received"] = received
        pusher.join(timeout=10)
        outcome["pusher"] = pusher.ready()

    target = tcp_target(bulk_both_ways)
    proxy = make_proxy(target.port)
    client = proxy.connect()
    peer = peer_name(client)
    try:
        uploader = gevent.spawn(lambda: client.sendall(os.urandom(64 * MIB)))
        assert len(recv_exactly(client, 4 * MIB)) == 4 * MIB
        uploader.kill()
    finally:
        rst_close(client)
    wait_until(lambda: "end" in outcome, 10, "the target's connection to end")
    assert outcome["end"] in ("eof", "ECONNRESET"), outcome
    assert outcome["received"] > 0 and outcome["pusher"], outcome
    record = the_one_line(log, proxy, peer)
    assert re.search(r" end=enclave-error\((Connection reset by peer|Broken pipe)\)$", record.getMessage()), \
        record.getMessage()
    assert target.errors == []

    target.handler = echo
    assert_next_connection_works(proxy, log, size=4 * MIB)


# =========================================================================== target sends after half-close

def test_target_sends_after_the_enclave_has_half_closed(make_proxy, tcp_target, log):
    request, reply = os.urandom(100 * 1024), os.urandom(3 * MIB)

    def reply_after_eof(sock):
        got = recv_all(sock)
        gevent.sleep(0.3)  # well after the proxy has passed the enclave's EOF on
        sock.sendall(hashlib.sha256(got).digest() + reply)
        sock.shutdown(socket.SHUT_WR)

    target = tcp_target(reply_after_eof)
    proxy = make_proxy(target.port)
    for _ in range(2):  # the fault path, then the next connection along the same one
        with proxy.connect() as client:
            peer = peer_name(client)
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            answer = recv_all(client)
        assert answer == hashlib.sha256(request).digest() + reply
        message = the_one_line(log, proxy, peer).getMessage()
        assert f"up={len(request)} down={32 + len(reply)} " in message and message.endswith("end=eof"), message
    assert target.errors == []


# =========================================================================== slow reader (subprocess)

class ThreadTarget:
    """A threaded TCP target on 127.0.0.1. The first byte a client sends picks the behaviour:

    b"P": push bytes until the connection breaks, counting what the kernel took (``pushed``);
    b"S": sink: read to EOF, then answer with the count of bytes read as 8 bytes;
    b"E": echo.
    """

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.port = self.listener.getsockname()[1]
        self.pushed: list[int] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(sock)
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(60)
        try:
            kind = sock.recv(1)
            if kind == b"P":
                self._push(sock)
            elif kind == b"S":
                total = 0
                buffer = bytearray(1 << 20)
                while True:
                    count = sock.recv_into(buffer)
                    if not count:
                        break
                    total += count
                sock.sendall(total.to_bytes(8, "big"))
            elif kind == b"E":
                sock.sendall(kind)
                echo(sock)
        except (ConnectionResetError, BrokenPipeError):
            pass
        except Exception as exc:  # noqa: BLE001 - kept for the test to inspect
            self.errors.append(exc)
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def _push(self, sock: socket.socket) -> None:
        index = len(self.pushed)
        self.pushed.append(0)
        block = memoryview(os.urandom(CHUNK_BYTES))
        sock.settimeout(None)
        while True:
            self.pushed[index] += sock.send(block)

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        self._acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)


@pytest.fixture
def thread_target():
    yield from tracked(ThreadTarget, ThreadTarget.stop)


def blocking_echo(proxy: StandInProxy, payload: bytes = b"next connection works") -> bytes:
    with proxy.connect() as client:
        client.sendall(b"E" + payload)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)[1:]


def bulk_throughput(proxy: StandInProxy, size: int) -> float:
    """MB/s of a one-way upload of ``size`` bytes through ``proxy`` to the sink, counted by the target."""
    block = memoryview(os.urandom(4 * MIB))
    with proxy.connect() as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        client.sendall(b"S")
        left = size
        while left:
            left -= client.send(block[:min(left, len(block))])
        client.shutdown(socket.SHUT_WR)
        count = int.from_bytes(recv_exactly(client, 8), "big")
        elapsed = time.perf_counter() - started
    assert count == size
    return size / elapsed / 1e6


def wait_stalled(counters: list[int], indexes, quiet: float = 1.0, timeout: float = 30) -> list[int]:
    """Wait until none of ``counters[i]`` has moved for ``quiet`` seconds; return their values."""
    deadline = time.monotonic() + timeout
    last = [counters[i] for i in indexes]
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = [counters[i] for i in indexes]
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return now
    raise AssertionError(f"the target kept pushing for {timeout}s: {last} bytes so far")


def _sysctl_int(path: str, index: int) -> int:
    return int(Path(path).read_text().split()[index])


@pytest.mark.timeout(150)
def test_enclave_never_reads_memory_stays_bounded_and_others_keep_full_speed(stand_in, thread_target):
    slow_readers = 4
    bulk = 256 * MIB
    target = thread_target()
    proxy = stand_in(target.port, "-w", "16")
    assert blocking_echo(proxy) == b"next connection works"  # warm-up: buffers, greenlets, code paths
    proxy.settled_fds()
    sockets = proxy.socket_fds()

    solo = max(bulk_throughput(proxy, bulk) for _ in range(3))
    rss_before = proxy.rss_kib()

    stalled = []
    try:
        for _ in range(slow_readers):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stalled.append(client)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before the window is offered
            client.settimeout(30)
            client.connect(proxy.address)
            client.sendall(b"P")  # ... and never reads
        wait_until(lambda: len(target.pushed) == slow_readers, 10, "the pushers to start")
        pushed = wait_stalled(target.pushed, range(slow_readers))
        rss_stalled = proxy.rss_kib()

        # What the target got rid of can only sit in kernel buffers (its send buffer, both of the
        # proxy's sockets at their autotuning maximum, the client's receive buffer) or in the
        # proxy's one chunk in flight.
        bound = (_sysctl_int("/proc/sys/net/ipv4/tcp_wmem", 2) * 2 + _sysctl_int("/proc/sys/net/ipv4/tcp_rmem", 2)
                 + 64 * 1024 * 2 + CHUNK_BYTES)
        assert all(0 < count <= bound for count in pushed), (pushed, bound)
        # The proxy holds at most one chunk per stalled connection, however long the stall lasts.
        assert rss_stalled - rss_before <= (slow_readers * CHUNK_BYTES + 8 * MIB) // 1024, \
            (rss_before, rss_stalled)

        loaded = max(bulk_throughput(proxy, bulk) for _ in range(3))
        time.sleep(1)
        assert [target.pushed[i] for i in range(slow_readers)] == pushed, "a stalled reader moved"
        assert proxy.rss_kib() - rss_before <= (slow_readers * CHUNK_BYTES + 8 * MIB) // 1024
    finally:
        for client in stalled:
            client.close()
    print(f"\nbulk through the proxy: solo {solo:.0f} MB/s, beside {slow_readers} stalled readers "
          f"{loaded:.0f} MB/s; pushed into each stalled reader {pushed} bytes; "
          f"proxy RSS {rss_before} KiB -> {rss_stalled} KiB")
    assert loaded >= 0.5 * solo, (solo, loaded)

    wait_socket_fds(proxy.pid, sockets)  # the stalled connections are closed on both sides
    assert blocking_echo(proxy) == b"next connection works"
    assert proxy.stop() == 0
    assert problems_in(proxy.lines) == [], proxy.text()
    assert target.errors == []


# =========================================================================== fd limit (subprocess)

def _fill_to_the_fd_limit(proxy: StandInProxy, served: int, odd: bool = False) -> list[socket.socket]:
    """Lower the proxy's RLIMIT_NOFILE so that exactly ``served`` connections (2 fds each) fit,
    plus one spare fd when ``odd``; open those connections and check that each one works."""
    # fds are allocated lowest first: with N open, the next 2*served (+1) fit under this limit
    limit = len(proxy.settled_fds()) + 2 * served + (1 if odd else 0)
    proxy.set_nofile(limit)
    clients = []
    for index in range(served):
        client = proxy.connect()
        clients.append(client)
        client.sendall(b"E%d" % index)
        assert recv_exactly(client, len(b"E%d" % index)) == b"E%d" % index
    assert len(proxy.fds()) == limit - (1 if odd else 0)
    return clients


def _queue_behind_the_limit(proxy: StandInProxy, count: int) -> list[socket.socket]:
    """``count`` clients that the kernel has connected and that wait in the proxy's listen backlog."""
    waiting = []
    for _ in range(count):
        client = proxy.connect()
        client.sendall(b"Ewaiting")
        waiting.append(client)
    return waiting


def _served_when_fds_come_back(opened: list[socket.socket], waiting: list[socket.socket]) -> list[str]:
    """Close the open connections, then see how each waiting one fares: 'served', 'eof' or 'reset'."""
    for client in opened:
        client.close()
    fates = []
    for client in waiting:
        try:
            data = recv_exactly(client, 8)
        except ConnectionResetError:
            fates.append("reset")
        else:
            fates.append("served" if data == b"Ewaiting" else "eof" if not data else repr(data))
        client.close()
    return fates


def _stop_and_check(proxy: StandInProxy, sockets: int) -> str:
    wait_socket_fds(proxy.pid, sockets)
    assert blocking_echo(proxy) == b"next connection works"
    assert proxy.stop() == 0
    return proxy.text()


class AtTheFdLimit:
    """A stand-in proxy with every fd in use: ``opened`` connections served, ``waiting`` ones
    queued behind the limit, and accept() already failing. Closes the clients on exit, then
    checks that the proxy serves again and stops with exit 0; ``text`` is its log."""

    def __init__(self, stand_in, thread_target, served: int) -> None:
        self.proxy = stand_in(thread_target().port, "-w", "100")
        assert blocking_echo(self.proxy) == b"next connection works"
        self.proxy.settled_fds()
        self.sockets = self.proxy.socket_fds()
        self.opened = _fill_to_the_fd_limit(self.proxy, served)
        self.waiting: list[socket.socket] = []
        self.text = ""

    def __enter__(self) -> "AtTheFdLimit":
        try:
            self.waiting = _queue_behind_the_limit(self.proxy, 1)
            self.proxy.wait_for("accept failed: Too many open files", timeout=10)
        except BaseException:
            self._close_clients()
            raise
        return self

    def __exit__(self, kind, *_exc) -> None:
        self._close_clients()
        if kind is None:
            self.text = _stop_and_check(self.proxy, self.sockets)
            assert problems_in(self.proxy.lines) == [], self.text
            assert "refused" not in self.text, self.text

    def _close_clients(self) -> None:
        for client in self.opened + self.waiting:
            client.close()


@pytest.mark.timeout(120)
def test_fd_limit_accept_errors_are_survived_and_logged_without_a_busy_loop(stand_in, thread_target):
    served = 5
    with AtTheFdLimit(stand_in, thread_target, served) as limit:
        proxy, opened = limit.proxy, limit.opened
        time.sleep(1.5)  # past the first, quick retries of the back-off
        cpu_before, lines_before = proxy.cpu_seconds(), len(proxy.drain())
        time.sleep(2)
        cpu_used, new_lines = proxy.cpu_seconds() - cpu_before, proxy.drain()[lines_before:]
        assert cpu_used < 0.5, f"{cpu_used:.2f} s of CPU in 2 s at the fd limit: a busy loop"
        assert 1 <= len(new_lines) <= 5, new_lines
        assert all("WARNING accept failed: Too many open files; retrying in" in line for line in new_lines), \
            new_lines

        for client in opened:  # the open connections are unaffected
            client.sendall(b"still here")
            assert recv_exactly(client, 10) == b"still here"
        assert _served_when_fds_come_back(opened, limit.waiting) == ["served"]
    assert limit.text.count(" end=eof") == 1 + served + 1 + 1, limit.text


def _echo_on_all_at_once(clients: list[socket.socket], size: int, read_after: float = 1.0) -> list[str]:
    """Send ``size`` random bytes on every client at once and start reading the echoes only
    ``read_after`` seconds later, so that every connection has a transfer stalled inside the proxy
    at the same time. Each one's fate: 'intact', or what went wrong."""
    fates = ["unfinished"] * len(clients)
    payloads = [os.urandom(size) for _ in clients]
    senders = [threading.Thread(target=client.sendall, args=(payload,), daemon=True)
               for client, payload in zip(clients, payloads)]

    def receive(index: int) -> None:
        try:
            echoed = recv_exactly(clients[index], size)
            fates[index] = "intact" if echoed == payloads[index] else f"{len(echoed)} bytes, corrupt or short"
        except OSError as exc:
            fates[index] = f"{type(exc).__name__}: {exc}"

    for sender in senders:
        sender.start()
    time.sleep(read_after)
    receivers = [threading.Thread(target=receive, args=(index,), daemon=True) for index in range(len(clients))]
    for thread in receivers:
        thread.start()
    for thread in receivers + senders:
        thread.join(timeout=60)
    return fates


@pytest.mark.timeout(120)
def test_fd_limit_open_connections_keep_moving_data_at_the_limit(stand_in, thread_target):
    """With every fd in use (and accept() failing), the connections already open still carry bulk
    data both ways at once: nothing the proxy needs per transfer may cost them their connection."""
    served = 5
    with AtTheFdLimit(stand_in, thread_target, served) as limit:
        fates = _echo_on_all_at_once(limit.opened, 4 * MIB)
        assert fates == ["intact"] * served, (fates, limit.proxy.drain())
        assert _served_when_fds_come_back(limit.opened, limit.waiting) == ["served"]


@pytest.mark.timeout(120)
def test_fd_limit_connections_waiting_in_the_backlog_are_all_served_when_fds_come_back(stand_in, thread_target):
    """Ten connections wait behind the limit; five close and free ten fds. Every waiting connection
    must then be served in turn, none dropped: each needs two fds (its own and the target's)."""
    target = thread_target()
    proxy = stand_in(target.port, "-w", "100")
    assert blocking_echo(proxy) == b"next connection works"
    proxy.settled_fds()
    sockets = proxy.socket_fds()
    opened = _fill_to_the_fd_limit(proxy, 5)
    waiting = []
    try:
        waiting = _queue_behind_the_limit(proxy, 10)
        proxy.wait_for("accept failed: Too many open files", timeout=10)
        fates = _served_when_fds_come_back(opened, waiting)
    finally:
        for client in opened + waiting:
            client.close()
    text = _stop_and_check(proxy, sockets)
    assert fates == ["served"] * 10, (fates, text)
    assert problems_in(proxy.lines) == [], text


@pytest.mark.timeout(120)
def test_fd_limit_hit_opening_the_target_socket_is_one_warning_not_an_internal_error(stand_in, thread_target):
    """With one fd to spare, accept() succeeds and the target socket cannot be created. That
    connection is refused like any other connect failure: one WARNING naming the cause, not an
    ERROR 'internal error' (which the proxy reserves for its own bugs)."""
    target = thread_target()
    proxy = stand_in(target.port, "-w", "100")
    assert blocking_echo(proxy) == b"next connection works"
    proxy.settled_fds()
    sockets = proxy.socket_fds()
    opened = _fill_to_the_fd_limit(proxy, 3, odd=True)
    try:
        with proxy.connect() as client:
            peer = peer_name(client)
            client.sendall(b"Eedge")
            assert closed_how(client) in ("eof", "reset")
        line = proxy.wait_for(f"enclave={peer} ", timeout=10)
    finally:
        for client in opened:
            client.close()
    _stop_and_check(proxy, sockets)
    mentions = [entry for entry in proxy.lines if f"enclave={peer} " in entry]
    assert mentions == [line], mentions
    assert " WARNING refused enclave=" in line and "Too many open files" in line, line
    assert problems_in(proxy.lines) == [], proxy.text()
