"""Destination safety through each request-routed mode on the host (issue 19), and ``from_cids``.

The real supervisor serves http-connect, socks5 and sni on TCP listeners.  Its resolvers
answer from a table that maps names under wildcards to loopback (127.0.0.1 and
``::ffff:127.0.0.1``, where an echo target listens) and to the metadata service's
addresses.  A stand-in connector wraps the server's connect step: it records every
address and lets only loopback through, so even a bug could send nothing to
169.254.169.254 or fd00:ec2::254.  A refusal is checked by the mode's reply bytes, by an
empty record of tried addresses (and a target that accepted nothing), by its log line and
by its metrics outcome.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import struct

import gevent
import gevent.socket
import pytest
from prometheus_client import generate_latest

import vsockproxy.server as server_module
import vsockproxy.supervisor as supervisor_module
from tests.helpers import (GlibcLikeDNS, TcpListeners, client_hello, echo, http_response_head, recv_all,
                           recv_exactly, supervisor_for, wait_until)
from vsockproxy.metrics import Metrics
from vsockproxy.resolver import Endpoint, Resolver
from vsockproxy.server import Route, VsockProxyServer

pytestmark = pytest.mark.timeout(60)

MODES = ["http-connect", "socks5", "sni"]
ACCESS_DENIED = bytes.fromhex("15030300020231")
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("::ffff:127.0.0.0/104")]


class LoopbackOnlyConnector:
    """The server's connect step, for loopback addresses only; every other address is recorded and refused."""

    def __init__(self, real) -> None:
        self.real = real
        self.tried: list[str] = []

    def __call__(self, upstream, address, timeout) -> None:
        ip = ipaddress.ip_address(address[0])
        self.tried.append(str(ip))
        if not any(ip in network for network in LOOPBACK):
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
        self.real(upstream, address, timeout)


@pytest.fixture
def safety(tmp_path, tcp_target, caplog, monkeypatch):
    """A started supervisor: http-connect on vsock port 9000, socks5 on 9001, sni on 9002 (the echo target's port).

    ``start(allowlist, after="", socks5="")`` writes the file: ``allowlist`` entries (``{port}`` is the
    target's port), then ``after`` (a deny: list, say); ``socks5`` adds settings to that service.
    """
    caplog.set_level(logging.INFO, logger="vsockproxy")
    connector = LoopbackOnlyConnector(server_module._connect_within)
    monkeypatch.setattr(server_module, "_connect_within", connector)
    dns = GlibcLikeDNS()
    real = Resolver
    monkeypatch.setattr(supervisor_module, "Resolver",
                        lambda family, ttl, **kwargs: real(family, ttl, getaddrinfo=dns, **kwargs))
    started = []

    class Setup:
        def __init__(self, allowlist: str, after: str = "", socks5: str = "") -> None:
            self.target = tcp_target(echo)
            port = self.port = self.target.port
            dns.records.update({
                "a.wild.test": ["127.0.0.1"], "b.wild.test": ["::ffff:127.0.0.1"],
                "imds.wild.test": ["169.254.169.254"], "imds6.wild.test": ["fd00:ec2::254"],
                "a.inside.test": ["127.0.0.1"], "b.inside.test": ["::ffff:127.0.0.1"],
                "localhost": ["127.0.0.1"], "x.blocked.test": ["127.0.0.1"], "three.test": ["127.0.0.3"]})
            self.config = tmp_path / "vsock-proxy.yaml"
            self.write(allowlist, after, socks5)
            self.listeners = TcpListeners()
            self.supervisor = supervisor_for(["--config", str(self.config), "--shutdown-grace", "1"], self.listeners)
            self.supervisor.start()
            started.append(self.supervisor)
            self.connector = connector

        def write(self, allowlist: str, after: str = "", socks5: str = "") -> None:
            self.config.write_text(
                "allowlist:\n" + allowlist.format(port=self.port) + after +
                f"services:\n- {{listen_port: 9000, mode: http-connect}}\n- {{listen_port: 9001, mode: socks5{socks5}}}\n"
                f"- {{listen_port: 9002, mode: sni, port: {self.port}}}\n")

        def connect(self, mode: str) -> gevent.socket.socket:
            return gevent.socket.create_connection(self.listeners.addresses[9000 + MODES.index(mode)], timeout=10)

        def counted(self, mode: str) -> dict[tuple[str, str], float]:
            """vsockproxy_requests_total of the mode's service, by (outcome, allowed_by)."""
            text = generate_latest(self.supervisor.metrics.registry).decode()
            port = 9000 + MODES.index(mode)
            return {(outcome, allowed_by): float(value) for allowed_by, outcome, value in re.findall(
                rf'vsockproxy_requests_total{{allowed_by="([^"]*)",mode="{mode}",outcome="([^"]*)",'
                rf'service="{port}"}} (\S+)', text)}

        def failed(self, port: int) -> dict[str, float]:
            text = generate_latest(self.supervisor.metrics.registry).decode()
            return {reason: float(value) for reason, value in re.findall(
                rf'vsockproxy_connections_failed_total{{reason="([^"]*)",service="{port}"}} (\S+)', text)}

    yield Setup
    for supervisor in started:
        supervisor.drain(0)


