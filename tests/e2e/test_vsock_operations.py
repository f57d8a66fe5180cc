"""Operations on real vsock: several services, SIGHUP reload, idle timeout, metrics, sd_notify.

Every test runs one ``vsock-proxy`` process serving three services on three
vsock ports from the YAML file alone.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.request

import pytest

from tests.e2e.vsock import IO_TIMEOUT, free_vsock_port, recv_exactly, refused, vsock_connect
from tests.helpers import echo

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

MIB = 1 << 20


def services_yaml(target_port: int, listen_ports, extra: dict[int, str] | None = None) -> str:
    extra = extra or {}
    lines = ["allowlist:", f"- {{address: 127.0.0.1, port: {target_port}}}", "services:"]
    for port in listen_ports:
        lines.append(f"- {{listen_port: {port}, address: 127.0.0.1, port: {target_port}{extra.get(port, '')}}}")
    return "\n".join(lines) + "\n"


def echo_once(port: int, payload: bytes = b"hello") -> bytes:
    with vsock_connect(port) as client:
        client.sendall(payload)
        return recv_exactly(client, len(payload))


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_reload_adds_and_removes_services_while_a_transfer_continues(proxy, target):
    server = target(echo)
    one, two, three, four = (free_vsock_port() for _ in range(4))
    process = proxy([], yaml=services_yaml(server.port, [one, two, three]), listeners=3)
    size = 24 * MIB
    payload = os.urandom(size)
    outcome: dict[str, bytes] = {}

    with vsock_connect(three, timeout=240) as long_lived:
        def paced_upload() -> None:
            for offset in range(0, size, MIB):
                long_lived.sendall(payload[offset:offset + MIB])
                time.sleep(0.05)
            long_lived.shutdown(socket.SHUT_WR)

        def download() -> None:
            digest = hashlib.sha256()
            while chunk := long_lived.recv(1 << 20):
                digest.update(chunk)
            outcome["digest"] = digest.digest()

        threads = [threading.Thread(target=paced_upload), threading.Thread(target=download)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        process.config.write_text(services_yaml(server.port, [two, three, four]))
        process.signal(signal.SIGHUP)
        process.wait_for("reload applied", timeout=IO_TIMEOUT)
        assert echo_once(four) == b"hello"
        assert echo_once(two) == b"hello"
        assert refused(one)
        for thread in threads:
            thread.join(timeout=240)
    assert outcome["digest"] == hashlib.sha256(payload).digest()
    assert f"up={size} down={size}" in process.wait_for("closed enclave=", timeout=IO_TIMEOUT, count=3)


def test_bad_reload_keeps_everything_working(proxy, target):
    server = target(echo)
    ports = [free_vsock_port() for _ in range(3)]
    process = proxy([], yaml=services_yaml(server.port, ports), listeners=3)
    not_yaml = "allowlist: ["
    not_allowed = f"allowlist: []\nservices:\n- {{listen_port: {ports[0]}, address: 10.9.9.9, port: 1}}\n"
    for count, bad in enumerate((not_yaml, not_allowed), 1):
        process.config.write_text(bad)
        process.signal(signal.SIGHUP)  # one at a time: pending signals of one kind coalesce
        process.wait_for("reload rejected", timeout=IO_TIMEOUT, count=count)
    for port in ports:
        assert echo_once(port) == b"hello"


def test_idle_timeout_closes_an_idle_connection(proxy, target):
    server = target(echo)
    ports = [free_vsock_port() for _ in range(3)]
    process = proxy([], yaml=services_yaml(server.port, ports, {ports[1]: ", idle_timeout: 2"}), listeners=3)
    with vsock_connect(ports[1]) as client:
        client.sendall(b"then silence")
        assert recv_exactly(client, 12) == b"then silence"
        started = time.monotonic()
        client.settimeout(IO_TIMEOUT)
        assert client.recv(1) == b""
        assert time.monotonic() - started >= 1.5
    assert "end=idle-timeout" in process.wait_for("closed enclave=", timeout=IO_TIMEOUT)
    with vsock_connect(ports[0]) as busy:  # a service without the timeout keeps its connections
        busy.sendall(b"a")
        assert recv_exactly(busy, 1) == b"a"
        time.sleep(3)
        busy.sendall(b"b")
        assert recv_exactly(busy, 1) == b"b"


def test_metrics_match_the_traffic_sent(proxy, target):
    server = target(echo)
    ports = [free_vsock_port() for _ in range(3)]
    metrics_port = free_tcp_port()
    dead_port = free_tcp_port()
    yaml = services_yaml(server.port, ports) + f"- {{listen_port: {ports[2] + 1}, address: 127.0.0.1, port: {dead_port}}}\n"
    yaml = yaml.replace("allowlist:\n", f"allowlist:\n- {{address: 127.0.0.1, port: {dead_port}}}\n")
    process = proxy(["--metrics-address", f"127.0.0.1:{metrics_port}"], yaml=yaml, listeners=4)
    sizes = [1000, 70000, 5]
    for size in sizes:
        assert echo_once(ports[0], os.urandom(size)) is not None
    assert echo_once(ports[1], b"x" * 123) == b"x" * 123
    assert refused(ports[2] + 1) or True  # accepted, then closed: the target is down
    process.wait_for("closed enclave=", timeout=IO_TIMEOUT, count=4)
    process.wait_for("refused enclave=", timeout=IO_TIMEOUT)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=IO_TIMEOUT).read().decode()

    def value(name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name}{{{wanted}}} not in metrics:\n{text}")

    first, second, down = str(ports[0]), str(ports[1]), str(ports[2] + 1)
    assert value("vsockproxy_connections_accepted_total", service=first) == 3
    assert value("vsockproxy_connections_completed_total", service=first) == 3
    assert value("vsockproxy_bytes_total", service=first, direction="enclave_to_target") == sum(sizes)
    assert value("vsockproxy_bytes_total", service=first, direction="target_to_enclave") == sum(sizes)
    assert value("vsockproxy_bytes_total", service=second, direction="enclave_to_target") == 123
    assert value("vsockproxy_active_connections", service=first) == 0
    assert value("vsockproxy_connections_failed_total", service=down, reason="connect") == 1
    process.signal(signal.SIGUSR1)
    summary = process.wait_for("summary:", timeout=IO_TIMEOUT)
    assert f"port {first}->127.0.0.1:{server.port}: active=0 accepted=3 completed=3 failed=0 " \
           f"up={sum(sizes)} down={sum(sizes)}" in summary


def test_sd_notify_ready_only_after_every_listener_is_bound(proxy, target):
    server = target(echo)
    ports = [free_vsock_port() for _ in range(3)]
    with tempfile.TemporaryDirectory(prefix="notify-") as directory:
        address = os.path.join(directory, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(address)
        notify.settimeout(START_WAIT)
        try:
            process = proxy([], yaml=services_yaml(server.port, ports), env={"NOTIFY_SOCKET": address},
                            wait=False)
            message = notify.recv(4096).decode()
            assert message.startswith("READY=1"), message
            for port in ports:  # bound already: a second bind fails, and a client is served
                probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                with pytest.raises(OSError):
                    probe.bind((socket.VMADDR_CID_ANY, port))
                probe.close()
                assert echo_once(port) == b"hello"
            assert "STATUS=3 service(s)" in message
            process.signal(signal.SIGHUP)
            assert notify.recv(4096).decode().startswith("RELOADING=1")
            assert notify.recv(4096).decode().startswith("READY=1")
            process.signal(signal.SIGTERM)
            assert notify.recv(4096).decode().startswith("STOPPING=1")
            assert process.finish(timeout=IO_TIMEOUT) == 0
        finally:
            notify.close()


START_WAIT = 120
