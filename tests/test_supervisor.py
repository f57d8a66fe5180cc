"""vsockproxy.supervisor on the host: start, reload, drain and sd_notify, through a TCP listener factory.

The same life cycle over real vsock runs in the VM (tests/e2e/test_vsock_operations.py); signals at
awkward moments are in test_signals.py.
"""

from __future__ import annotations

import socket

import gevent
import gevent.socket
import pytest

from tests.helpers import TcpListeners, echo, recv_exactly, supervisor_for
from vsockproxy.listen import ListenError
from vsockproxy.notify import Notifier

pytestmark = pytest.mark.timeout(60)


def services_yaml(target_port: int, ports: list[int], allowed: int | None = None) -> str:
    allowed = target_port if allowed is None else allowed
    return ("allowlist:\n"
            f"- {{address: 127.0.0.1, port: {allowed}}}\n"
            "services:\n"
            + "".join(f"- {{listen_port: {port}, address: 127.0.0.1, port: {target_port}}}\n" for port in ports))


class NotifySocket:
    """A service manager's end of NOTIFY_SOCKET: collects what the proxy says."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # plain: read without waiting
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.path = path

    def messages(self) -> list[str]:
        found = []
        while True:
            try:
                found.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return found


@pytest.fixture
def rig(tmp_path, tcp_target):
    """``rig(ports)``: a started Supervisor serving ``ports`` towards one echo target."""
    config = tmp_path / "vsock-proxy.yaml"
    notify = NotifySocket(str(tmp_path / "notify"))
    started = []

    def start(ports: list[int]):
        target = tcp_target(echo)
        config.write_text(services_yaml(target.port, ports))
        listeners = TcpListeners()
        supervisor = supervisor_for(["--config", str(config), "--shutdown-grace", "1"], listeners)
        supervisor.notifier = Notifier(notify.path)
        supervisor.start()
        started.append(supervisor)
        return supervisor, listeners, target, config, notify

    yield start
    for supervisor in started:
        supervisor.drain(0)
        supervisor.notifier.close()
    notify.sock.close()


def echoes(address) -> bool:
    with gevent.socket.create_connection(address, timeout=10) as client:
        client.sendall(b"ping")
        return recv_exactly(client, 4) == b"ping"


def refused(address) -> bool:
    try:
        gevent.socket.create_connection(address, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_start_listens_on_every_service_then_says_ready(rig):
    supervisor, listeners, _, _, notify = rig([5001, 5002])
    assert sorted(listeners.addresses) == [5001, 5002]
    assert all(echoes(address) for address in listeners.addresses.values())
    (ready,) = notify.messages()
    assert ready.startswith("READY=1\nSTATUS=2 service(s), ")


def test_reload_adds_removes_and_keeps_services_and_says_so(rig):
    supervisor, listeners, target, config, notify = rig([5001, 5002])
    notify.messages()
    removed = listeners.addresses[5002]
    config.write_text(services_yaml(target.port, [5001, 5003]))
    assert supervisor.reload()
    assert sorted(supervisor.servers) == [5001, 5003]
    assert echoes(listeners.addresses[5001]) and echoes(listeners.addresses[5003])
    assert refused(removed)
    reloading, ready = notify.messages()
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=") and ready.startswith("READY=1\n")


def test_a_bad_reload_changes_nothing(rig):
    supervisor, listeners, target, config, _ = rig([5001])
    config.write_text(services_yaml(target.port, [5001, 5002], allowed=target.port + 1))  # now not allowed
    assert not supervisor.reload()
    assert sorted(supervisor.servers) == [5001] and 5002 not in listeners.addresses
    assert echoes(listeners.addresses[5001])


def test_a_listener_that_fails_leaves_no_other_bound(tmp_path, tcp_target):
    """Start-up binds all services or none: the first listener is closed when the second fails."""
    target = tcp_target(echo)
    config = tmp_path / "vsock-proxy.yaml"
    config.write_text(services_yaml(target.port, [5001, 5002]))
    listeners = TcpListeners()

    def listen(port: int) -> socket.socket:
        if port == 5002:
            raise ListenError("cannot listen on vsock any CID port 5002: it is already in use")
        return listeners(port)

    supervisor = supervisor_for(["--config", str(config)], listen)
    with pytest.raises(ListenError, match="port 5002: it is already in use"):
        supervisor.start()
    assert listeners.sockets[5001].fileno() == -1
    assert refused(listeners.addresses[5001])


def test_drain_says_stopping_and_closes_every_listener(rig):
    supervisor, listeners, _, _, notify = rig([5001, 5002])
    notify.messages()
    supervisor.drain(0)
    (stopping,) = notify.messages()
    assert stopping == "STOPPING=1\nSTATUS=draining 0 connection(s)"
    assert all(refused(address) for address in listeners.addresses.values())