def ask(setup, mode: str, host: str) -> tuple[bool, gevent.socket.socket]:
    """Request ``host`` at the target's port in ``mode``: (relayed?, the client socket).

    A refusal must be the mode's own: 403, SOCKS5 0x02, the TLS alert access_denied.
    """
    client = setup.connect(mode)
    if mode == "http-connect":
        client.sendall(f"CONNECT {host}:{setup.port} HTTP/1.1\r\nHost: {host}:{setup.port}\r\n\r\n".encode())
        head = http_response_head(client)
        assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 403 ")), head
        return head.startswith(b"HTTP/1.1 200 "), client
    if mode == "socks5":
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        name = host.encode()
        client.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", setup.port))
        reply = recv_exactly(client, 10)
        assert reply[:2] in (b"\x05\x00", b"\x05\x02"), reply
        return reply[:2] == b"\x05\x00", client
    hello = client_hello(host)
    client.sendall(hello)
    first = recv_exactly(client, len(ACCESS_DENIED))
    if first == ACCESS_DENIED:
        assert recv_all(client) == b""
        return False, client
    assert first + recv_exactly(client, len(hello) - len(first)) == hello  # the echo target got the ClientHello
    return True, client


def assert_relays(setup, mode: str, host: str) -> None:
    relayed, client = ask(setup, mode, host)
    with client:
        assert relayed, f"{host} was refused in mode {mode}"
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
    wait_until(lambda: setup.target.accepted == 1, what="the target's one connection")


def assert_refused(setup, caplog, mode: str, host: str, outcome: str, *needles: str) -> str:
    relayed, client = ask(setup, mode, host)
    client.close()
    assert not relayed
    line = wait_until(lambda: next((r.getMessage() for r in caplog.records
                                    if f"request={host}:{setup.port}:" in r.getMessage()), None),
                      what="the refusal's log line")
    assert line.startswith("refused enclave=") and f"mode={mode}" in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    assert setup.connector.tried == [] and setup.target.accepted == 0, setup.connector.tried
    assert sum(count for (counted, _), count in setup.counted(mode).items() if counted == outcome) == 1
    assert setup.failed(9000 + MODES.index(mode)) == {outcome: 1.0}
    return line


WILD = "- {{address: '*.wild.test', port: {port}}}\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host, needle", [("a.wild.test", "127.0.0.1 (internal address in 127.0.0.0/8 (loopback)"),
                                          ("b.wild.test", "(internal address in IPv4-mapped spelling of an address "
                                                          "in 127.0.0.0/8 (loopback)"),
                                          ("imds.wild.test", "169.254.169.254 (internal address in 169.254.0.0/16"),
                                          ("imds6.wild.test", "fd00:ec2::254 (internal address in fd00:ec2::254/128")])
