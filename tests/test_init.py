"""The service files: the region helper against a local fake IMDS, and the units' key settings."""

from __future__ import annotations

import http.server
import subprocess
import threading

import pytest

from tests.helpers import REPO

REGION_HELPER = REPO / "init" / "vsock-proxy-region"


class FakeIMDS(http.server.BaseHTTPRequestHandler):
    """IMDS on 127.0.0.1: v2 hands out a token and wants it back; v1 answers anyone."""

    v2 = True
    requests: list[str] = []

    def do_PUT(self):  # noqa: N802 - http.server's naming
        self.requests.append(f"PUT {self.path}")
        if self.v2 and self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]:
            self._reply(200, b"token-123")
        else:
            self._reply(403, b"")

    def do_GET(self):  # noqa: N802
        self.requests.append(f"GET {self.path} token={self.headers['X-aws-ec2-metadata-token']}")
        if self.path != "/latest/meta-data/placement/region":
            self._reply(404, b"")
        elif self.v2 and self.headers["X-aws-ec2-metadata-token"] != "token-123":
            self._reply(401, b"")
        else:
            self._reply(200, b"eu-west-3")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def imds():
    def start(v2: bool):
        handler = type("Handler", (FakeIMDS,), {"v2": v2, "requests": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", handler.requests

    servers: list[http.server.HTTPServer] = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run_region(endpoint: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REGION_HELPER)], env={"VSOCK_PROXY_IMDS": endpoint, "PATH": "/usr/bin:/bin",
                                                     "VSOCK_PROXY_IMDS_TIMEOUT": "2"},
                          capture_output=True, text=True, timeout=20)


def test_region_from_imdsv2_with_a_token(imds):
    endpoint, requests = imds(v2=True)
    result = run_region(endpoint)
    assert (result.returncode, result.stdout, result.stderr) == (0, "eu-west-3\n", "")
    assert requests == ["PUT /latest/api/token", "GET /latest/meta-data/placement/region token=token-123"]


def test_region_falls_back_to_imdsv1(imds):
    endpoint, requests = imds(v2=False)
    result = run_region(endpoint)
    assert (result.returncode, result.stdout) == (0, "eu-west-3\n")
    assert requests[-1] == "GET /latest/meta-data/placement/region token=None"


def test_region_unreachable_is_one_line_and_exit_1():
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_region(f"http://127.0.0.1:{port}")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "cannot read the region" in result.stderr


def test_systemd_unit_is_notify_hardened_and_reloadable():
    unit = (REPO / "init" / "vsock-proxy.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "always"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "DynamicUser"):
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "strict"
    assert set(settings["RestrictAddressFamilies"].split()) == {"AF_VSOCK", "AF_INET", "AF_INET6", "AF_UNIX"}
    assert settings["ExecStart"].startswith("/bin/sh -c")
    assert "vsock-proxy 8000 \"kms.$region.amazonaws.com\" 443" in unit


def test_sysv_script_parses_and_prints_usage():
    script = REPO / "init" / "vsock-proxy.init"
    assert subprocess.run(["sh", "-n", str(script)], timeout=10).returncode == 0
    assert "/var/log/vsock-proxy.log" in (REPO / "init" / "vsock-proxy.logrotate").read_text()


def test_default_allowlist_matches_upstreams_kms_endpoints():
    from vsockproxy.config import load_file

    rules = load_file(str(REPO / "conf" / "vsock-proxy.yaml")).allowlist.rules
    names = {rule.name for rule in rules}
    assert all(rule.ports == frozenset({443}) for rule in rules)
    assert {"kms.us-east-1.amazonaws.com", "kms-fips.us-east-1.amazonaws.com", "kms.eu-west-3.amazonaws.com",
            "kms.cn-northwest-1.amazonaws.com", "kms-fips.us-gov-west-1.amazonaws.com"} <= names
    assert len(names) == len(rules) == 76
