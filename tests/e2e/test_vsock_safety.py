"""Destination safety over real vsock (issue 19): internal answers, allow_internal, deny: and from_cids.

Names under wildcard entries are mapped in the guest's ``/etc/hosts`` (the VM's root is a
writable overlay that vanishes at exit; the module puts the file back anyway, for the
suites that run after it) to 127.0.0.1 and ``::ffff:127.0.0.1``, where an echo target
listens.  Through http-connect, socks5 and sni: refused, with no connection at the target;
relayed with ``allow_internal: true``, with an exact ``localhost`` entry and with a
``127.0.0.0/8`` entry; ``deny:`` over an exact entry refused; ``from_cids`` without and with
the client's CID (a client inside the VM connects from CID 1, vsock_loopback).
"""

from __future__ import annotations

import socket
import struct
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from tests.e2e.test_vsock_routing import (ACCESS_DENIED, assert_closed_without_reply, assert_http_refusal,
                                          http_connect, socks5_connect, socks5_reply)
from tests.e2e.vsock import (IN_VM, IO_TIMEOUT, ProxyProcess, ThreadedTarget, free_vsock_port, recv_exactly,
                             vsock_connect, vsock_proxy_command)
from tests.helpers import cli_env, client_hello, unused_tcp_port

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

HOSTS = Path("/etc/hosts")
#: What the module adds to the guest's /etc/hosts.
NAMES = {
    "a.wild.test": "127.0.0.1", "b.wild.test": "::ffff:127.0.0.1",
    "a.inside.test": "127.0.0.1", "b.inside.test": "::ffff:127.0.0.1",
    "x.blocked.test": "127.0.0.1",
}
MODES = ("http-connect", "socks5", "sni")


def echo(sock: socket.socket) -> None:
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


class Safety:
    """The module's proxy, its services, and the echo target every allowed request reaches."""

    def __init__(self, workdir: Path) -> None:
        self.target = ThreadedTarget(echo)
        self.port = self.target.port
        self.metrics_port = unused_tcp_port()
        self.ports: dict[str, int] = {}
        self.config = workdir / "vsock-proxy.yaml"
        self.proxy: ProxyProcess | None = None

    def start(self) -> None:
        services = {
            "http-connect": "mode: http-connect",
            "socks5": "mode: socks5",
            "sni": f"mode: sni, port: {self.port}",
            "from-1": "mode: http-connect, from_cids: [1]",
            "from-others": "mode: http-connect, from_cids: [16, 17]",
        }
        for key in services:
            while key not in self.ports or list(self.ports.values()).count(self.ports[key]) > 1:
                self.ports[key] = free_vsock_port()
        port = self.port
        self.config.write_text("\n".join([
            "allowlist:",
            f"- {{address: '*.wild.test', port: {port}}}",
            f"- {{address: '*.inside.test', port: {port}, allow_internal: true}}",
            f"- {{address: localhost, port: {port}}}",
            f"- {{address: 127.0.0.0/8, port: {port}}}",
            f"- {{address: x.blocked.test, port: {port}}}",
            "deny:",
            "- '*.blocked.test'",
            "services:",
            *(f"- {{listen_port: {self.ports[key]}, {settings}}}" for key, settings in services.items()),
        ]) + "\n")
        self.proxy = ProxyProcess([*vsock_proxy_command(), "--config", str(self.config),
                                   "--metrics-address", f"127.0.0.1:{self.metrics_port}"], cli_env())
        self.proxy.wait_listening(len(services))

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.kill()
        self.target.stop()

    def next_log(self, needle: str) -> Callable[[], str]:
        """A wait for the first log line with ``needle`` after those logged so far."""
        assert self.proxy is not None
        seen = sum(needle in line for line in self.proxy.drain())
        return lambda: self.proxy.wait_for(needle, timeout=IO_TIMEOUT, count=seen + 1)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=IO_TIMEOUT) as page:
            text = page.read().decode()
        found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
                 and all(f'{key}="{value}"' in line for key, value in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]


@pytest.fixture(scope="module")
def guest_hosts():
    """The names above in the guest's /etc/hosts for the module's tests, then the file as it was."""
    if not IN_VM:
        raise RuntimeError("refusing to edit /etc/hosts outside the test VM (VSOCKPROXY_IN_VM is not 1)")
    original = HOSTS.read_text()
    HOSTS.write_text(original + "".join(f"{address} {name}\n" for name, address in NAMES.items()))
    try:
        yield
    finally:
        HOSTS.write_text(original)


