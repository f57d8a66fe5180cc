"""The request-routed modes (issue 13) over real vsock: http-connect, socks5 and sni.

One ``vsock-proxy`` process serves every service of this module (a TCG-emulated VM
starts Python slowly), and one HTTPS server on 127.0.0.1 with a self-signed
certificate for ``localhost`` is the only destination the allowlist admits. The
name is ``localhost`` because in http-connect and socks5 the proxy resolves the
requested name with the system resolver, and the VM's /etc/hosts is the host's.

The enclave side is played as the README's "The enclave side" shows it: an
in-VM ``socat TCP-LISTEN ... VSOCK-CONNECT:1:PORT`` bridge per service (CID 1
in place of the parent's 3) and ``curl`` through it, or a raw vsock client where
exact reply bytes matter more than curl's exit codes.
"""

from __future__ import annotations

import http.server
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.vsock import (IO_TIMEOUT, LoggedProcess, ProxyProcess, free_vsock_port, recv_all, recv_exactly,
                             vsock_connect, vsock_proxy_command)
from tests.helpers import cli_env, client_hello, http_response_head, self_signed_certificate, unused_tcp_port

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

NAME = "localhost"
PAGE = b"<html><body>routed to the parent's HTTPS server over vsock</body></html>\n"
OTHER_NAME = "evil.example"                   # never resolved: the allowlist refuses the name first
ACCESS_DENIED = bytes.fromhex("15030300020231")  # fatal alert, access_denied (49)
UNRECOGNIZED_NAME = bytes.fromhex("15030300020270")  # fatal alert, unrecognized_name (112)
SLOW_TIMEOUT = 1.0
SNI_ADDRESS = "127.0.0.2"  # the sni forwarder's address, as in the README (the VM is the only user of its port 443)
#: curl must go through the bridge: none of the caller's proxy settings (NO_PROXY=localhost, say) apply.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                   "ALL_PROXY", "NO_PROXY", "CURL_HOME")


# --------------------------------------------------------------------------- the parent's side

class HttpsServer:
    """An HTTPS server on 127.0.0.1: GET / answers PAGE. The TLS handshake runs in each request's thread."""

    def __init__(self, certificate: Path, key: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(certificate), str(key))
        self.server_names: list[str | None] = []
        context.sni_callback = lambda sslobj, name, ctx: self.server_names.append(name)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request, client_address) -> None:
                request.settimeout(IO_TIMEOUT)
                try:
                    tls = context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):  # a client that never finished its handshake
                    return
                with tls:
                    Handler(tls, client_address, self)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- the proxy and the enclave's forwarders

