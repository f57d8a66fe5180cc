"""Faults injected over real AF_VSOCK, inside the test VM: for each one the affected connection is
closed, the error is logged once for that connection, and the next connection works.

The VM is slow (TCG), so one ``vsock-proxy`` process serves every fault here, one service (vsock
port) per fault, each to its own target; only the fd-limit test starts a second one, since it
lowers that process's RLIMIT_NOFILE.  The same faults on TCP stand-ins, plus the ones where vsock
does not matter (blackhole, DNS), are in tests/test_faults.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass

import pytest

from tests.helpers import cli_env, echo
from tests.e2e.vsock import (IO_TIMEOUT, ProxyProcess, ThreadedTarget, free_vsock_port, recv_all, recv_exactly,
                                vsock_connect, vsock_proxy_command)
from tests.test_faults import (_sysctl_int, wait_stalled, CHUNK_BYTES, ThreadTarget, closed_how, problems_in,
                               socket_fd_count, wait_socket_fds)

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(600)]

MIB = 1 << 20
SETTLE = 1.0  # after a connection's line: time for a second line to show up, if there were one


def reset_mid_stream(sock: socket.socket) -> None:
    recv_exactly(sock, 5)
    sock.sendall(PARTIAL)
    time.sleep(1.0)  # the proxy has relayed the partial reply; now the RST
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


PARTIAL = os.urandom(300 * 1024)
ABRUPT: dict[str, object] = {}
HALF_CLOSE_REPLY = os.urandom(3 * MIB)


def bulk_both_ways(sock: socket.socket) -> None:
    """Push bytes without end while reading everything; record how the connection ended."""
    block = os.urandom(CHUNK_BYTES)

    def push() -> None:
        try:
            while True:
                sock.sendall(block)
        except OSError as exc:
            ABRUPT["pusher"] = errno.errorcode.get(exc.errno, str(exc))

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    received = 0
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                ABRUPT["end"] = "eof"
                break
            received += len(data)
            ABRUPT["received"] = received
    except OSError as exc:
        ABRUPT["end"] = errno.errorcode.get(exc.errno, str(exc))
    ABRUPT["ended_at"] = time.monotonic()
    try:
        sock.shutdown(socket.SHUT_RDWR)  # stops the pusher if it is still blocked
    except OSError:
        pass
    pusher.join(timeout=IO_TIMEOUT)


def reply_after_eof(sock: socket.socket) -> None:
    got = recv_all(sock)
    time.sleep(1.0)  # well after the proxy has passed the enclave's EOF on
    sock.sendall(hashlib.sha256(got).digest() + HALF_CLOSE_REPLY)
    sock.shutdown(socket.SHUT_WR)


@dataclass
class Rig:
    process: ProxyProcess
    ports: dict[str, int]
    targets: dict[str, object]
    refusing_port: int
    held: socket.socket


def the_one_line(process: ProxyProcess, client_port: int) -> str:
    """The single log line about the enclave connection from vsock port ``client_port``."""
    needle = f":{client_port} target="
    line = process.wait_for(needle, timeout=IO_TIMEOUT)
    time.sleep(SETTLE)
    mentions = [entry for entry in process.drain() if needle in entry]
    assert mentions == [line], mentions
    return line


def echo_works(port: int, size: int = MIB) -> None:
    payload = os.urandom(size)
    with vsock_connect(port) as client:
        sender = threading.Thread(target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_all(client)
        sender.join(timeout=IO_TIMEOUT)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """One proxy, five services: refuse, reset, abrupt, half-close, slow (a P/S/E ThreadTarget)."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, not listening: connects are refused
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    targets: dict[str, object] = {
        "reset": ThreadedTarget(reset_mid_stream),
        "abrupt": ThreadedTarget(bulk_both_ways),
        "half": ThreadedTarget(reply_after_eof),
        "slow": ThreadTarget(),
    }
    target_ports = {name: target.port for name, target in targets.items()}
    target_ports["refuse"] = held.getsockname()[1]
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(target_ports):
        ports = {name: free_vsock_port() for name in target_ports}
    config = tmp_path_factory.mktemp("faults") / "vsock-proxy.yaml"
    config.write_text("allowlist:\n"
                      + "".join(f"- {{address: 127.0.0.1, port: {port}}}\n" for port in target_ports.values())
                      + "services:\n"
                      + "".join(f"- {{listen_port: {ports[name]}, address: 127.0.0.1, port: {port}}}\n"
                                for name, port in target_ports.items()))
    # One process: a test bounds its RSS, which a parent of workers would not show.
    process = ProxyProcess([*vsock_proxy_command(), "--processes", "1", "-w", "32", "--config", str(config)],
                           cli_env())
    rig = Rig(process, ports, targets, target_ports["refuse"], held)
    try:
        process.wait_listening(count=len(ports))
        yield rig
        assert process.stop() == 0
        assert problems_in(process.lines) == [], process.text()
    finally:
        process.kill()
        for target in targets.values():
            target.stop()
        held.close()