def test_a_wildcards_name_answering_internal_addresses_is_refused_with_no_connection(safety, caplog, mode, host,
                                                                                     needle):
    setup = safety(WILD)
    line = assert_refused(setup, caplog, mode, host, "internal-address", needle, "does not say allow_internal")
    assert setup.counted(mode) == {("internal-address", f"*.wild.test:{setup.port}"): 1.0}
    assert host not in generate_latest(setup.supervisor.metrics.registry).decode(), "a label names the request"
    assert "resolves only to refused addresses" in line


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", ["a.inside.test", "b.inside.test"])
def test_allow_internal_relays_a_wildcards_name_to_loopback(safety, mode, host):
    setup = safety(WILD + "- {{address: '*.inside.test', port: {port}, allow_internal: true}}\n")
    assert_relays(setup, mode, host)
    answer = "127.0.0.1" if host.startswith("a.") else "::ffff:127.0.0.1"
    assert setup.connector.tried == [str(ipaddress.ip_address(answer))]


@pytest.mark.parametrize("mode", MODES)
def test_an_exact_localhost_entry_relays_as_upstream(safety, mode):
    assert_relays(safety(WILD + "- {{address: localhost, port: {port}}}\n"), mode, "localhost")


@pytest.mark.parametrize("mode", ["http-connect", "socks5"])  # an address is no server_name: sni cannot ask for one
def test_a_127_0_0_0_8_entry_relays_the_address_as_upstream(safety, mode):
    setup = safety(WILD + "- {{address: 127.0.0.0/8, port: {port}}}\n")
    relayed, client = ask(setup, mode, "127.0.0.1") if mode == "http-connect" else _socks5_by_address(setup)
    with client:
        assert relayed
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"


def _socks5_by_address(setup) -> tuple[bool, gevent.socket.socket]:
    client = setup.connect("socks5")
    client.sendall(b"\x05\x01\x00")
    assert recv_exactly(client, 2) == b"\x05\x00"
    client.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", setup.port))
    return recv_exactly(client, 10)[:2] == b"\x05\x00", client


@pytest.mark.parametrize("mode", MODES)
def test_deny_over_an_exact_entry_is_refused_by_name_and_by_address(safety, caplog, tcp_target, mode):
    third = tcp_target(echo, host="127.0.0.3")
    setup = safety("- {{address: x.blocked.test, port: {port}}}\n- {{address: localhost, port: {port}}}\n",
                   "deny:\n- '*.blocked.test'\n- 127.0.0.3\n")
    assert_refused(setup, caplog, mode, "x.blocked.test", "denied", "is refused by the deny entry *.blocked.test of ")
    assert setup.counted(mode) == {("denied", f"x.blocked.test:{setup.port}"): 1.0}
    assert_relays(setup, mode, "localhost")  # the rest of the allowlist still works
    del third


def test_deny_of_an_address_refuses_what_an_exact_entry_resolves_to(safety, caplog):
    setup = safety("- {{address: three.test, port: {port}}}\n", "deny: [127.0.0.3]\n")
    assert_refused(setup, caplog, "http-connect", "three.test", "denied",
                   "three.test:{} resolves only to refused addresses: 127.0.0.3 (deny entry 127.0.0.3)".format(
                       setup.port))


def test_a_reload_applies_a_new_deny_to_new_connections(safety, caplog):
    setup = safety("- {{address: localhost, port: {port}}}\n")
    relayed, open_connection = ask(setup, "http-connect", "localhost")
    assert relayed
    setup.write("- {{address: localhost, port: {port}}}\n", "deny: [localhost]\n")
    assert setup.supervisor.reload()
    relayed, client = ask(setup, "http-connect", "localhost")
    client.close()
    assert not relayed
    with open_connection:  # established before the reload: it keeps its route
        open_connection.sendall(b"still")
        assert recv_exactly(open_connection, 5) == b"still"
    assert "is refused by the deny entry localhost" in wait_until(
        lambda: next((r.getMessage() for r in caplog.records if "deny entry" in r.getMessage()), None))


