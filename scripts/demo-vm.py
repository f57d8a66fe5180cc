#!/usr/bin/env python3
"""The inside of scripts/demo: pages fetched over real vsock through vsock-proxy, by two routes.

It runs inside the nested VM (scripts/vsock-vm), the only place where a vsock
client may connect (to CID 1, through the vsock loopback transport).  It starts
a local HTTP server and an HTTPS server (a self-signed certificate for
``localhost``), and runs the real ``vsock-proxy`` command with two services:

- a fixed one (vsock port 8000 to the HTTP server), fetched with an HTTP client
  that speaks AF_VSOCK itself;
- an ``http-connect`` one (vsock port 8080), reached as an enclave reaches it:
  a socat TCP-to-vsock forwarder and ``HTTPS_PROXY`` for curl, which then asks
  for the HTTPS page, and for a name the allowlist does not admit (403).

It prints the commands as a user would type them, the answers, and the proxy's
log line for each connection, and exits 0 only if both pages came through and
the name not allowed was refused.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VMADDR_CID_LOCAL = 1
FIXED_PORT, CONNECT_PORT, FORWARDER_PORT = 8000, 8080, 3128
PAGE = b"<html><body><h1>Hello from the parent, over vsock</h1></body></html>\n"
NOT_ALLOWED = "example.com"
# curl must take the demo's proxy and nothing from the caller's environment (NO_PROXY=localhost, say).
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                   "ALL_PROXY", "NO_PROXY", "CURL_HOME")
STEP_TIMEOUT = 30.0


def in_vm() -> bool:
    return os.environ.get("VSOCKPROXY_IN_VM") == "1"


class VsockHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_VSOCK: the enclave side of the fixed route."""

    def __init__(self, cid: int, port: int, timeout: float = STEP_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.vsock_address = (cid, port)

    def connect(self) -> None:
        if not in_vm():
            raise SystemExit("demo: refusing to connect AF_VSOCK outside the VM (VSOCKPROXY_IN_VM is not 1)")
        self.sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.vsock_address)


class PageHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with PAGE."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args) -> None:
        pass


class PageServer(http.server.ThreadingHTTPServer):
    """The parent's web server, HTTP or (with a context) HTTPS, on 127.0.0.1 in a thread of this process."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), PageHandler)
        self.context = context
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def finish_request(self, request, client_address) -> None:
        request.settimeout(STEP_TIMEOUT)
        if self.context is not None:
            try:  # in the request's own thread, so a client that stalls holds up no one else
                request = self.context.wrap_socket(request, server_side=True)
            except OSError:
                return
        super().finish_request(request, client_address)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


def wait_for_line(stream, needle: str, timeout: float = STEP_TIMEOUT) -> list[str]:
    """Read lines from ``stream`` until one contains ``needle``; returns them all."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise SystemExit(f"demo: timed out waiting for {needle!r}; got: {lines}")


def wait_for_tcp_listener(port: int, timeout: float = STEP_TIMEOUT) -> None:
    """Until something listens on TCP 127.0.0.1:port (read from /proc: a probe connection would reach the proxy)."""
    wanted = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # TCP_LISTEN
                return
        time.sleep(0.05)
    raise SystemExit(f"demo: nothing listens on 127.0.0.1:{port}")


def make_certificate(workdir: str) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", "key.pem", "-out", "cert.pem"],
                   cwd=workdir, check=True, capture_output=True, timeout=STEP_TIMEOUT)


def show(command: str, gap: bool = True) -> None:
    print(f"{chr(10) if gap else ''}$ {command}", flush=True)


def show_log(proxy: subprocess.Popen, needle: str) -> str:
    line = wait_for_line(proxy.stderr, needle)[-1]
    print(f"proxy log: {line}", flush=True)
    return line


def fetch_fixed(proxy: subprocess.Popen) -> bool:
    print(f"\n# GET /index.html over vsock CID {VMADDR_CID_LOCAL} port {FIXED_PORT} "
          "(Python's http.client on an AF_VSOCK socket)")
    connection = VsockHTTPConnection(VMADDR_CID_LOCAL, FIXED_PORT)
    connection.request("GET", "/index.html", headers={"Connection": "close"})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    print(f"HTTP/1.{response.version % 10} {response.status} {response.reason}")
    print(body.decode(errors="replace"), end="")
    show_log(proxy, "closed enclave=")
    return response.status == 200 and body == PAGE