# --------------------------------------------------------------------------- target refuses

def test_target_refuses(rig):
    with vsock_connect(rig.ports["refuse"]) as client:
        client_port = client.getsockname()[1]
        assert closed_how(client, IO_TIMEOUT) == "eof"
    line = the_one_line(rig.process, client_port)
    assert " WARNING refused enclave=" in line, line
    assert line.endswith(f"target=127.0.0.1:{rig.refusing_port}: 127.0.0.1:{rig.refusing_port}: "
                         "Connection refused"), line

    rig.targets["refuse"] = ThreadedTarget(echo, port=rig.refusing_port)  # the target comes up
    rig.held.close()
    echo_works(rig.ports["refuse"])


# --------------------------------------------------------------------------- target resets mid-stream

def test_target_accepts_then_resets_mid_stream(rig):
    with vsock_connect(rig.ports["reset"]) as client:
        client_port = client.getsockname()[1]
        client.sendall(b"hello")
        assert recv_exactly(client, len(PARTIAL)) == PARTIAL
        assert closed_how(client, IO_TIMEOUT) in ("eof", "reset")
    line = the_one_line(rig.process, client_port)
    assert f" up=5 down={len(PARTIAL)} " in line, line
    assert line.endswith(" end=target-error(Connection reset by peer)"), line

    rig.targets["reset"].handler = echo
    echo_works(rig.ports["reset"])


# --------------------------------------------------------------------------- enclave disconnects abruptly

def test_enclave_disconnects_abruptly_mid_transfer(rig):
    ABRUPT.clear()
    client = vsock_connect(rig.ports["abrupt"])
    client_port = client.getsockname()[1]
    try:
        uploader = threading.Thread(target=client.sendall, args=(os.urandom(8 * MIB),))
        uploader.start()
        assert len(recv_exactly(client, 4 * MIB)) == 4 * MIB
        uploader.join(timeout=IO_TIMEOUT)
        assert not uploader.is_alive()
        deadline = time.monotonic() + IO_TIMEOUT
        while ABRUPT.get("received") != 8 * MIB and time.monotonic() < deadline:
            time.sleep(0.05)  # the whole upload has reached the target: only the download is in flight
    finally:
        closed_at = time.monotonic()
        client.close()  # with the target's bytes still streaming in (vsock has no SO_LINGER-0 reset)
    line = the_one_line(rig.process, client_port)
    deadline = time.monotonic() + IO_TIMEOUT
    while "ended_at" not in ABRUPT and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ABRUPT.get("end") in ("eof", "ECONNRESET"), ABRUPT
    assert ABRUPT["received"] == 8 * MIB, ABRUPT
    assert ABRUPT["ended_at"] - closed_at < 10, "the target's side stayed open"
    assert f" up={8 * MIB} " in line, line
    assert line.split(" end=")[1] in ("enclave-error(Broken pipe)", "enclave-error(Connection reset by peer)"), \
        line

    rig.targets["abrupt"].handler = echo
    echo_works(rig.ports["abrupt"], 4 * MIB)


# --------------------------------------------------------------------------- target sends after half-close

def test_target_sends_after_the_enclave_has_half_closed(rig):
    request = os.urandom(100 * 1024)
    for _ in range(2):  # the fault path, then the next connection along the same one
        with vsock_connect(rig.ports["half"]) as client:
            client_port = client.getsockname()[1]
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            answer = recv_all(client)
        assert answer == hashlib.sha256(request).digest() + HALF_CLOSE_REPLY
        line = the_one_line(rig.process, client_port)
        assert f" up={len(request)} down={32 + len(HALF_CLOSE_REPLY)} " in line and line.endswith(" end=eof"), line
    assert rig.targets["half"].errors == []


# --------------------------------------------------------------------------- the enclave never reads

def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _upload_rate(port: int, size: int) -> float:
    """MB/s of a one-way upload of ``size`` bytes to the sink, as counted by the target."""
    block = memoryview(os.urandom(MIB))
    with vsock_connect(port, timeout=240) as client:
        started = time.perf_counter()
        client.sendall(b"S")
        for offset in range(0, size, len(block)):
            client.sendall(block[:min(len(block), size - offset)])
        client.shutdown(socket.SHUT_WR)
        count = int.from_bytes(recv_exactly(client, 8), "big")
        elapsed = time.perf_counter() - started
    assert count == size
    return size / elapsed / 1e6


