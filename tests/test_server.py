"""The proxy end to end through real sockets: an injected TCP/Unix listener stands in for vsock,
and real TCP servers on 127.0.0.1 are the targets.  No AF_VSOCK socket is ever connected."""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import socket
import struct
import time

import gevent
import gevent.event
import gevent.socket
import pytest

from tests.helpers import (FakeDNS, assert_one_line_error, recv_all, recv_exactly, sha256_of_stream, unused_tcp_port,
                           wait_until)
import vsockproxy.listen as listen_module
from vsockproxy.resolver import Resolver

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20

LOG_LINE = re.compile(r"closed enclave=(?P<enclave>\S+) target=(?P<target>\S+) up=(?P<up>\d+) "
                      r"down=(?P<down>\d+) duration=(?P<duration>\d+\.\d+)s end=(?P<end>\S+)")


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="vsockproxy")
    return caplog


def closed_lines(caplog) -> list[re.Match]:
    return [m for m in (LOG_LINE.search(r.getMessage()) for r in caplog.records if r.name == "vsockproxy") if m]


def wait_for_closed_lines(caplog, count: int, timeout: float = 5) -> list[re.Match]:
    return wait_until(lambda: len(closed_lines(caplog)) >= count and closed_lines(caplog), timeout,
                      f"{count} 'closed' log line(s)")


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vsockproxy" and r.levelno == logging.WARNING]


def connection_is_closed(sock, timeout: float = 5) -> bool:
    """True if the peer closed or reset the connection (reads EOF or ECONNRESET) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def reply_handler(request: bytes, reply: bytes, seen: list):
    """Target: read exactly ``request``, record it, send ``reply``, then wait for EOF and close."""
    def handle(sock):
        got = recv_exactly(sock, len(request))
        seen.append(got)
        sock.sendall(reply)
        recv_all(sock)
    return handle


def echo_lines(sock):
    """Target: answer each line with 'echo:' + line until EOF."""
    buffered = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return
        buffered += data
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            sock.sendall(b"echo:" + line + b"\n")


# --------------------------------------------------------------------------- the basic path

@pytest.mark.parametrize("listener", ["tcp", "unix"])
def test_upstream_connection_test(make_proxy, tcp_target, log, listener):
    """Upstream's test: the enclave sends b'client2server', the target answers b'server2client'."""
    seen: list[bytes] = []
    target = tcp_target(reply_handler(b"client2server", b"server2client", seen))
    proxy = make_proxy(target.port, listener=listener)
    with proxy.connect() as client:
        client.sendall(b"client2server")
        assert recv_exactly(client, len(b"server2client")) == b"server2client"
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    assert seen == [b"client2server"]
    assert target.errors == []
    [line] = wait_for_closed_lines(log, 1)
    assert (int(line["up"]), int(line["down"]), line["end"]) == (13, 13, "eof")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_target(make_proxy, tcp_target, log):
    seen: list[bytes] = []
    target = tcp_target(reply_handler(b"client2server", b"server2client", seen), host="::1")
    proxy = make_proxy(target.port, host="::1")
    with proxy.connect() as client:
        client.sendall(b"client2server")
        assert recv_exactly(client, 13) == b"server2client"
    assert seen == [b"client2server"]
    [line] = wait_for_closed_lines(log, 1)
    assert line["target"] == f"[::1]:{target.port}"


@pytest.mark.timeout(90)
def test_16_mib_each_way_concurrently(make_proxy, tcp_target):
    size = 16 * 1024 * 1024
    up_data, down_data = os.urandom(size), os.urandom(size)
    target_got: dict[str, str] = {}

    def target_handler(sock):
        sender = gevent.spawn(lambda: (sock.sendall(down_data), sock.shutdown(socket.SHUT_WR)))
        sha, received = sha256_of_stream(sock)
        sender.get()
        target_got.update(sha=sha, size=str(received))

    target = tcp_target(target_handler)
    proxy = make_proxy(target.port)
    with proxy.connect(timeout=30) as client:
        sender = gevent.spawn(lambda: (client.sendall(up_data), client.shutdown(socket.SHUT_WR)))
        sha, received = sha256_of_stream(client)
        sender.get(timeout=30)
    assert received == size
    assert sha == hashlib.sha256(down_data).hexdigest()
    wait_until(lambda: target_got, 10, "target to finish")
    assert target.errors == []
    assert int(target_got["size"]) == size
    assert target_got["sha"] == hashlib.sha256(up_data).hexdigest()


