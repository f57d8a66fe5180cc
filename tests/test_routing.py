"""Request-routed services on the host (issue 13): http-connect, socks5 and sni through the real supervisor.

Each service listens on TCP 127.0.0.1 (TcpListeners) and relays to real TCP targets
on 127.0.0.1; names resolve through /etc/hosts (``localhost``), so no test needs
DNS.  Every refusal is checked three ways: the bytes the client is told, the
target that never sees a connection, and the log line.  The same modes over real
vsock, with curl, run in the VM (tests/e2e/test_vsock_routing.py).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import struct
import threading
import time

import gevent
import gevent.socket
import gevent.ssl
import pytest
from prometheus_client import generate_latest

from tests.helpers import (TcpListeners, client_hello, echo, http_response_head, recv_all, recv_exactly,
                           self_signed_certificate, supervisor_for, wait_until)

pytestmark = pytest.mark.timeout(60)

HTTP_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"


@pytest.fixture
def routed(tmp_path, tcp_target, caplog):
    """``routed(services, allowlist_ports)``: a started Supervisor with an echo target allowed on its port.

    ``services`` are YAML flow mappings without listen_port; the service at index i listens on vsock port 9000+i.
    Returns (addresses by index, the echo target, the supervisor).
    """
    caplog.set_level(logging.INFO, logger="vsockproxy")
    started = []

    def start(services: list[str], extra_allowlist: str = "", arguments: tuple[str, ...] = ()):
        target = tcp_target(echo)
        config = tmp_path / "vsock-proxy.yaml"
        config.write_text(
            "allowlist:\n"
            f"- {{address: 127.0.0.1, port: {target.port}}}\n"
            f"- {{address: localhost, port: {target.port}}}\n"
            + extra_allowlist
            + "services:\n"
            + "".join(f"- {{listen_port: {9000 + i}, {service.format(port=target.port)}}}\n"
                      for i, service in enumerate(services)))
        listeners = TcpListeners()
        supervisor = supervisor_for(["--config", str(config), "--shutdown-grace", "1", *arguments], listeners)
        supervisor.start()
        started.append(supervisor)
        return [listeners.addresses[9000 + i] for i in range(len(services))], target, supervisor

    yield start
    for supervisor in started:
        supervisor.drain(0)


def connect(address) -> gevent.socket.socket:
    return gevent.socket.create_connection(address, timeout=10)


def logged(caplog, pattern: str) -> str | None:
    """The last log line that matches ``pattern``, if any."""
    found = [r.getMessage() for r in caplog.records if re.search(pattern, r.getMessage())]
    return found[-1] if found else None


def log_line(caplog, pattern: str) -> str:
    """The log line that matches ``pattern``, once written: a refusal's comes after its brief lingering close."""
    return wait_until(lambda: logged(caplog, pattern), what=f"a log line matching {pattern!r}")


def requests_counted(supervisor, port: int) -> dict[tuple[str, str, str], float]:
    text = generate_latest(supervisor.metrics.registry).decode()
    counted = {}
    for allowed_by, mode, outcome, value in re.findall(
            rf'vsockproxy_requests_total{{allowed_by="([^"]*)",mode="([^"]*)",outcome="([^"]*)",service="{port}"}} (\S+)',
            text):
        counted[(allowed_by, mode, outcome)] = float(value)
    return counted


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- http-connect

def test_http_connect_relays_to_an_allowed_target_and_logs_the_request_and_entry(routed, caplog):
    (address,), target, supervisor = routed(["mode: http-connect"])
    with connect(address) as client:
        client.sendall(f"CONNECT localhost:{target.port} HTTP/1.1\r\nHost: localhost:{target.port}\r\n"
                       f"User-Agent: curl/7.88.1\r\n\r\n".encode())
        assert http_response_head(client) == HTTP_200
        client.sendall(b"x" * 100_000)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"x" * 100_000
    line = log_line(caplog, "closed enclave=")
    assert f"mode=http-connect request=localhost:{target.port} allowed_by=localhost:{target.port}" in line
    assert "up=100000 down=100000" in line and "end=eof" in line
    assert requests_counted(supervisor, 9000) == {(f"localhost:{target.port}", "http-connect", "connected"): 1.0}


def test_http_connect_sends_pipelined_bytes_after_the_request_to_the_target_first(routed):
    (address,), target, _ = routed(["mode: http-connect"])
    with connect(address) as client:
        client.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\nearly".encode())
        assert http_response_head(client) == HTTP_200
        assert recv_exactly(client, 5) == b"early"