class Routing:
    """The module's proxy, its services' vsock ports, the HTTPS server and the in-VM socat bridges."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.certificate, key = self_signed_certificate(workdir, NAME, IO_TIMEOUT)
        self.https = HttpsServer(self.certificate, key)
        self.https_port = self.https.port
        self.other_port = unused_tcp_port()   # a port the allowlist does not admit
        self.metrics_port = unused_tcp_port()
        self.ports: dict[str, int] = {}
        self.bridges: dict[str, int] = {}
        self._bridges: list[LoggedProcess] = []
        self.proxy: ProxyProcess | None = None
        self.config = workdir / "vsock-proxy.yaml"

    def start(self) -> None:
        services = {
            "http": "mode: http-connect",
            "socks": "mode: socks5",
            "sni": f"mode: sni, port: {self.https_port}",
            "sni-other-port": f"mode: sni, port: {self.other_port}",
            "fixed": f"address: {NAME}, port: {self.https_port}",
            "slow": f"mode: http-connect, num_workers: 1, handshake_timeout: {SLOW_TIMEOUT:g}",
            "slow-socks": f"mode: socks5, handshake_timeout: {SLOW_TIMEOUT:g}",
            "slow-sni": f"mode: sni, port: {self.https_port}, handshake_timeout: {SLOW_TIMEOUT:g}",
            "http-verify": "mode: http-connect, verify_sni: true",
            "socks-verify": "mode: socks5, verify_sni: true",
        }
        for key in services:
            while key not in self.ports or list(self.ports.values()).count(self.ports[key]) > 1:
                self.ports[key] = free_vsock_port()  # released again, so two draws could meet
        config = self.config
        config.write_text("\n".join([
            "allowlist:",
            f"- {{address: {NAME}, port: {self.https_port}}}",
            "services:",
            *(f"- {{listen_port: {self.ports[key]}, {settings}}}" for key, settings in services.items()),
        ]) + "\n")
        # --handshake-timeout: the default for every routed service but "slow", which sets its own.
        self.proxy = ProxyProcess([*vsock_proxy_command(), "--config", str(config), "--handshake-timeout", "30",
                                   "--metrics-address", f"127.0.0.1:{self.metrics_port}"], cli_env())
        self.proxy.wait_listening(len(services))
        for key in ("http", "socks", "fixed", "http-verify", "socks-verify"):
            self.bridges[key] = self._bridge(self.ports[key])
        # As the README's sni example: port 443 of a second loopback address that the name points at.
        self.bridges["sni"] = self._bridge(self.ports["sni"], SNI_ADDRESS, 443)

    def _bridge(self, vsock_port: int, address: str = "127.0.0.1", tcp_port: int = 0) -> int:
        """The enclave's forwarder: ``socat TCP-LISTEN:P,bind=ADDRESS,fork,reuseaddr VSOCK-CONNECT:1:PORT``."""
        tcp_port = tcp_port or unused_tcp_port()
        bridge = LoggedProcess(["socat", "-d", "-d", f"TCP-LISTEN:{tcp_port},bind={address},fork,reuseaddr",
                                f"VSOCK-CONNECT:1:{vsock_port}"], cli_env())
        self._bridges.append(bridge)
        bridge.wait_for("listening on", timeout=IO_TIMEOUT)
        return tcp_port

    def stop(self) -> None:
        for bridge in self._bridges:
            bridge.kill()
        if self.proxy is not None:
            self.proxy.kill()
        self.https.stop()

    def log_count(self, needle: str) -> int:
        """How many proxy log lines so far contain ``needle``."""
        assert self.proxy is not None
        return sum(needle in line for line in self.proxy.drain())

    def next_log(self, needle: str, seen: int) -> str:
        """The first proxy log line containing ``needle`` after the ``seen`` ones there already were."""
        assert self.proxy is not None
        return self.proxy.wait_for(needle, timeout=IO_TIMEOUT, count=seen + 1)


