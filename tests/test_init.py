"""The service files: the region helper against a fake IMDS, the unit's settings and sandbox score, the SysV script."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

REGION_HELPER = REPO / "init" / "vsock-proxy-region"
UNIT = REPO / "init" / "vsock-proxy.service"


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


def unit_settings() -> dict[str, str]:
    """The unit's KEY=value settings (the last one wins), continuation lines joined."""
    text = UNIT.read_text().replace("\\\n", "")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_systemd_unit_is_notify_and_reloadable_and_its_shell_ignores_reload_signals():
    settings = unit_settings()
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "always"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["EnvironmentFile"] == "-/etc/default/vsock-proxy"
    assert settings["ExecStart"].startswith("/bin/sh -c 'trap \"\" HUP USR1;")
    assert "exec /usr/local/bin/vsock-proxy " in settings["ExecStart"]


def test_systemd_analyze_rates_the_unit_2_or_lower():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; scripts/bootstrap installs it)")
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for vsock-proxy\.service: (\d+\.\d+) ", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


# --------------------------------------------------------------------------- the SysV init script

STANDIN_DAEMON = """import os, signal, sys
dispositions = ["ignored" if signal.getsignal(s) == signal.SIG_IGN else "default" for s in (signal.SIGHUP, signal.SIGUSR1)]
print("argv", *sys.argv[1:], flush=True)
print("HUP", dispositions[0], "USR1", dispositions[1], flush=True)
print("workers", os.environ.get("VSOCK_PROXY_NUM_WORKERS"), flush=True)
signal.signal(signal.SIGHUP, lambda *_: print("reloaded", flush=True))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    signal.pause()
"""


class SysVScript:
    """init/vsock-proxy.init with its paths moved into a temporary directory and stand-ins there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "vsock-proxy.log"
        self.pidfile = root / "vsock-proxy.pid"
        self.defaults = root / "default"
        paths = {"DAEMON": root / "vsock-proxy", "REGION_HELPER": root / "vsock-proxy-region",
                 "DEFAULTS": self.defaults, "PIDFILE": self.pidfile, "LOGFILE": self.log}
        text = (REPO / "init" / "vsock-proxy.init").read_text()
        for name, path in paths.items():
            text, count = re.subn(rf"^{name}=.*$", f"{name}={path}", text, flags=re.M)
            assert count == 1, name
        self.script = root / "vsock-proxy.init"
        self.script.write_text(text)
        # A shell wrapper, not a #! line: a kernel stops the interpreter's path at its first space.
        (root / "stand-in-daemon.py").write_text(STANDIN_DAEMON)
        paths["DAEMON"].write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                                   f"{shlex.quote(str(root / 'stand-in-daemon.py'))} \"$@\"\n")
        paths["REGION_HELPER"].write_text("#!/bin/sh\necho eu-west-3\n")
        for program in (paths["DAEMON"], paths["REGION_HELPER"]):
            program.chmod(0o755)

    def __call__(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(self.script), action], env={"PATH": "/usr/bin:/bin"},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def wait_logged(self, line: str, count: int = 1) -> list[str]:
        deadline = time.monotonic() + 20
        while True:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            if lines.count(line) >= count:
                return lines
            assert time.monotonic() < deadline, f"{line!r} not logged {count} time(s): {lines}"
            time.sleep(0.05)

    def kill(self) -> None:
        """Teardown: end a stand-in daemon still running (by its pid file)."""
        with contextlib.suppress(OSError, ValueError):
            os.kill(self.pid(), signal.SIGKILL)


@pytest.fixture
def sysv(tmp_path):
    script = SysVScript(tmp_path)
    yield script
    script.kill()


def test_sysv_start_reload_status_stop(sysv):
    sysv.defaults.write_text("VSOCK_PROXY_NUM_WORKERS=16\n")
    started = sysv("start")
    assert (started.returncode, started.stdout) == (
        0, "Starting vsock-proxy: vsock port 8000 to kms.eu-west-3.amazonaws.com:443\n"), started.stderr
    lines = sysv.wait_logged("ready")
    assert lines[:3] == ["argv 8000 kms.eu-west-3.amazonaws.com 443", "HUP ignored USR1 ignored", "workers 16"]
    pid = sysv.pid()

    reloaded = sysv("reload")
    assert (reloaded.returncode, reloaded.stdout) == (0, f"Reloading vsock-proxy (pid {pid})\n")
    sysv.wait_logged("reloaded")
    assert sysv("force-reload").returncode == 0
    sysv.wait_logged("reloaded", count=2)
    status = sysv("status")
    assert (status.returncode, status.stdout) == (0, f"vsock-proxy is running (pid {pid})\n")

    stopped = sysv("stop")
    assert (stopped.returncode, stopped.stdout) == (0, f"Stopping vsock-proxy (pid {pid})\n")
    assert not Path(f"/proc/{pid}").exists()
    assert sysv("status").returncode == 3
    not_running = sysv("reload")
    assert (not_running.returncode, not_running.stderr) == (7, "vsock-proxy is not running\n")


def test_sysv_empty_local_port_serves_the_services_file(sysv):
    sysv.defaults.write_text("LOCAL_PORT=\n")
    started = sysv("start")
    assert (started.returncode, started.stdout) == (0, "Starting vsock-proxy: the services in its YAML file\n")
    assert sysv.wait_logged("ready")[0] == "argv"
    assert sysv("stop").returncode == 0


def test_sysv_script_parses_and_logs_where_logrotate_looks():
    script = REPO / "init" / "vsock-proxy.init"
    assert subprocess.run(["sh", "-n", str(script)], timeout=10).returncode == 0
    assert "LOGFILE=/var/log/vsock-proxy.log" in script.read_text().splitlines()
    assert "/var/log/vsock-proxy.log" in (REPO / "init" / "vsock-proxy.logrotate").read_text()


def test_default_allowlist_matches_upstreams_kms_endpoints():
    from vsockproxy.config import load_file

    rules = load_file(str(REPO / "conf" / "vsock-proxy.yaml")).allowlist.rules
    names = {rule.name for rule in rules}
    assert all(rule.ports == frozenset({443}) for rule in rules)
    assert {"kms.us-east-1.amazonaws.com", "kms-fips.us-east-1.amazonaws.com", "kms.eu-west-3.amazonaws.com",
            "kms.cn-northwest-1.amazonaws.com", "kms-fips.us-gov-west-1.amazonaws.com"} <= names
    assert len(names) == len(rules) == 76


# --------------------------------------------------------------------------- the replace-upstream script

class ReplaceScript:
    """init/vsock-proxy-replace-upstream with its /etc and /var/lib paths moved into a temporary directory,
    and a stand-in systemctl that logs its calls and prints FragmentPath for ``show`` (the script under a
    real systemd is tests/e2e/test_vsock_systemd.py's)."""

    def __init__(self, root: Path) -> None:
        self.unit_dir = root / "etc" / "systemd" / "system"
        self.unit_dir.mkdir(parents=True)
        self.state = root / "var" / "lib" / "vsockproxy" / "replace-upstream"
        self.alias = self.unit_dir / "nitro-enclaves-vsock-proxy.service"
        self.calls = root / "systemctl.calls"
        text = (REPO / "init" / "vsock-proxy-replace-upstream").read_text()
        for name, path in {"UNIT_DIR": self.unit_dir, "STATE": self.state}.items():
            text, count = re.subn(rf"^{name}=.*$", f"{name}='{path}'", text, flags=re.M)
            assert count == 1, name
        self.script = root / "vsock-proxy-replace-upstream"
        self.script.write_text(text)
        self.bin = root / "bin"
        self.bin.mkdir()
        (self.bin / "systemctl").write_text(
            f'#!/bin/sh\necho "$*" >>"{self.calls}"\n[ "$1" = show ] && cat "{root}/fragment"\nexit 0\n')
        (self.bin / "systemctl").chmod(0o755)
        self.fragment_file = root / "fragment"
        self.fragment_file.write_text("")

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(self.script), *args], env={"PATH": f"{self.bin}:/usr/bin:/bin"},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)

    def systemctl_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def replace(tmp_path):
    return ReplaceScript(tmp_path)


