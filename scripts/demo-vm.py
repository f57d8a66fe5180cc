#!/usr/bin/env python3
"""The inside of scripts/demo: an HTTP page fetched over real vsock through vsock-proxy.

It runs inside the nested VM (scripts/vsock-vm), the only place where a vsock
client may connect (to CID 1, through the vsock loopback transport).  It starts
a local HTTP server, runs the real ``vsock-proxy`` command with an allowlist
for that server, fetches the page through vsock with an HTTP client, and
prints the response and the proxy's log line for that connection.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VMADDR_CID_LOCAL = 1
PAGE = b"<html><body><h1>Hello from the parent, over vsock</h1></body></html>\n"


def in_vm() -> bool:
    return os.environ.get("VSOCKPROXY_IN_VM") == "1"


class VsockHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_VSOCK: the enclave side of the demo."""

    def __init__(self, cid: int, port: int, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.vsock_address = (cid, port)

    def connect(self) -> None:
        if not in_vm():
            raise SystemExit("demo: refusing to connect AF_VSOCK outside the VM (VSOCKPROXY_IN_VM is not 1)")
        self.sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.vsock_address)


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_line(stream, needle: str, timeout: float) -> list[str]:
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


def run_inside_vm() -> int:
    vsock_port, http_port = 8000, free_tcp_port()
    with tempfile.TemporaryDirectory(prefix="vsockproxy-demo-") as workdir:
        Path(workdir, "index.html").write_bytes(PAGE)
        allowlist = Path(workdir, "allowlist.yaml")
        allowlist.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {http_port}}}\n")
        web = subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                                "--directory", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proxy = subprocess.Popen([sys.executable, "-m", "vsockproxy", str(vsock_port), "127.0.0.1",
                                  str(http_port), "--config", str(allowlist)],
                                 stderr=subprocess.PIPE, text=True)
        try:
            print(f"$ vsock-proxy {vsock_port} 127.0.0.1 {http_port} --config allowlist.yaml")
            for line in wait_for_line(proxy.stderr, "listening on vsock", 15):
                print(f"  {line}")
            _wait_for_tcp(http_port)
            print(f"\n$ GET / over vsock CID {VMADDR_CID_LOCAL} port {vsock_port}")
            connection = VsockHTTPConnection(VMADDR_CID_LOCAL, vsock_port)
            connection.request("GET", "/index.html", headers={"Connection": "close"})
            response = connection.getresponse()
            body = response.read()
            connection.close()
            print(f"HTTP/1.{response.version % 10} {response.status} {response.reason}")
            for name, value in response.getheaders():
                print(f"{name}: {value}")
            print()
            print(body.decode(errors="replace"), end="")
            print("\nproxy log for that connection:")
            for line in wait_for_line(proxy.stderr, "closed enclave=", 10)[-1:]:
                print(f"  {line}")
            ok = response.status == 200 and body == PAGE
        finally:
            for process in (proxy, web):
                process.terminate()
                process.wait(timeout=10)
    print("\ndemo: OK, the page came through vsock-proxy over vsock" if ok else "\ndemo: FAILED")
    return 0 if ok else 1


def _wait_for_tcp(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: the HTTP server on port {port} did not start")
            time.sleep(0.05)


def main() -> int:
    if not in_vm():
        print("demo-vm.py: runs inside scripts/vsock-vm only; use scripts/demo", file=sys.stderr)
        return 2
    return run_inside_vm()


if __name__ == "__main__":
    sys.exit(main())