def test_enclave_never_reads_memory_stays_bounded_and_others_keep_going(rig):
    target: ThreadTarget = rig.targets["slow"]
    port = rig.ports["slow"]
    pid = rig.process.proc.pid
    bulk = 32 * MIB
    for _ in range(2):  # warm-up: under TCG the first transfers are much slower
        _upload_rate(port, bulk)
    solo = max(_upload_rate(port, bulk) for _ in range(3))
    rss_before = _rss_kib(pid)
    first = len(target.pushed)
    stalled = []
    try:
        for _ in range(2):
            client = vsock_connect(port)
            stalled.append(client)
            client.sendall(b"P")  # ... and never reads
        vsock_buffer = stalled[0].getsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE)
        deadline = time.monotonic() + IO_TIMEOUT
        while len(target.pushed) < first + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pushed = wait_stalled(target.pushed, range(first, first + 2), quiet=3.0, timeout=IO_TIMEOUT)
        rss_stalled = _rss_kib(pid)
        # What the target got rid of sits in its send buffer, the proxy's TCP receive buffer, the
        # enclave's vsock buffer, or the proxy's one chunk in flight.
        bound = (_sysctl_int("/proc/sys/net/ipv4/tcp_wmem", 2) + _sysctl_int("/proc/sys/net/ipv4/tcp_rmem", 2)
                 + vsock_buffer + CHUNK_BYTES)
        assert all(0 < count <= bound for count in pushed), (pushed, bound)
        assert rss_stalled - rss_before <= (2 * CHUNK_BYTES + 8 * MIB) // 1024, (rss_before, rss_stalled)

        loaded = max(_upload_rate(port, bulk) for _ in range(3))
        with vsock_connect(port) as other:  # a new connection beside them is served
            _echo_e(other, b"E" + os.urandom(64 * 1024))
        assert [target.pushed[i] for i in range(first, first + 2)] == pushed, "a stalled reader moved"
    finally:
        for client in stalled:
            client.close()
    print(f"\nvsock bulk: solo {solo:.1f} MB/s, beside 2 stalled readers {loaded:.1f} MB/s; pushed {pushed} "
          f"(bound {bound}); proxy RSS {rss_before} -> {rss_stalled} KiB")
    assert loaded >= 0.5 * solo, (solo, loaded)
    assert target.errors == []


# --------------------------------------------------------------------------- fd limit (a second proxy)

def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settled_fds(pid: int, quiet: float = 2.0, timeout: float = IO_TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    last, since = _fds(pid), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the proxy's fd count kept changing"
        time.sleep(0.1)
        now = _fds(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _echo_e(client: socket.socket, payload: bytes) -> None:
    client.sendall(payload)
    assert recv_exactly(client, len(payload)) == payload


def test_fd_limit_accept_errors_are_survived_and_logged_without_a_busy_loop(proxy):
    target = ThreadTarget()
    try:
        port = free_vsock_port()
        # One process: the test limits and reads its descriptors and CPU time.
        process = proxy(["--processes", "1", "-w", "100", str(port), "127.0.0.1", str(target.port)],
                        allow=[("127.0.0.1", target.port)])
        pid = process.proc.pid
        with vsock_connect(port) as warm:
            _echo_e(warm, b"Ewarm-up")
        fds = _settled_fds(pid)
        sockets = socket_fd_count(pid)
        served = 4
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (fds + 2 * served, fds + 2 * served))
        opened, waiting = [], None
        try:
            for index in range(served):
                opened.append(vsock_connect(port))
                _echo_e(opened[-1], b"E%d" % index)
            assert _fds(pid) == fds + 2 * served
            waiting = vsock_connect(port)  # connected by the kernel, waits in the backlog
            waiting.sendall(b"Ewaiting")
            process.wait_for("accept failed: Too many open files", timeout=IO_TIMEOUT)

            time.sleep(2)  # past the first, quick retries of the back-off
            count_before, cpu_before = len(process.drain()), _cpu_seconds(pid)
            time.sleep(3)
            cpu_used, new_lines = _cpu_seconds(pid) - cpu_before, process.drain()[count_before:]
            assert cpu_used < 0.75, f"{cpu_used:.2f} s of CPU in 3 s at the fd limit: a busy loop"
            assert 1 <= len(new_lines) <= 6, new_lines
            assert all("WARNING accept failed: Too many open files; retrying in" in line for line in new_lines)

            for client in opened:  # the open connections are unaffected
                _echo_e(client, b"still here")
            for client in opened:
                client.close()
            assert recv_exactly(waiting, 8) == b"Ewaiting"  # served once fds come back
        finally:
            for client in opened:
                client.close()
            if waiting is not None:
                waiting.close()
        wait_socket_fds(pid, sockets, timeout=IO_TIMEOUT)
        with vsock_connect(port) as client:
            _echo_e(client, b"Enext connection works")
        assert process.stop() == 0
        assert problems_in(process.lines) == [], process.text()
        assert "refused" not in process.text()
    finally:
        target.stop()