@pytest.fixture(scope="module")
def routing(tmp_path_factory):
    setup = Routing(tmp_path_factory.mktemp("routing"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def curl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``curl -q -sS --max-time 60 ARGS`` with none of the caller's proxy settings (plus ``env``)."""
    clean = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    clean.update(env or {})
    return subprocess.run(["curl", "-q", "-sS", "--max-time", str(int(IO_TIMEOUT)), *args],
                          capture_output=True, env=clean, timeout=IO_TIMEOUT + 30)


def assert_page(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout == PAGE


# --------------------------------------------------------------------------- raw enclave clients

def http_connect(sock: socket.socket, host: str, port: int) -> bytes:
    """Send ``CONNECT host:port``; return the response's header section."""
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return http_response_head(sock)


def assert_http_refusal(sock: socket.socket, status: int) -> bytes:
    """The whole answer is one ``status`` response with a Content-Length body, then the proxy closes."""
    answer = recv_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    assert length and int(length.group(1)) == len(body), answer
    assert b"\r\nConnection: close" in head, answer
    return answer


def socks5_connect(sock: socket.socket, host: str, port: int) -> bytes:
    """RFC 1928: greeting without authentication, then CONNECT by domain name; returns the 10-byte reply."""
    sock.sendall(b"\x05\x01\x00")
    assert recv_exactly(sock, 2) == b"\x05\x00"
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    return recv_exactly(sock, 10)


def socks5_reply(code: int) -> bytes:
    """``05 REP 00 01 0.0.0.0:0``: the reply the proxy sends, success or refusal."""
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def https_get(sock: socket.socket, certificate: Path, server_name: str = NAME) -> bytes:
    """TLS over an established tunnel, verified against ``certificate``; GET / and return the body."""
    context = ssl.create_default_context(cafile=str(certificate))
    with context.wrap_socket(sock, server_hostname=server_name) as tls:
        tls.sendall(f"GET / HTTP/1.0\r\nHost: {server_name}\r\n\r\n".encode())
        answer = recv_all(tls)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), answer
    return body


def assert_closed_without_reply(sock: socket.socket) -> None:
    """The proxy closes the connection having sent nothing more (EOF, or a reset)."""
    try:
        assert recv_all(sock) == b""
    except ConnectionResetError:
        pass


# --------------------------------------------------------------------------- http-connect

def test_http_connect_curl_proxy_fetches_the_page(routing):
    seen = routing.log_count("mode=http-connect request=")
    assert_page(curl("--proxy", f"http://127.0.0.1:{routing.bridges['http']}", "--cacert", str(routing.certificate),
                     f"https://{NAME}:{routing.https_port}/"))
    line = routing.next_log("mode=http-connect request=", seen)
    assert " INFO closed enclave=1:" in line, line  # CID 1: the bridge's vsock connect, inside the VM
    assert f"request={NAME}:{routing.https_port} allowed_by={NAME}:{routing.https_port} " in line, line
    assert f"target=127.0.0.1:{routing.https_port} " in line and "end=eof" in line, line


def test_http_connect_through_https_proxy_variable(routing):
    """As an SDK would: no proxy option, only HTTPS_PROXY in the environment."""
    seen = routing.log_count("mode=http-connect request=")
    assert_page(curl("--cacert", str(routing.certificate), f"https://{NAME}:{routing.https_port}/",
                     env={"HTTPS_PROXY": f"http://127.0.0.1:{routing.bridges['http']}"}))
    routing.next_log("mode=http-connect request=", seen)  # it did go through the proxy


def test_http_connect_curl_reports_403_for_a_name_not_allowed(routing):
    result = curl("--proxy", f"http://127.0.0.1:{routing.bridges['http']}", "--cacert", str(routing.certificate),
                  f"https://{OTHER_NAME}/")
    assert result.returncode == 56, (result.returncode, result.stderr)  # CURLE_RECV_ERROR: CONNECT failed
    assert b"403" in result.stderr, result.stderr


@pytest.mark.parametrize("which", ["name", "port"])
def test_http_connect_refuses_what_the_allowlist_does_not_admit(routing, which):
    host, port = (OTHER_NAME, routing.https_port) if which == "name" else (NAME, routing.other_port)
    seen = routing.log_count(f"request={host}:{port}:")
    with vsock_connect(routing.ports["http"]) as client:
        client.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        assert_http_refusal(client, 403)
    line = routing.next_log(f"request={host}:{port}:", seen)
    assert " WARNING refused enclave=1:" in line and "mode=http-connect" in line, line
    assert str(routing.config) in line, line  # the reason names the allowlist file


def test_http_connect_slow_request_gets_408_and_frees_the_only_worker(routing):
    """Half a CONNECT line, then nothing: 408 after handshake_timeout (1 s), and the one worker serves the next."""
    port = routing.ports["slow"]
    seen = routing.log_count(f"mode=http-connect request={NAME}:{routing.https_port} ")
    with vsock_connect(port) as slow:
        slow.sendall(b"CONNECT localhost:")
        started = time.monotonic()
        with vsock_connect(port) as waiting:  # in the backlog while the only worker holds the slow one
            waiting.sendall(f"CONNECT {NAME}:{routing.https_port} HTTP/1.1\r\n\r\n".encode())
            assert_http_refusal(slow, 408)
            elapsed = time.monotonic() - started
            assert SLOW_TIMEOUT * 0.9 <= elapsed < IO_TIMEOUT, elapsed
            head = http_response_head(waiting)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert https_get(waiting, routing.certificate) == PAGE
    routing.next_log(f"mode=http-connect request={NAME}:{routing.https_port} ", seen)


@pytest.mark.parametrize("mode", ["socks5", "sni"])
def test_slow_request_is_cut_after_the_handshake_timeout_and_counted(routing, mode):
    """The same limit in the other modes: half a request, then the proxy closes after 1 s, relaying nothing."""
    service = "slow-socks" if mode == "socks5" else "slow-sni"
    with vsock_connect(routing.ports[service]) as client:
        started = time.monotonic()
        if mode == "socks5":
            client.sendall(b"\x05\x01\x00")
            assert recv_exactly(client, 2) == b"\x05\x00"
            client.sendall(b"\x05\x01\x00\x03\x09local")  # half of CONNECT localhost:PORT
            answer = recv_all(client)
            assert len(answer) == 10 and answer[:2] != b"\x05\x00" and answer[0] == 5, answer
        else:
            client.sendall(client_hello(NAME)[:40])
            answer = recv_all(client)
            assert answer == b"" or answer.startswith(b"\x15\x03"), answer  # nothing, or an alert
        elapsed = time.monotonic() - started
    assert SLOW_TIMEOUT * 0.9 <= elapsed < IO_TIMEOUT, elapsed
    assert metric(routing, "vsockproxy_requests_total", service=str(routing.ports[service]), mode=mode,
                  outcome="too-slow") >= 1


def test_http_connect_oversized_request_gets_431(routing):
    padding = b"X-Padding: " + b"a" * (9 * 1024) + b"\r\n"
    with vsock_connect(routing.ports["http"]) as client:
        client.sendall(f"CONNECT {NAME}:{routing.https_port} HTTP/1.1\r\n".encode() + padding + b"\r\n")
        assert_http_refusal(client, 431)


# --------------------------------------------------------------------------- socks5

def test_socks5_curl_socks5_hostname_fetches_the_page(routing):
    seen = routing.log_count("mode=socks5 request=")
    assert_page(curl("--socks5-hostname", f"127.0.0.1:{routing.bridges['socks']}", "--cacert",
                     str(routing.certificate), f"https://{NAME}:{routing.https_port}/"))
    line = routing.next_log("mode=socks5 request=", seen)
    assert f"request={NAME}:{routing.https_port} allowed_by={NAME}:{routing.https_port} " in line, line


def test_socks5_through_all_proxy_socks5h(routing):
    """The README's other socks5 line: ALL_PROXY=socks5h://, where the proxy resolves the name."""
    seen = routing.log_count("mode=socks5 request=")
    assert_page(curl("--cacert", str(routing.certificate), f"https://{NAME}:{routing.https_port}/",
                     env={"ALL_PROXY": f"socks5h://127.0.0.1:{routing.bridges['socks']}"}))
    line = routing.next_log("mode=socks5 request=", seen)
    assert f"request={NAME}:{routing.https_port} " in line, line


@pytest.mark.parametrize("which", ["name", "port"])
def test_socks5_refuses_what_the_allowlist_does_not_admit(routing, which):
    host, port = (OTHER_NAME, routing.https_port) if which == "name" else (NAME, routing.other_port)
    seen = routing.log_count(f"request={host}:{port}:")
    result = curl("--socks5-hostname", f"127.0.0.1:{routing.bridges['socks']}", "--cacert",
                  str(routing.certificate), f"https://{host}:{port}/")
    assert result.returncode != 0 and result.stdout == b"", (result.returncode, result.stderr)
    with vsock_connect(routing.ports["socks"]) as client:
        assert socks5_connect(client, host, port) == socks5_reply(0x02)  # connection not allowed by ruleset
        assert_closed_without_reply(client)
    for line in (routing.next_log(f"request={host}:{port}:", seen + n) for n in (0, 1)):  # curl's, then ours
        assert " WARNING refused enclave=1:" in line and "mode=socks5" in line, line


# --------------------------------------------------------------------------- sni

def test_sni_curl_resolve_fetches_the_page(routing):
    """No proxy settings: the name points at the forwarder, and the proxy routes by the ClientHello's SNI.

    The README's /etc/hosts line is curl's --resolve here: the VM's /etc/hosts also serves the proxy,
    which must resolve the same name to the real server.
    """
    seen = routing.log_count("mode=sni request=")
    assert_page(curl("--cacert", str(routing.certificate), "--resolve", f"{NAME}:443:{SNI_ADDRESS}",
                     f"https://{NAME}/"))
    line = routing.next_log("mode=sni request=", seen)
    assert f"request={NAME}:{routing.https_port} allowed_by={NAME}:{routing.https_port} " in line, line


@pytest.mark.parametrize("which", ["name", "port"])
def test_sni_refuses_with_access_denied(routing, which):
    service, name = ("sni", OTHER_NAME) if which == "name" else ("sni-other-port", NAME)
    with vsock_connect(routing.ports[service]) as client:
        client.sendall(client_hello(name))
        assert recv_all(client) == ACCESS_DENIED


def test_sni_without_a_server_name_gets_unrecognized_name(routing):
    with vsock_connect(routing.ports["sni"]) as client:
        client.sendall(client_hello(None))
        assert recv_all(client) == UNRECOGNIZED_NAME


def test_fixed_service_beside_the_routed_ones(routing):
    bridge = routing.bridges["fixed"]
    assert_page(curl("--cacert", str(routing.certificate), "--resolve", f"{NAME}:{bridge}:127.0.0.1",
                     f"https://{NAME}:{bridge}/"))


# --------------------------------------------------------------------------- verify_sni

def test_verify_sni_http_connect_closes_a_fronted_client_hello(routing):
    with vsock_connect(routing.ports["http-verify"]) as client:
        head = http_connect(client, NAME, routing.https_port)
        assert head.startswith(b"HTTP/1.1 200 "), head
        client.sendall(client_hello(OTHER_NAME))
        assert_closed_without_reply(client)  # had the target seen it, a ServerHello would have come back
    assert OTHER_NAME not in routing.https.server_names


def test_verify_sni_socks5_closes_a_fronted_client_hello(routing):
    seen = routing.log_count("verify_sni")
    with vsock_connect(routing.ports["socks-verify"]) as client:
        assert socks5_connect(client, NAME, routing.https_port) == socks5_reply(0x00)
        client.sendall(client_hello(OTHER_NAME))
        assert_closed_without_reply(client)
    line = routing.next_log("verify_sni", seen)
    assert "mode=socks5" in line and f"request={NAME}:{routing.https_port}" in line, line
    assert OTHER_NAME not in routing.https.server_names


def test_verify_sni_lets_the_requested_name_through(routing):
    assert_page(curl("--proxy", f"http://127.0.0.1:{routing.bridges['http-verify']}", "--cacert",
                     str(routing.certificate), f"https://{NAME}:{routing.https_port}/"))
    assert_page(curl("--socks5-hostname", f"127.0.0.1:{routing.bridges['socks-verify']}", "--cacert",
                     str(routing.certificate), f"https://{NAME}:{routing.https_port}/"))


# --------------------------------------------------------------------------- metrics

def scrape(routing) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{routing.metrics_port}/metrics", timeout=IO_TIMEOUT) as answer:
        return answer.read().decode()


def metric(routing, name: str, text: str | None = None, **labels: str) -> float:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    found = []
    for line in (scrape(routing) if text is None else text).splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            found.append(float(line.rsplit(" ", 1)[1]))
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_requests_are_counted_by_mode_outcome_and_entry_never_by_name(routing):
    with vsock_connect(routing.ports["http"]) as client:
        client.sendall(f"CONNECT {OTHER_NAME}:443 HTTP/1.1\r\n\r\n".encode())
        assert_http_refusal(client, 403)
    with vsock_connect(routing.ports["http"]) as client:
        assert http_connect(client, NAME, routing.https_port).startswith(b"HTTP/1.1 200 ")
        assert https_get(client, routing.certificate) == PAGE
    text = scrape(routing)
    service = str(routing.ports["http"])
    assert metric(routing, "vsockproxy_requests_total", text, service=service, mode="http-connect",
                  outcome="connected", allowed_by=f"{NAME}:{routing.https_port}") >= 1
    assert metric(routing, "vsockproxy_requests_total", text, service=service, mode="http-connect",
                  outcome="not-allowed", allowed_by="") >= 1
    assert OTHER_NAME not in text