def test_half_close_client_shuts_write_and_still_reads_the_full_reply(make_proxy, tcp_target, log):
    """The target replies only after it has read to EOF: upstream's proxy would have closed both ways."""
    request = os.urandom(1 << 20)
    reply_tail = os.urandom(2 << 20)

    def digest_then_reply(sock):
        data = recv_all(sock)
        sock.sendall(hashlib.sha256(data).digest() + reply_tail)
        sock.shutdown(socket.SHUT_WR)

    target = tcp_target(digest_then_reply)
    proxy = make_proxy(target.port)
    with proxy.connect() as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        gevent.sleep(0.2)  # the proxy has forwarded the EOF by now; the reply must still come
        reply = recv_all(client)
    assert reply[:32] == hashlib.sha256(request).digest()
    assert hashlib.sha256(reply[32:]).digest() == hashlib.sha256(reply_tail).digest()
    assert target.errors == []
    [line] = wait_for_closed_lines(log, 1)
    assert int(line["up"]) == len(request) and int(line["down"]) == 32 + len(reply_tail)
    assert line["end"] == "eof"


def test_half_close_target_shuts_write_and_client_keeps_sending(make_proxy, tcp_target):
    """The other direction: the target says all it has to say and shuts its write side first."""
    got = []

    def banner_then_read(sock):
        sock.sendall(b"banner")
        sock.shutdown(socket.SHUT_WR)
        got.append(recv_all(sock))

    target = tcp_target(banner_then_read)
    proxy = make_proxy(target.port)
    with proxy.connect() as client:
        assert recv_all(client) == b"banner"  # EOF from the target reached the enclave side
        late = os.urandom(300_000)
        client.sendall(late)  # the enclave may still send
        client.shutdown(socket.SHUT_WR)
        wait_until(lambda: got, 5, "target to read to EOF")
    assert got == [late]


# --------------------------------------------------------------------------- the worker limit

def test_worker_limit_third_client_waits_for_a_free_slot(make_proxy, tcp_target):
    target = tcp_target(echo_lines)
    proxy = make_proxy(target.port, num_workers=2)
    first, second, third = proxy.connect(), proxy.connect(), proxy.connect()
    try:
        for client, name in ((first, b"a"), (second, b"b")):
            client.sendall(name + b"\n")
            assert recv_exactly(client, 7) == b"echo:" + name + b"\n"
        third.sendall(b"c\n")
        third.settimeout(0.5)
        with pytest.raises(socket.timeout):
            third.recv(100)  # no reply while both workers are busy
        assert target.accepted == 2
        assert proxy.server.active_connections == 2

        first.close()  # frees a slot: the third client is served now
        third.settimeout(5)
        assert recv_exactly(third, 7) == b"echo:c\n"
        assert target.accepted == 3

        second.sendall(b"b2\n")  # the second connection was never disturbed
        assert recv_exactly(second, 8) == b"echo:b2\n"
    finally:
        for client in (first, second, third):
            client.close()
    assert target.errors == []


def test_a_burst_is_accepted_in_batches_until_fds_run_short(make_proxy, tcp_target, monkeypatch):
    """vsock refuses connects once the accept queue is full, so bursts are drained a batch per loop
    pass; near RLIMIT_NOFILE it is one per pass, each handler opening its target socket first."""
    target = tcp_target(echo_lines)
    proxy = make_proxy(target.port, num_workers=200, backlog=200)
    per_pass: collections.Counter = collections.Counter()  # accepts in each pass of the event loop
    loop, accept_one = gevent.get_hub().loop, proxy.server.do_read

    def counting_accept():
        accepted = accept_one()
        if accepted:
            per_pass[loop.iteration] += 1
        return accepted

    monkeypatch.setattr(proxy.server, "do_read", counting_accept)

    def connect_now():
        """A blocking connect, which the kernel completes while the proxy cannot run: part of one burst."""
        plain = socket.create_connection(proxy.address, timeout=10)
        client = gevent.socket.socket(plain.family, plain.type, fileno=plain.detach())
        client.settimeout(10)
        return client

    burst = [connect_now() for _ in range(3 * listen_module.ACCEPT_BATCH)]
    try:
        wait_until(lambda: proxy.server.active_connections == len(burst), 10, "the burst to be accepted")
        assert max(per_pass.values()) > 1, per_pass
        assert proxy.server.max_accept == listen_module.ACCEPT_BATCH

        soft, hard = listen_module.resource.getrlimit(listen_module.resource.RLIMIT_NOFILE)
        monkeypatch.setattr(listen_module.resource, "getrlimit", lambda _: (len(burst) * 2 + 64, hard))
        near = connect_now()
        burst.append(near)
        wait_until(lambda: proxy.server.active_connections == len(burst), 10, "the last one to be accepted")
        assert proxy.server.max_accept == 1
        for client in burst:
            client.sendall(b"x\n")
            assert recv_exactly(client, 7) == b"echo:x\n"
    finally:
        for client in burst:
            client.close()