# --------------------------------------------------------------------------- from_cids

def test_a_service_with_from_cids_closes_a_peer_that_is_not_a_listed_enclave_at_once(safety, caplog, tmp_path):
    """On TCP stand-in listeners a peer has no CID: it is closed before anything is read, and counted."""
    setup = safety("- {{address: localhost, port: {port}}}\n", socks5=", from_cids: [16, 17]")
    with setup.connect("socks5") as client:
        client.sendall(b"\x05\x01\x00")
        try:
            assert recv_all(client) == b""  # no method choice: the greeting was never read
        except ConnectionResetError:  # closed with the greeting unread: a reset
            pass
    line = wait_until(lambda: next((r.getMessage() for r in caplog.records if "from_cids" in r.getMessage()), None))
    assert line.startswith("refused enclave=127.0.0.1:") and "mode=socks5" in line, line
    assert "not a vsock peer, so not in the service's from_cids (16, 17)" in line, line
    assert setup.failed(9001) == {"cid-not-allowed": 1.0}
    assert setup.counted("socks5") == {}
    assert setup.target.accepted == 0


@pytest.fixture
def cid_server(tcp_target):
    """``serve(from_cids)``: a fixed-route VsockProxyServer to an echo target, driven by handle() with a vsock
    peer address ``(cid, port)`` over a socketpair, as accept() would hand it a vsock connection."""
    made = []

    def make(from_cids):
        target = tcp_target(echo)
        endpoint = Endpoint(socket.AF_INET, ("127.0.0.1", target.port), ipaddress.ip_address("127.0.0.1"))
        route = Route(f"127.0.0.1:{target.port}", lambda: [endpoint], from_cids=from_cids)
        listener = socket.create_server(("127.0.0.1", 0))
        server = VsockProxyServer(listener, route, num_workers=2, metrics=Metrics().service("8000"))
        made.append(listener)
        return server, target

    yield make
    for listener in made:
        listener.close()


def handle_from(server, cid: int) -> tuple[gevent.socket.socket, gevent.Greenlet, socket.socket]:
    """The enclave's end (cooperative, for the test), the handler of the proxy's end, and that end."""
    enclave, proxy_side = socket.socketpair()
    proxy_side.setblocking(False)
    enclave = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=enclave.detach())
    enclave.settimeout(10)
    return enclave, gevent.spawn(server.handle, proxy_side, (cid, 1234)), proxy_side


def test_from_cids_relays_a_listed_enclave(cid_server):
    server, target = cid_server(frozenset({16, 17}))
    enclave, handler, proxy_side = handle_from(server, 17)
    enclave.sendall(b"from 17")
    enclave.shutdown(socket.SHUT_WR)
    assert recv_all(enclave) == b"from 17"
    handler.join(timeout=10)
    enclave.close()
    proxy_side.close()
    assert target.accepted == 1 and server.metrics.completed == 1


def test_from_cids_closes_another_enclave_before_reading_or_connecting(cid_server, caplog):
    caplog.set_level(logging.INFO, logger="vsockproxy")
    server, target = cid_server(frozenset({16, 17}))
    enclave, handler, proxy_side = handle_from(server, 18)
    enclave.sendall(b"never read")
    handler.join(timeout=10)
    assert handler.successful()
    assert proxy_side.recv(100) == b"never read"  # still there: the handler read nothing
    enclave.close()
    proxy_side.close()
    assert target.accepted == 0
    assert server.metrics.failures == {"cid-not-allowed": 1} and server.metrics.active == 0
    (line,) = [r.getMessage() for r in caplog.records if "from_cids" in r.getMessage()]
    assert line == f"refused enclave=18:1234 target=127.0.0.1:{target.port}: CID 18 is not in the service's " \
                   f"from_cids (16, 17)"