def fetch_routed(proxy: subprocess.Popen, workdir: str, https_port: int) -> bool:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env["HTTPS_PROXY"] = f"http://127.0.0.1:{FORWARDER_PORT}"
    curl = ["curl", "-sS", "--max-time", str(int(STEP_TIMEOUT)), "--cacert", "cert.pem"]

    url = f"https://localhost:{https_port}/index.html"
    show(f"curl --cacert cert.pem {url}", gap=False)
    fetched = subprocess.run([*curl, url], cwd=workdir, env=env, capture_output=True, timeout=STEP_TIMEOUT + 10)
    sys.stdout.write(fetched.stdout.decode(errors="replace") + fetched.stderr.decode(errors="replace"))
    line = show_log(proxy, "closed enclave=")
    page_ok = fetched.returncode == 0 and fetched.stdout == PAGE and "mode=http-connect" in line

    url = f"https://{NOT_ALLOWED}/"
    show(f"curl --cacert cert.pem {url}   # not in the allowlist")
    refused = subprocess.run([*curl, url], cwd=workdir, env=env, capture_output=True, timeout=STEP_TIMEOUT + 10)
    sys.stdout.write(refused.stdout.decode(errors="replace") + refused.stderr.decode(errors="replace"))
    print(f"(curl exit status {refused.returncode})")
    line = show_log(proxy, "refused enclave=")
    refusal_ok = refused.returncode != 0 and b"403" in refused.stderr and f"request={NOT_ALLOWED}:443" in line
    return page_ok and refusal_ok


def run_inside_vm() -> int:
    with tempfile.TemporaryDirectory(prefix="vsockproxy-demo-") as workdir:
        make_certificate(workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(Path(workdir, "cert.pem"), Path(workdir, "key.pem"))
        http_server, https_server = PageServer(), PageServer(context)
        config = Path(workdir, "vsock-proxy.yaml")
        config.write_text(
            "allowlist:\n"
            f"- {{address: 127.0.0.1, port: {http_server.port}}}\n"
            f"- {{address: localhost, port: {https_server.port}}}\n"
            "services:\n"
            f"- {{listen_port: {FIXED_PORT}, address: 127.0.0.1, port: {http_server.port}}}\n"
            f"- {{listen_port: {CONNECT_PORT}, mode: http-connect}}\n")
        processes: list[subprocess.Popen] = []
        try:
            print("The parent instance: a web server on 127.0.0.1, HTTP on port "
                  f"{http_server.port} and HTTPS on port {https_server.port} (certificate for localhost).")
            show("cat vsock-proxy.yaml")
            print(config.read_text(), end="")
            show("vsock-proxy --config vsock-proxy.yaml")
            proxy = subprocess.Popen([sys.executable, "-m", "vsockproxy", "--config", str(config)],
                                     stderr=subprocess.PIPE, text=True)
            processes.append(proxy)
            for _ in (FIXED_PORT, CONNECT_PORT):  # TCG: seconds per Python start
                for line in wait_for_line(proxy.stderr, "listening on vsock", timeout=60):
                    print(f"  {line}")

            print(f"\n# The enclave, route 1: fixed. vsock port {FIXED_PORT} always leads to the HTTP server.", end="")
            fixed_ok = fetch_fixed(proxy)

            print(f"\n# The enclave, route 2: http-connect. One vsock port, any destination the allowlist "
                  f"admits;\n# a TCP-to-vsock forwarder gives programs a local proxy (CID 3 from a real "
                  f"enclave, 1 here).", end="")
            show(f"socat TCP-LISTEN:{FORWARDER_PORT},bind=127.0.0.1,fork,reuseaddr "
                 f"VSOCK-CONNECT:{VMADDR_CID_LOCAL}:{CONNECT_PORT} &")
            forwarder = subprocess.Popen(["socat", f"TCP-LISTEN:{FORWARDER_PORT},bind=127.0.0.1,fork,reuseaddr",
                                          f"VSOCK-CONNECT:{VMADDR_CID_LOCAL}:{CONNECT_PORT}"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            processes.append(forwarder)
            wait_for_tcp_listener(FORWARDER_PORT)
            show(f"export HTTPS_PROXY=http://127.0.0.1:{FORWARDER_PORT}", gap=False)
            routed_ok = fetch_routed(proxy, workdir, https_server.port)
        finally:
            for process in reversed(processes):
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            https_server.stop()
            http_server.stop()
    ok = fixed_ok and routed_ok
    print("\ndemo: OK, both pages came through vsock-proxy over vsock, and the name not allowed was refused"
          if ok else f"\ndemo: FAILED (fixed route {'ok' if fixed_ok else 'failed'}, "
                     f"http-connect route {'ok' if routed_ok else 'failed'})")
    return 0 if ok else 1


def main() -> int:
    if not in_vm():
        print("demo-vm.py: runs inside scripts/vsock-vm only; use scripts/demo", file=sys.stderr)
        return 2
    return run_inside_vm()


if __name__ == "__main__":
    sys.exit(main())