def test_waiting_clients_are_served_in_arrival_order(make_proxy, tcp_target):
    order: list[bytes] = []

    def record(sock):
        line = b""
        while not line.endswith(b"\n"):
            data = sock.recv(100)
            if not data:
                return
            line += data
        order.append(line.strip())
        sock.sendall(b"ok\n")
        recv_all(sock)

    target = tcp_target(record)
    proxy = make_proxy(target.port, num_workers=1)
    clients = []
    try:
        for index in range(4):
            client = proxy.connect()
            client.sendall(b"%d\n" % index)
            clients.append(client)
            gevent.sleep(0.02)
        for client in clients:
            assert recv_exactly(client, 3) == b"ok\n"
            client.close()
    finally:
        for client in clients:
            client.close()
    assert order == [b"0", b"1", b"2", b"3"]


# --------------------------------------------------------------------------- failures keep the server alive

def test_target_refused_closes_client_logs_warning_and_server_keeps_serving(make_proxy, tcp_target, log):
    port = unused_tcp_port()
    proxy = make_proxy(port, connect_timeout=2)
    with proxy.connect() as client:
        assert connection_is_closed(client)
    found = wait_until(lambda: [w for w in warnings(log) if f"127.0.0.1:{port}" in w], 5, "a warning")
    assert "refused" in found[0].lower()

    seen: list[bytes] = []
    tcp_target(reply_handler(b"client2server", b"server2client", seen), port=port)
    with proxy.connect() as client:
        client.sendall(b"client2server")
        assert recv_exactly(client, 13) == b"server2client"
    assert seen == [b"client2server"]


def test_every_resolved_address_is_tried_in_turn(make_proxy, tcp_target, log):
    """127.0.0.2 refuses (nothing listens there), 127.0.0.1 answers: the connection goes through."""
    seen: list[bytes] = []
    target = tcp_target(reply_handler(b"ping", b"pong", seen))
    dns = FakeDNS({"svc.test": ["127.0.0.2", "127.0.0.1"]})
    proxy = make_proxy(target.port, host="svc.test", resolver=Resolver(getaddrinfo=dns))
    with proxy.connect() as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"pong"
    [line] = wait_for_closed_lines(log, 1)
    assert line["target"] == f"127.0.0.1:{target.port}"


def test_dns_failure_closes_client_and_is_not_cached(make_proxy, tcp_target, log):
    seen: list[bytes] = []
    target = tcp_target(reply_handler(b"ping", b"pong", seen))
    dns = FakeDNS({"svc.test": ["127.0.0.1"]})
    dns.fail_next["svc.test"] = 1
    proxy = make_proxy(target.port, host="svc.test", resolver=Resolver(ttl=30, getaddrinfo=dns))
    assert dns.calls == []  # allowed by name: no look-up at start-up
    with proxy.connect() as client:
        assert connection_is_closed(client)
    wait_until(lambda: any("svc.test" in w for w in warnings(log)), 5, "a DNS warning")
    with proxy.connect() as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"pong"
    assert dns.count("svc.test") == 2


def test_pinned_target_refuses_addresses_no_entry_admits(make_proxy, tcp_target, log):
    """Allowed only because it resolved to an allowed IP: when DNS moves it elsewhere, it is refused."""
    seen: list[bytes] = []
    target = tcp_target(reply_handler(b"ping", b"pong", seen))
    dns = FakeDNS({"api.test": ["127.0.0.1"]})
    proxy = make_proxy(target.port, host="api.test", resolver=Resolver(ttl=0, getaddrinfo=dns),
                       entries=[{"address": "127.0.0.1", "port": target.port}])
    with proxy.connect() as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"pong"
    dns.records["api.test"] = ["127.0.0.2"]
    with proxy.connect() as client:
        assert connection_is_closed(client)
    wait_until(lambda: any("127.0.0.2" in w for w in warnings(log)), 5, "a pinning warning")
    assert target.accepted == 1