@pytest.mark.parametrize("request_line, status", [
    ("CONNECT 127.0.0.1:{other} HTTP/1.1", b"HTTP/1.1 403 "),       # port not in the allowlist
    ("CONNECT 127.0.0.2:{port} HTTP/1.1", b"HTTP/1.1 403 "),        # address not in the allowlist
    ("CONNECT example.com:{port} HTTP/1.1", b"HTTP/1.1 403 "),      # name not in the allowlist
    ("CONNECT 2130706433:{port} HTTP/1.1", b"HTTP/1.1 403 "),       # a bare number is no address
    ("GET http://127.0.0.1:{port}/ HTTP/1.1", b"HTTP/1.1 405 "),
    ("CONNECT 127.0.0.1 HTTP/1.1", b"HTTP/1.1 400 "),
    ("CONNECT 127.0.0.1:{port}", b"HTTP/1.1 400 "),
])
def test_http_connect_refusals_answer_and_never_reach_a_target(routed, request_line, status):
    (address,), target, _ = routed(["mode: http-connect"])
    with connect(address) as client:
        client.sendall(request_line.format(port=target.port, other=target.port + 1).encode() + b"\r\n\r\n")
        reply = recv_all(client)
    assert reply.startswith(status), reply
    assert target.accepted == 0


def test_http_connect_to_an_allowed_port_where_nothing_listens_is_502(routed, caplog):
    port = closed_port()
    (address,), target, supervisor = routed(["mode: http-connect"], f"- {{address: 127.0.0.1, port: {port}}}\n")
    with connect(address) as client:
        client.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert recv_all(client).startswith(b"HTTP/1.1 502 ")
    assert "Connection refused" in log_line(caplog, "refused enclave=.*mode=http-connect")
    assert requests_counted(supervisor, 9000) == {(f"127.0.0.1:{port}", "http-connect", "refused"): 1.0}


def test_http_connect_to_a_target_that_never_answers_is_504(routed):
    # A listener whose accept queue is full drops further SYNs: the connect times out.
    jammed = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(jammed.getsockname(), timeout=5)
    port = jammed.getsockname()[1]
    try:
        (address,), _, _ = routed([f"mode: http-connect, connect_timeout: 0.5"],
                                  f"- {{address: 127.0.0.1, port: {port}}}\n")
        with connect(address) as client:
            client.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
            assert recv_all(client).startswith(b"HTTP/1.1 504 ")
    finally:
        filler.close()
        jammed.close()


def test_a_request_over_8_kib_is_431_and_frees_the_worker(routed):
    (address,), target, _ = routed(["mode: http-connect, num_workers: 1"])
    with connect(address) as client:
        client.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 9000 + b"\r\n\r\n")
        assert recv_all(client).startswith(b"HTTP/1.1 431 ")
    with connect(address) as client:  # the only worker is free again
        client.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n".encode())
        assert http_response_head(client) == HTTP_200


def test_a_slow_request_is_408_after_the_handshake_timeout_and_frees_the_worker(routed, caplog):
    (address,), target, supervisor = routed(["mode: http-connect, num_workers: 1, handshake_timeout: 0.5"])
    with connect(address) as slow:
        slow.sendall(b"CONNECT 127.0.0.1:")  # ... and nothing more
        started = time.monotonic()
        assert recv_all(slow).startswith(b"HTTP/1.1 408 ")
        assert 0.4 < time.monotonic() - started < 3
    with connect(address) as client:
        client.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n".encode())
        assert http_response_head(client) == HTTP_200
    assert "handshake timeout" in log_line(caplog, "refused enclave=")
    assert requests_counted(supervisor, 9000)[("", "http-connect", "too-slow")] == 1.0


def test_a_client_that_sends_nothing_is_cut_at_the_handshake_timeout(routed):
    (address,), _, _ = routed(["mode: socks5, handshake_timeout: 0.5"])
    with connect(address) as silent:
        started = time.monotonic()
        recv_all(silent)
        assert time.monotonic() - started < 3


# --------------------------------------------------------------------------- socks5

def socks5_connect(client, atyp: int, address: bytes, port: int) -> bytes:
    client.sendall(b"\x05\x01\x00")
    assert recv_exactly(client, 2) == b"\x05\x00"
    client.sendall(b"\x05\x01\x00" + bytes([atyp]) + address + struct.pack("!H", port))
    return recv_exactly(client, 10)