def test_replace_upstream_parses_and_wants_on_or_off(replace):
    assert subprocess.run(["sh", "-n", str(REPO / "init" / "vsock-proxy-replace-upstream")], timeout=10).returncode == 0
    for args in ((), ("enable",)):
        result = replace(*args)
        usage = "usage: vsock-proxy-replace-upstream on|off\n"
        assert (result.returncode, result.stdout, result.stderr) == (2, "", usage)
    assert replace.systemctl_calls() == []


def test_replace_upstream_off_with_nothing_to_undo_changes_nothing(replace):
    result = replace("off")
    assert (result.returncode, result.stdout, result.stderr) == (0, "vsock-proxy-replace-upstream: already off\n", "")
    assert replace.systemctl_calls() == []


def test_replace_upstream_on_refuses_to_replace_a_mask_or_an_operators_file(replace):
    replace.alias.symlink_to("/dev/null")  # systemctl mask nitro-enclaves-vsock-proxy
    result = replace("on")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"vsock-proxy-replace-upstream: {replace.alias} exists and is not this script's alias "
                             "(a mask, or an own copy): move it away first\n")
    assert os.readlink(replace.alias) == "/dev/null"
    assert replace.systemctl_calls() == [] and not replace.state.exists()


def test_replace_upstream_on_refuses_when_our_unit_is_not_installed(replace):
    result = replace("on")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("vsock-proxy-replace-upstream: vsock-proxy.service is not installed "
                             "(see \"Running as a service\" in the README)\n")
    assert not replace.alias.exists() and not replace.state.exists()


def test_replace_upstream_on_saves_the_states_then_off_restores_them(replace):
    replace.fragment_file.write_text("/usr/lib/systemd/system/vsock-proxy.service\n")
    result = replace("on")
    assert result.returncode == 0, result.stderr
    assert os.readlink(replace.alias) == "/usr/lib/systemd/system/vsock-proxy.service"
    # The stand-in says nothing for is-enabled and is-active: systemd does not know the units.
    assert replace.state.read_text() == ("upstream_enabled=not-found\nupstream_active=not-found\n"
                                         "ours_enabled=not-found\nours_active=not-found\n")
    changes = [call for call in replace.systemctl_calls() if not call.startswith(("show ", "is-"))]
    assert changes == ["daemon-reload", "enable --now vsock-proxy.service"]
    replace.calls.unlink()
    result = replace("off")
    assert result.returncode == 0, result.stderr
    assert replace.systemctl_calls() == ["disable vsock-proxy.service", "stop vsock-proxy.service", "daemon-reload"]
    assert not replace.alias.is_symlink() and not replace.state.exists() and not replace.state.parent.exists()