def test_reset_mid_stream_closes_client_and_server_keeps_serving(make_proxy, tcp_target, log):
    def reset_after_some_bytes(sock):
        recv_exactly(sock, 5)
        sock.sendall(b"partial reply")
        gevent.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST

    target = tcp_target(reset_after_some_bytes)
    proxy = make_proxy(target.port)
    with proxy.connect() as client:
        client.sendall(b"hello")
        assert recv_exactly(client, 13) == b"partial reply"
        assert connection_is_closed(client)
    [line] = wait_for_closed_lines(log, 1)
    assert line["end"].startswith("target-error"), line["end"]
    assert int(line["up"]) == 5 and int(line["down"]) == 13

    seen: list[bytes] = []
    target.handler = reply_handler(b"again", b"fine", seen)
    with proxy.connect() as client:
        client.sendall(b"again")
        assert recv_exactly(client, 4) == b"fine"
    assert seen == [b"again"]


def test_enclave_reset_closes_the_target_connection(make_proxy, tcp_target, log):
    target_saw_end = []

    def wait_for_end(sock):
        try:
            target_saw_end.append(recv_all(sock))
        except ConnectionResetError:
            target_saw_end.append("reset")

    target = tcp_target(wait_for_end)
    proxy = make_proxy(target.port)
    client = proxy.connect()
    client.sendall(b"x")
    wait_until(lambda: target.accepted == 1, 5, "target connection")
    gevent.sleep(0.05)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    wait_until(lambda: target_saw_end, 5, "the target to see the end")
    [line] = wait_for_closed_lines(log, 1)
    assert line["end"].startswith("enclave-error"), line["end"]


def test_per_connection_log_line(make_proxy, tcp_target, log):
    up, down = os.urandom(1000), os.urandom(2345)

    def handler(sock):
        recv_exactly(sock, len(up))
        sock.sendall(down)
        recv_all(sock)

    target = tcp_target(handler)
    proxy = make_proxy(target.port)
    started = time.monotonic()
    with proxy.connect() as client:
        enclave = "%s:%d" % client.getsockname()
        client.sendall(up)
        assert recv_exactly(client, len(down)) == down
        gevent.sleep(0.1)
    [line] = wait_for_closed_lines(log, 1)
    elapsed = time.monotonic() - started
    assert line["enclave"] == enclave
    assert line["target"] == f"127.0.0.1:{target.port}"
    assert int(line["up"]) == 1000 and int(line["down"]) == 2345
    assert 0.1 <= float(line["duration"]) <= elapsed + 0.01
    assert line["end"] == "eof"
    record = next(r for r in log.records if LOG_LINE.search(r.getMessage()))
    assert record.levelno == logging.INFO and "\n" not in record.getMessage()


# --------------------------------------------------------------------------- resources

def test_backpressure_bounds_what_the_proxy_holds(make_proxy, tcp_target):
    """A target that does not read makes the enclave's sends block; nothing is buffered without bound."""
    release = gevent.event.Event()
    got: list[str] = []

    def slow_reader(sock):
        release.wait(30)
        got.append(hashlib.sha256(recv_all(sock)).hexdigest())

    target = tcp_target(slow_reader)
    proxy = make_proxy(target.port)
    client = proxy.connect()
    try:
        client.setblocking(False)
        sent = hashlib.sha256()
        total = 0
        chunk = os.urandom(256 * 1024)
        stalled_since = None
        while True:
            try:
                n = client.send(chunk)
                sent.update(chunk[:n])
                total += n
                stalled_since = None
            except BlockingIOError:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > 0.5:
                    break
                gevent.sleep(0.01)
            assert total < 256 * 1024 * 1024, "the proxy kept reading with nowhere to put the bytes"
        release.set()
        client.settimeout(10)
        client.shutdown(socket.SHUT_WR)
        wait_until(lambda: got, 20, "the target to read everything")
        assert got == [sent.hexdigest()]
    finally:
        client.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak_across_connections(make_proxy, tcp_target, log):
    def handler(sock):
        data = sock.recv(100)
        if data == b"reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return
        sock.sendall(data)
        recv_all(sock)

    target = tcp_target(handler)
    proxy = make_proxy(target.port)
    refused = make_proxy(unused_tcp_port(), connect_timeout=1)

    def one_round():
        with proxy.connect() as client:
            client.sendall(b"hi")
            assert recv_exactly(client, 2) == b"hi"
        with proxy.connect() as client:
            client.sendall(b"reset")
            connection_is_closed(client)
        with refused.connect() as client:
            connection_is_closed(client)

    one_round()  # warm-up: lazily created hub resources
    wait_until(lambda: proxy.server.active_connections == 0 and refused.server.active_connections == 0, 5,
               "idle proxies")
    gevent.sleep(0.1)
    before = _open_fds()
    for _ in range(10):
        one_round()
    wait_until(lambda: proxy.server.active_connections == 0 and refused.server.active_connections == 0, 5,
               "idle proxies")
    wait_until(lambda: _open_fds() <= before, 5, f"fd count back to {before} (now {_open_fds()})")