@pytest.mark.parametrize("atyp, address", [(3, b"\x09localhost"), (1, socket.inet_aton("127.0.0.1"))])
def test_socks5_relays_by_name_and_by_address(routed, atyp, address):
    (address_,), target, _ = routed(["mode: socks5"])
    with connect(address_) as client:
        assert socks5_connect(client, atyp, address, target.port) == b"\x05\x00\x00\x01" + bytes(6)
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"


def test_socks5_refusals_carry_the_rfc_reply_codes(routed):
    (address,), target, _ = routed(["mode: socks5"])
    with connect(address) as client:
        assert socks5_connect(client, 3, b"\x0bexample.com", target.port)[:2] == b"\x05\x02"
    with connect(address) as client:
        assert socks5_connect(client, 1, socket.inet_aton("127.0.0.1"), target.port + 1)[:2] == b"\x05\x02"
    with connect(address) as client:  # BIND
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        client.sendall(b"\x05\x02\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", target.port))
        assert recv_all(client)[:2] == b"\x05\x07"
    assert target.accepted == 0


def test_socks5_to_an_allowed_port_where_nothing_listens_is_connection_refused(routed):
    port = closed_port()
    (address,), _, _ = routed(["mode: socks5"], f"- {{address: 127.0.0.1, port: {port}}}\n")
    with connect(address) as client:
        assert socks5_connect(client, 1, socket.inet_aton("127.0.0.1"), port)[:2] == b"\x05\x05"


# --------------------------------------------------------------------------- sni

def test_sni_replays_the_client_hello_to_the_allowed_target_unchanged(routed, caplog):
    (address,), target, supervisor = routed(["mode: sni, port: {port}"])
    hello = client_hello("localhost")
    with connect(address) as client:
        client.sendall(hello[:7])  # the ClientHello in pieces, as a slow client sends it
        gevent.sleep(0.05)
        client.sendall(hello[7:])
        assert recv_exactly(client, len(hello)) == hello  # the echo target got exactly those bytes
    line = log_line(caplog, "closed enclave=")
    assert f"mode=sni request=localhost:{target.port} allowed_by=localhost:{target.port}" in line
    assert requests_counted(supervisor, 9000) == {(f"localhost:{target.port}", "sni", "connected"): 1.0}


@pytest.mark.parametrize("name, alert", [("example.com", 49), (None, 112), ("127.0.0.1", 112)])
def test_sni_refusals_close_with_a_tls_alert(routed, name, alert):
    (address,), target, _ = routed(["mode: sni, port: {port}"])
    hello = client_hello(name) if name != "127.0.0.1" else client_hello("localhost").replace(
        b"localhost", b"127.0.0.1")
    with connect(address) as client:
        client.sendall(hello)
        reply = recv_all(client)
    assert reply[:1] == b"\x15" and reply[-2:] == bytes([2, alert]), reply
    assert target.accepted == 0


def test_a_real_tls_client_completes_its_handshake_through_sni(routed, tmp_path):
    """TLS end to end: the proxy only routes; the client verifies the target's own certificate."""
    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    tls_listener = socket.create_server(("127.0.0.1", 0))
    port = tls_listener.getsockname()[1]
    (address,), _, _ = routed([f"mode: sni, port: {port}"], f"- {{address: localhost, port: {port}}}\n")

    def serve_one():
        sock, _ = tls_listener.accept()
        with server_context.wrap_socket(sock, server_side=True) as tls:
            tls.sendall(tls.recv(100).upper())

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        client_context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # cooperative: the hub serves the proxy
        client_context.load_verify_locations(cert)
        with connect(address) as raw:
            with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"hello tls")
                assert tls.recv(100) == b"HELLO TLS"
    finally:
        tls_listener.close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------- verify_sni

@pytest.mark.parametrize("mode", ["http-connect", "socks5"])
def test_verify_sni_closes_a_stream_whose_client_hello_names_another_host(routed, caplog, mode):
    (address,), target, supervisor = routed([f"mode: {mode}, verify_sni: true"])
    with connect(address) as client:
        if mode == "http-connect":
            client.sendall(f"CONNECT localhost:{target.port} HTTP/1.1\r\n\r\n".encode())
            assert http_response_head(client) == HTTP_200
        else:
            assert socks5_connect(client, 3, b"\x09localhost", target.port)[:2] == b"\x05\x00"
        client.sendall(client_hello("evil.example"))
        assert recv_all(client) == b""
    assert "verify_sni" in log_line(caplog, f"refused enclave=.*mode={mode}")
    assert requests_counted(supervisor, 9000)[(f"localhost:{target.port}", mode, "sni-mismatch")] == 1.0
    wait_until(lambda: target.accepted == 1, what="the target's one connection")


