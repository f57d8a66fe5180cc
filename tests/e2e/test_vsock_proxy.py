"""The real ``vsock-proxy`` command, driven by vsock clients on CID 1 inside the test VM.

Each test starts its own proxy process (or, for the cheap exchanges, shares
one per module), so one broken case fails only itself.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.helpers import echo
from tests.e2e.vsock import (IO_TIMEOUT, free_vsock_port, recv_all, recv_exactly, sha256_of_stream,
                                vsock_connect)

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

MIB = 1 << 20


def client2server(sock: socket.socket) -> None:
    """Upstream's connection test target: expects 'client2server', answers 'server2client'."""
    assert recv_exactly(sock, len(b"client2server")) == b"client2server"
    sock.sendall(b"server2client")


def test_upstream_client2server_exchange(proxy, target):
    server = target(client2server)
    port = free_vsock_port()
    process = proxy([str(port), "127.0.0.1", str(server.port)], allow=[("127.0.0.1", server.port)])
    with vsock_connect(port) as client:
        client.sendall(b"client2server")
        assert recv_exactly(client, len(b"server2client")) == b"server2client"
    line = process.wait_for("closed enclave=", timeout=IO_TIMEOUT)
    assert "up=13 down=13" in line and "end=eof" in line, line


def test_socat_as_the_enclave_client(proxy, target):
    """A vsock client that is not ours: socat's VSOCK-CONNECT."""
    server = target(client2server)
    port = free_vsock_port()
    proxy([str(port), "127.0.0.1", str(server.port)], allow=[("127.0.0.1", server.port)])
    result = subprocess.run(["socat", "-t", "30", "-", f"VSOCK-CONNECT:1:{port}"], input=b"client2server",
                            capture_output=True, timeout=IO_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"server2client"


def test_64_mib_each_way_concurrently_hash_checked(proxy, target):
    size = 64 * MIB
    upload, download = os.urandom(size), os.urandom(size)
    received: dict[str, tuple[str, int]] = {}
    target_done = threading.Event()

    def both_ways(sock: socket.socket) -> None:
        sender = threading.Thread(target=lambda: (sock.sendall(download), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        received["target"] = sha256_of_stream(sock)
        sender.join()
        target_done.set()

    server = target(both_ways)
    port = free_vsock_port()
    process = proxy([str(port), "127.0.0.1", str(server.port)], allow=[("127.0.0.1", server.port)])
    with vsock_connect(port, timeout=240) as client:
        sender = threading.Thread(target=lambda: (client.sendall(upload), client.shutdown(socket.SHUT_WR)))
        sender.start()
        received["enclave"] = sha256_of_stream(client)
        sender.join()
    assert target_done.wait(IO_TIMEOUT)
    assert not server.errors
    assert received["target"] == (hashlib.sha256(upload).hexdigest(), size)
    assert received["enclave"] == (hashlib.sha256(download).hexdigest(), size)
    line = process.wait_for("closed enclave=", timeout=IO_TIMEOUT)
    assert f"up={size} down={size}" in line and "end=eof" in line, line


def test_half_close_enclave_still_reads_the_whole_reply(proxy, target):
    reply = os.urandom(3 * MIB)

    def read_to_eof_then_reply(sock: socket.socket) -> None:
        request = recv_all(sock)
        sock.sendall(hashlib.sha256(request).digest() + reply)

    server = target(read_to_eof_then_reply)
    port = free_vsock_port()
    proxy([str(port), "127.0.0.1", str(server.port)], allow=[("127.0.0.1", server.port)])
    request = os.urandom(MIB)
    with vsock_connect(port) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        answer = recv_all(client)
    assert answer == hashlib.sha256(request).digest() + reply


def test_worker_limit_third_client_waits_for_a_free_worker(proxy, target):
    server = target(echo)
    port = free_vsock_port()
    proxy(["-w", "2", str(port), "127.0.0.1", str(server.port)], allow=[("127.0.0.1", server.port)])
    first, second = vsock_connect(port), vsock_connect(port)
    try:
        for client in (first, second):
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
        third = vsock_connect(port)  # waits in the backlog: connected, not yet served
        try:
            third.sendall(b"third")
            third.settimeout(3)
            with pytest.raises(socket.timeout):
                third.recv(16)
            first.close()
            third.settimeout(IO_TIMEOUT)
            assert recv_exactly(third, 5) == b"third"
        finally:
            third.close()
    finally:
        first.close()
        second.close()


def test_target_down_closes_that_connection_and_the_next_one_works(proxy, target):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        target_port = probe.getsockname()[1]
    port = free_vsock_port()
    process = proxy([str(port), "127.0.0.1", str(target_port)], allow=[("127.0.0.1", target_port)])
    with vsock_connect(port) as client:
        assert _closed_by_proxy(client)
    process.wait_for("refused enclave=", timeout=IO_TIMEOUT)
    target(echo, port=target_port)
    with vsock_connect(port) as client:
        client.sendall(b"back up")
        assert recv_exactly(client, 7) == b"back up"


def test_dns_failure_closes_that_connection_and_the_next_one_works(proxy, target):
    """The name is allowed by name, so start-up needs no DNS; it resolves only once /etc/hosts has it.

    /etc/hosts here is the VM's throw-away copy (tmpfs overlay).
    """
    name = f"e2e-{os.getpid()}.vsockproxy.test"
    server = target(echo)
    port = free_vsock_port()
    process = proxy(["--dns-ttl", "0", str(port), name, str(server.port)], allow=[(name, server.port)])
    with vsock_connect(port) as client:
        assert _closed_by_proxy(client)
    assert "cannot resolve" in process.wait_for("refused enclave=", timeout=IO_TIMEOUT)
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"\n127.0.0.1 {name}\n")
    with vsock_connect(port) as client:
        client.sendall(b"resolved")
        assert recv_exactly(client, 8) == b"resolved"


def test_not_allowed_target_is_refused_at_start_up(proxy):
    port = free_vsock_port()
    process = proxy([str(port), "127.0.0.1", "9"], allow=[("127.0.0.1", 10)], wait=False)
    assert process.finish(timeout=IO_TIMEOUT * 2) == 1
    assert len(process.lines) == 1, process.text()
    assert process.lines[0].startswith("vsock-proxy: error: ") and "127.0.0.1:9" in process.lines[0]
    probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        probe.bind((socket.VMADDR_CID_ANY, port))  # nothing was left listening
    finally:
        probe.close()


@pytest.mark.parametrize("flag, expected_peer", [("-4", "127.0.0.1"), ("-6", "::1")])
def test_ipv4_and_ipv6_only_against_dual_stack_localhost(proxy, target, flag, expected_peer):
    port_holder = socket.socket(socket.AF_INET6)
    port_holder.bind(("::1", 0))
    tcp_port = port_holder.getsockname()[1]
    port_holder.close()
    v4, v6 = target(echo, "127.0.0.1", tcp_port), target(echo, "::1", tcp_port)
    port = free_vsock_port()
    process = proxy([flag, str(port), "localhost", str(tcp_port)], allow=[("localhost", tcp_port)])
    with vsock_connect(port) as client:
        client.sendall(b"which")
        assert recv_exactly(client, 5) == b"which"
    peers = [peer[0] for peer in v4.peers + v6.peers]
    assert peers == [expected_peer], peers
    assert f"target={'[::1]' if flag == '-6' else '127.0.0.1'}:{tcp_port}" in \
        process.wait_for("closed enclave=", timeout=IO_TIMEOUT)


def test_sigterm_lets_a_running_transfer_finish_then_exits_zero(proxy, target):
    size = 16 * MIB
    payload = os.urandom(size)

    def slow_echo(sock: socket.socket) -> None:
        digest = hashlib.sha256()
        total = 0
        while total < size:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
            time.sleep(0.002)
        sock.sendall(digest.digest())

    server = target(slow_echo)
    port = free_vsock_port()
    process = proxy(["--shutdown-grace", "120", str(port), "127.0.0.1", str(server.port)],
                    allow=[("127.0.0.1", server.port)])
    with vsock_connect(port, timeout=240) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        time.sleep(1.0)
        process.signal(signal.SIGTERM)
        process.wait_for("stopping", timeout=IO_TIMEOUT)
        sender.join()
        assert recv_exactly(client, 32) == hashlib.sha256(payload).digest()
    assert process.finish(timeout=IO_TIMEOUT * 2) == 0
    assert "end=eof" in process.wait_for("closed enclave=", timeout=1)
    assert process.lines[-1].endswith("stopped"), process.text()


def _closed_by_proxy(client: socket.socket) -> bool:
    """Whether the proxy closed this connection without relaying anything."""
    client.settimeout(IO_TIMEOUT)
    try:
        return client.recv(1) == b""
    except OSError as exc:
        return exc.errno in (errno.ECONNRESET, errno.EPIPE)