@pytest.fixture(scope="module")
def safety(guest_hosts, tmp_path_factory):
    setup = Safety(tmp_path_factory.mktemp("safety"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def ask(safety, mode: str, host: str) -> tuple[bool, socket.socket]:
    """Request ``host:PORT`` in ``mode`` over vsock: (relayed?, the client); a refusal must be the mode's own."""
    client = vsock_connect(safety.ports[mode])
    if mode == "http-connect":
        head = http_connect(client, host, safety.port)
        if head.startswith(b"HTTP/1.1 200 "):
            return True, client
        assert head.startswith(b"HTTP/1.1 403 "), head
        return False, client
    if mode == "socks5":
        reply = socks5_connect(client, host, safety.port)
        assert reply in (socks5_reply(0x00), socks5_reply(0x02)), reply
        return reply == socks5_reply(0x00), client
    hello = client_hello(host)
    client.sendall(hello)
    first = recv_exactly(client, len(ACCESS_DENIED))
    if first == ACCESS_DENIED:
        assert_closed_without_reply(client)
        return False, client
    assert first + recv_exactly(client, len(hello) - len(first)) == hello  # the echo target sent it back
    return True, client


def assert_relayed(safety, mode: str, host: str) -> None:
    peers = len(safety.target.peers)
    relayed, client = ask(safety, mode, host)
    with client:
        assert relayed, f"{host} refused in mode {mode}"
        client.sendall(b"over vsock")
        assert recv_exactly(client, 10) == b"over vsock"
    assert len(safety.target.peers) == peers + 1


def assert_refused(safety, mode: str, host: str, *needles: str) -> str:
    peers = len(safety.target.peers)
    line = safety.next_log(f"request={host}:{safety.port}:")
    relayed, client = ask(safety, mode, host)
    client.close()
    assert not relayed, f"{host} relayed in mode {mode}"
    found = line()
    assert " WARNING refused enclave=1:" in found and f"mode={mode}" in found, found
    for needle in needles:
        assert needle in found, (needle, found)
    time.sleep(0.2)  # a connection the proxy (wrongly) opened would be accepted by now
    assert len(safety.target.peers) == peers, "the target saw a connection"
    return found


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", ["a.wild.test", "b.wild.test"])
def test_a_wildcards_name_in_etc_hosts_answering_loopback_is_refused(safety, mode, host):
    assert_refused(safety, mode, host, "resolves only to refused addresses", "(loopback)",
                   f"the wildcard entry *.wild.test:{safety.port} does not say allow_internal")
    assert safety.metric("vsockproxy_requests_total", service=str(safety.ports[mode]), mode=mode,
                         outcome="internal-address", allowed_by=f"*.wild.test:{safety.port}") >= 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", ["a.inside.test", "b.inside.test"])
def test_allow_internal_relays(safety, mode, host):
    assert_relayed(safety, mode, host)


@pytest.mark.parametrize("mode", MODES)
def test_an_exact_localhost_entry_relays(safety, mode):
    assert_relayed(safety, mode, "localhost")


def test_a_127_0_0_0_8_entry_relays_an_address(safety):
    """http-connect by the address; socks5 by its IPv4 address type (sni cannot name an address)."""
    assert_relayed(safety, "http-connect", "127.0.0.1")
    peers = len(safety.target.peers)
    with vsock_connect(safety.ports["socks5"]) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        client.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", safety.port))
        assert recv_exactly(client, 10) == socks5_reply(0x00)
        client.sendall(b"by address")
        assert recv_exactly(client, 10) == b"by address"
    assert len(safety.target.peers) == peers + 1


@pytest.mark.parametrize("mode", MODES)
def test_deny_over_an_exact_entry_is_refused(safety, mode):
    assert_refused(safety, mode, "x.blocked.test", "is refused by the deny entry *.blocked.test of ")


def test_from_cids_with_the_clients_cid_relays(safety):
    peers = len(safety.target.peers)
    with vsock_connect(safety.ports["from-1"]) as client:
        assert http_connect(client, "localhost", safety.port).startswith(b"HTTP/1.1 200 ")
        client.sendall(b"from CID 1")
        assert recv_exactly(client, 10) == b"from CID 1"
    assert len(safety.target.peers) == peers + 1


def test_from_cids_without_the_clients_cid_closes_at_once(safety):
    peers = len(safety.target.peers)
    line = safety.next_log("from_cids")
    with vsock_connect(safety.ports["from-others"]) as client:
        client.sendall(f"CONNECT localhost:{safety.port} HTTP/1.1\r\n\r\n".encode())
        assert_closed_without_reply(client)  # no 403: the request was never read
    found = line()
    assert " WARNING refused enclave=1:" in found and "CID 1 is not in the service's from_cids (16, 17)" in found
    assert len(safety.target.peers) == peers
    assert safety.metric("vsockproxy_connections_failed_total", service=str(safety.ports["from-others"]),
                         reason="cid-not-allowed") == 1


def test_a_refusal_reply_is_the_modes_own(safety):
    """The whole http-connect answer is one 403; the requested name reaches no metrics label."""
    with vsock_connect(safety.ports["http-connect"]) as client:
        client.sendall(f"CONNECT a.wild.test:{safety.port} HTTP/1.1\r\n\r\n".encode())
        assert_http_refusal(client, 403)
    with urllib.request.urlopen(f"http://127.0.0.1:{safety.metrics_port}/metrics", timeout=IO_TIMEOUT) as page:
        assert "a.wild.test" not in page.read().decode()