def test_verify_sni_lets_a_matching_client_hello_and_a_non_tls_stream_through(routed):
    (address,), target, _ = routed(["mode: http-connect, verify_sni: true"])
    hello = client_hello("LOCALHOST.")  # the same name, spelled another way
    with connect(address) as client:
        client.sendall(f"CONNECT localhost:{target.port} HTTP/1.1\r\n\r\n".encode())
        assert http_response_head(client) == HTTP_200
        client.sendall(hello)
        assert recv_exactly(client, len(hello)) == hello
    with connect(address) as client:
        client.sendall(f"CONNECT localhost:{target.port} HTTP/1.1\r\n\r\nplain text".encode())
        assert http_response_head(client) == HTTP_200
        assert recv_exactly(client, 10) == b"plain text"


BANNER = b"220 smtp.example ESMTP ready\r\n"


def banner_then_echo(sock) -> None:
    """A target that speaks first, as SMTP and SSH servers do, then echoes."""
    sock.sendall(BANNER)
    echo(sock)


def test_verify_sni_beside_a_target_that_speaks_first_relays_its_banner_and_still_checks(routed, tcp_target,
                                                                                        caplog):
    """The target's banner reaches the enclave while the check waits for the enclave's first bytes.

    Fails on the original code: nothing flows until the enclave speaks, so a client waiting for
    the banner waits until the handshake timeout closes the connection.
    """
    speaker = tcp_target(banner_then_echo)
    (address,), _, supervisor = routed(["mode: http-connect, verify_sni: true"],
                                       extra_allowlist=f"- {{address: localhost, port: {speaker.port}}}\n")
    request = f"CONNECT localhost:{speaker.port} HTTP/1.1\r\n\r\n".encode()
    with connect(address) as client:
        client.sendall(request)
        assert http_response_head(client) == HTTP_200
        client.settimeout(3)  # well within the handshake timeout (10 s)
        assert recv_exactly(client, len(BANNER)) == BANNER
        client.sendall(b"EHLO enclave\r\n")  # not TLS: it goes on as it is
        assert recv_exactly(client, 14) == b"EHLO enclave\r\n"
    closed = log_line(caplog, f"closed enclave=.*request=localhost:{speaker.port}")
    assert f"up=14 down={len(BANNER) + 14} " in closed, closed
    with connect(address) as client:  # after the banner, a ClientHello for another name is still refused
        client.sendall(request)
        assert http_response_head(client) == HTTP_200
        client.settimeout(3)
        assert recv_exactly(client, len(BANNER)) == BANNER
        client.sendall(client_hello("evil.example"))
        assert recv_all(client) == b""
    assert "verify_sni" in log_line(caplog, "refused enclave=.*mode=http-connect")
    assert requests_counted(supervisor, 9000)[(f"localhost:{speaker.port}", "http-connect", "sni-mismatch")] == 1.0


# --------------------------------------------------------------------------- reload and mixed services

def test_a_reload_applies_a_new_allowlist_to_the_next_request(routed, tmp_path):
    (address,), target, supervisor = routed(["mode: http-connect"])
    config = tmp_path / "vsock-proxy.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.9, port: 1}\nservices:\n"
                      "- {listen_port: 9000, mode: http-connect}\n")
    assert supervisor.reload()
    with connect(address) as client:
        client.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n\r\n".encode())
        assert recv_all(client).startswith(b"HTTP/1.1 403 ")
    assert target.accepted == 0


def test_a_name_no_entry_names_is_refused_without_a_dns_query(routed, monkeypatch):
    """DNS is a way out of an enclave: a request must not make the parent look up names of the enclave's choosing."""
    asked = []
    real = gevent.socket.getaddrinfo

    def recording(host, *args, **kwargs):
        asked.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(gevent.socket, "getaddrinfo", recording)
    (address,), target, _ = routed(["mode: http-connect"])
    with connect(address) as client:
        client.sendall(f"CONNECT secret-data.attacker.example:{target.port} HTTP/1.1\r\n\r\n".encode())
        assert recv_all(client).startswith(b"HTTP/1.1 403 ")
    with connect(address) as client:  # a name that an entry names is looked up, as it must be
        client.sendall(f"CONNECT localhost:{target.port} HTTP/1.1\r\n\r\n".encode())
        assert http_response_head(client) == HTTP_200
    assert "secret-data.attacker.example" not in asked and "localhost" in asked
