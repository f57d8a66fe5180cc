"""The release zipapp as Amazon Linux 2023 runs it: ``python3.9 vsock-proxy-VERSION-x86_64.pyz`` over real vsock.

The VM has no network, so everything the proxy imports comes from the bundle (unpacked
into a fresh PEX_ROOT). scripts/package builds dist/ before scripts/test boots the VM.
"""

from __future__ import annotations

import glob
import http.server
import os
import re
import threading

import pytest

from tests.e2e.vsock import START_TIMEOUT, ProxyProcess, free_vsock_port, recv_all, vsock_connect
from tests.helpers import REPO

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

VERSION = re.search(r'__version__ = "([^"]+)"', (REPO / "vsockproxy" / "__init__.py").read_text()).group(1)
BUNDLE = REPO / "dist" / f"vsock-proxy-{VERSION}-x86_64.pyz"
BODY = b"hello from the target, through the zipapp\n"


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_target():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def python39() -> str:
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9.*/bin/python3.9")))
    assert found, "CPython 3.9 (Amazon Linux 2023's python3) is expected under ~/.pyenv/versions"
    return found[-1]


def test_x86_64_zipapp_on_python39_proxies_an_http_request_over_vsock(http_target, tmp_path):
    assert BUNDLE.exists(), f"{BUNDLE} is missing: run scripts/package first"
    config = tmp_path / "vsock-proxy.yaml"
    config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {http_target}}}\n")
    port = free_vsock_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEX_", "PYTHON", "VSOCK_PROXY_"))}
    env.update(PEX_ROOT=str(tmp_path / "pex"), PIP_NO_INDEX="1", PYTHONUNBUFFERED="1")
    process = ProxyProcess([python39(), str(BUNDLE), str(port), "127.0.0.1", str(http_target), "--config",
                            str(config)], env)
    try:
        process.wait_for("listening on vsock port", timeout=START_TIMEOUT * 2)  # the first run unpacks wheels
        with vsock_connect(port) as client:
            client.sendall(b"GET /page HTTP/1.0\r\nHost: target\r\n\r\n")
            reply = recv_all(client)
        assert reply.startswith(b"HTTP/1.0 200 "), reply[:200]
        assert reply.endswith(b"\r\n\r\n" + BODY), reply
        line = process.wait_for("closed enclave=")
        assert f"target=127.0.0.1:{http_target}" in line and "end=eof" in line, line
        assert process.stop() == 0, process.text()
    finally:
        process.kill()
    assert "Traceback" not in process.text()