def test_drain_lets_open_connections_finish_and_refuses_new_ones(make_proxy, tcp_target):
    target = tcp_target(echo_lines)
    proxy = make_proxy(target.port)
    client = proxy.connect()
    try:
        client.sendall(b"before\n")
        assert recv_exactly(client, 12) == b"echo:before\n"
        stopper = gevent.spawn(proxy.server.stop, 10)
        gevent.sleep(0.1)
        with pytest.raises(ConnectionRefusedError):  # the listener is closed at once
            socket.create_connection(proxy.address, timeout=2).close()
        client.sendall(b"during\n")  # the open connection keeps working
        assert recv_exactly(client, 12) == b"echo:during\n"
        assert not stopper.ready()
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        started = time.monotonic()
        stopper.get(timeout=5)  # returns as soon as the last connection ends, not after the grace
        assert time.monotonic() - started < 2
    finally:
        client.close()


def test_drain_grace_expires_and_ends_connections(make_proxy, tcp_target):
    target = tcp_target(echo_lines)
    proxy = make_proxy(target.port)
    client = proxy.connect()
    try:
        client.sendall(b"x\n")
        assert recv_exactly(client, 7) == b"echo:x\n"
        started = time.monotonic()
        proxy.server.stop(0.5)
        assert 0.4 <= time.monotonic() - started < 3
        assert connection_is_closed(client, timeout=3)
    finally:
        client.close()


# --------------------------------------------------------------------------- start-up refusal (real CLI)

def test_not_allowed_target_refused_at_start_up(run_cli, write_config):
    """A reachable but not-allowed target: the CLI exits 1 with a message and never connects to it."""
    with socket.socket() as decoy:
        decoy.bind(("127.0.0.1", 0))
        decoy.listen(1)
        decoy.settimeout(0.2)
        port = decoy.getsockname()[1]
        config = write_config([("127.0.0.1", port + 1 if port < 65535 else port - 1)])
        result = run_cli("47917", "127.0.0.1", str(port), "--config", config)
        assert_one_line_error(result, 1, f"{port}")
        with pytest.raises(socket.timeout):
            decoy.accept()


# --------------------------------------------------------------------------- idle timeout

def slow_reader(sock, step: int, pause: float) -> bytes:
    """Read ``step`` bytes every ``pause`` seconds until EOF: an enclave that keeps up, slowly."""
    received = bytearray()
    while True:
        chunk = sock.recv(step)
        if not chunk:
            return bytes(received)
        received += chunk
        gevent.sleep(pause)


def test_idle_timeout_spares_a_transfer_that_is_still_moving(make_proxy, tcp_target, log):
    """A slow reader keeps its connection: each byte it takes counts as activity, not only whole chunks."""
    payload = os.urandom(4 * MIB)
    target = tcp_target(lambda sock: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR), recv_all(sock)))
    proxy = make_proxy(target.port, idle_timeout=0.8)
    # Small kernel buffers on both ends of the enclave's connection (the proxy's accepted socket
    # inherits its listener's), as vsock has, so the proxy's writes progress in small steps.
    proxy.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before connect: a small window
    client.settimeout(10)
    with client:
        client.connect(proxy.address)
        received = slow_reader(client, 64 * 1024, 0.04)  # ~1.5 MB/s: 2 MiB chunks take over a second
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    (line,) = wait_for_closed_lines(log, 1)
    assert line["end"] == "eof" and int(line["down"]) == len(payload), line.group(0)


def test_idle_timeout_resets_both_tcp_peers_instead_of_a_clean_end(make_proxy, tcp_target, log):
    """A connection cut for idleness must not look complete to a peer that is waiting for more."""
    endings = []

    def wait_for_more(sock):
        try:
            endings.append("eof" if sock.recv(100) == b"" else "data")
        except ConnectionResetError:
            endings.append("reset")

    target = tcp_target(wait_for_more)
    proxy = make_proxy(target.port, idle_timeout=0.3)
    with proxy.connect() as client:
        with pytest.raises(ConnectionResetError):
            client.recv(100)
    (line,) = wait_for_closed_lines(log, 1)
    assert line["end"] == "idle-timeout", line.group(0)
    wait_until(lambda: endings, 5, "the target's read to end")
    assert endings == ["reset"]
