"""init/vsock-proxy.service under a real systemd (PID 1) in the test VM, hardening and all.

Run by tests/vm/test_systemd_unit.py through ``scripts/vsock-vm --systemd``; anywhere
else (the plain VM run of tests/e2e included) it is skipped.  The unit is installed as the
README says, unchanged, and so is the proxy: /usr/local/bin/vsock-proxy is the command of a
venv of the system's python3 under /opt, with this checkout's package in it, where the
sandbox can read it wherever the checkout is (ProtectHome= hides /home and /root, and the
pyenv interpreter of this .venv).  The region helper is the repository's, asking a fake
IMDS on 169.254.169.254.  The VM has no network, so a fake DNS server on 127.0.0.1 (the
VM's /etc/resolv.conf) says kms.eu-west-3.amazonaws.com is 127.0.0.1, and a plain HTTP
server on port 443 stands in for KMS.  All of this lives in the VM's throw-away writable
layer.

The tests run in order, on one service: start (with a SIGHUP while the shell still looks
up the region), the sandbox, a request, the journal, metrics, the services: file, reload,
drain-on-stop, and a port below 1024 with and without the documented drop-in.  Then a
stand-in of upstream's nitro-enclaves-vsock-proxy.service holds vsock port 8000: the RPM's
scriptlets leave it alone without the operator's opt-in, and with it
init/vsock-proxy-replace-upstream makes its name restart ours, until "off" restores it.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, wait_until
from tests.e2e.vsock import IN_VM, IO_TIMEOUT, ThreadedTarget, recv_all, vsock_connect


def pid1_is_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


pytestmark = [
    pytest.mark.vsock,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not (IN_VM and pid1_is_systemd()),
                       reason="needs systemd as PID 1 in the test VM: run by tests/vm/test_systemd_unit.py "
                              "(scripts/vsock-vm --systemd)"),
]

UNIT = "vsock-proxy.service"
IMDS_ADDRESS = "169.254.169.254"
REGION = "eu-west-3"
KMS_NAME = f"kms.{REGION}.amazonaws.com"
METRICS = "127.0.0.1:9090"
# The region helper's IMDS timeout (2 s by default): the fake IMDS holds its first answer
# while the test signals the shell, which may take longer than that in a busy VM.
TEST_SETTINGS = (f"VSOCK_PROXY_METRICS_ADDRESS={METRICS}", "VSOCK_PROXY_IMDS_TIMEOUT=60")
SLOW_BODY = bytes(range(256)) * 4096  # 1 MiB, sent only once the test says so
#: Generous: the VM's CPU is emulated, and the proxy's interpreter takes seconds to start.
SYSTEMCTL_TIMEOUT = 180

OPT_VENV = Path("/opt/vsockproxy")
# What pip writes as a venv's console script.
CONSOLE_SCRIPT = f"""#!{OPT_VENV}/bin/python3
import sys
from vsockproxy.__main__ import main
sys.exit(main())
"""


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command to completion; a failure is the test's failure, with the command's output."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def systemctl(*args: str) -> subprocess.CompletedProcess:
    return run("systemctl", *args, timeout=SYSTEMCTL_TIMEOUT)


def unit_properties(*names: str) -> dict[str, str]:
    output = run("systemctl", "show", UNIT, *(f"--property={name}" for name in names)).stdout
    return dict(line.split("=", 1) for line in output.splitlines())


def journal() -> list[dict]:
    """The unit's journal records, as journalctl -o json gives them."""
    output = run("journalctl", "--unit", UNIT, "--output", "json", "--no-pager").stdout
    return [json.loads(line) for line in output.splitlines()]


def journal_record(pattern: str, timeout: float = 30) -> dict:
    """The first of the unit's journal records whose MESSAGE matches pattern (waits for one)."""
    def find():
        return next((r for r in journal() if isinstance(r.get("MESSAGE"), str) and re.search(pattern, r["MESSAGE"])),
                    None)
    try:
        return wait_until(find, timeout, f"a journal record matching {pattern!r}")
    except AssertionError as exc:
        messages = "\n".join(str(record.get("MESSAGE")) for record in journal()[-30:])
        raise AssertionError(f"{exc}; the unit's last journal messages:\n{messages}") from None


def http_over_vsock(port: int, path: str) -> bytes:
    """GET path through the proxy's vsock port (from CID 1: this VM); the whole reply."""
    with vsock_connect(port) as client:
        client.sendall(f"GET {path} HTTP/1.0\r\nHost: target\r\n\r\n".encode())
        return recv_all(client)


class FakeIMDS(http.server.BaseHTTPRequestHandler):
    """IMDSv2 answering REGION; the token request waits for ``release`` (to hold the helper)."""

    requests: list[str] = []
    token_requested = threading.Event()
    release = threading.Event()

    def do_PUT(self):  # noqa: N802 - http.server's naming
        self.requests.append(f"PUT {self.path}")
        self.token_requested.set()
        self.release.wait(IO_TIMEOUT)
        self._reply(b"token")

    def do_GET(self):  # noqa: N802
        self.requests.append(f"GET {self.path}")
        self._reply(REGION.encode())

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class FakeDNS:
    """A DNS server on 127.0.0.1:53 (UDP) with A records for ``names``; NXDOMAIN for other names."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.queries: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.2)  # to notice close()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closing.is_set():
            try:
                query, client = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            self.sock.sendto(self.answer(query), client)

    def answer(self, query: bytes) -> bytes:
        labels, offset = [], 12
        while query[offset]:
            labels.append(query[offset + 1:offset + 1 + query[offset]].decode("ascii").lower())
            offset += 1 + query[offset]
        qtype, = struct.unpack_from(">H", query, offset + 1)
        question = query[12:offset + 5]
        name = ".".join(labels)
        self.queries.append((name, qtype))
        address = self.names.get(name)
        records = [b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(address)] \
            if address and qtype == 1 else []
        flags = 0x8180 if address else 0x8183  # a response, recursion available; NXDOMAIN for others
        return query[:2] + struct.pack(">HHHHH", flags, 1, len(records), 0, 0) + question + b"".join(records)

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.sock.close()


class HttpTarget:
    """A TCP target answering one HTTP/1.0 request per connection with its name and the path.

    ``/slow`` sets ``slow_started`` and answers SLOW_BODY only once ``slow_release`` is set.
    """

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.slow_started = threading.Event()
        self.slow_release = threading.Event()
        self.server = ThreadedTarget(self.handle, port=port)
        self.port = self.server.port

    def handle(self, sock: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = sock.recv(4096)
            if not chunk:
                return
            request += chunk
        path = request.split(b" ", 2)[1]
        if path == b"/slow":
            self.slow_started.set()
            self.slow_release.wait(IO_TIMEOUT)
            body = SLOW_BODY
        else:
            body = b"%s answered %s" % (self.name.encode(), path)
        sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def body_of(reply: bytes) -> bytes:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK"), reply[:200]
    return body


def write_services_file(services: list[tuple[int, int]]) -> None:
    """The allowlist and services: file, each service (vsock port, target port on 127.0.0.1)."""
    ports = sorted({target for _, target in services})
    lines = ["allowlist:", f"- {{address: 127.0.0.1, port: {ports}}}", "services:"]
    lines += [f"- {{listen_port: {listen}, address: 127.0.0.1, port: {target}}}" for listen, target in services]
    Path("/etc/nitro_enclaves/vsock-proxy.yaml").write_text("\n".join(lines) + "\n")


def write_defaults(*settings: str) -> None:
    """/etc/default/vsock-proxy: the shipped file, plus settings appended (later lines win)."""
    shipped = (REPO / "init" / "vsock-proxy.default").read_text()
    Path("/etc/default/vsock-proxy").write_text(shipped + "".join(f"{line}\n" for line in settings))


def install(path: str | Path, content: str, mode: int) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    target.chmod(mode)


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions that vsockproxy runs on: requirements.txt's, and theirs, transitively."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    names = [line for line in lines if line.strip() and not line.startswith("#")]
    found: dict[str, importlib.metadata.Distribution] = {}
    while names:
        name = re.match(r"[A-Za-z0-9._-]+", names.pop()).group(0)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a dependency for another platform (gevent's cffi on Windows)
        if dist.metadata["Name"].lower() not in found:
            found[dist.metadata["Name"].lower()] = dist
            names += [r for r in dist.requires or [] if "extra ==" not in r.partition(";")[2]]
    return list(found.values())


def install_under_opt() -> None:
    """/opt/vsockproxy as ``python3 -m venv /opt/vsockproxy; /opt/vsockproxy/bin/pip install .`` makes it, and
    /usr/local/bin/vsock-proxy a link to its command, as an operator installs it (README, Install).

    The VM has no network: the runtime dependencies are copied from this .venv (their files as each
    distribution's RECORD lists them; byte code too, whose source times copy2 keeps), and the package
    from this checkout.  Their wheels must suit /usr/bin/python3: the same minor version as this Python.
    """
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    system_python = os.path.realpath("/usr/bin/python3")
    if not system_python.endswith(f"python{version}"):
        pytest.fail(f"the venv under /opt runs /usr/bin/python3 ({system_python}) with this .venv's "
                    f"Python {version} packages: they must be the same minor version")
    umask = os.umask(0o022)  # readable by the unit's transient user
    try:
        run("/usr/bin/python3", "-m", "venv", "--without-pip", str(OPT_VENV))
        site_packages = OPT_VENV / "lib" / f"python{version}" / "site-packages"
        for dist in runtime_distributions():
            root = Path(dist.locate_file(""))
            files = [str(file) for file in dist.files or []  # not the headers and scripts beside
                     if ".." not in file.parts and (root / file).is_file()]
            # One cp for them all: a file at a time from Python takes seconds under TCG.
            subprocess.run(["xargs", "-0", "cp", "--parents", "--preserve=mode,timestamps", "-t", str(site_packages)],
                           input="\0".join(files).encode(), cwd=root, check=True, timeout=120)
        shutil.copytree(REPO / "vsockproxy", site_packages / "vsockproxy")
        install(OPT_VENV / "bin" / "vsock-proxy", CONSOLE_SCRIPT, 0o755)
        Path("/usr/local/bin").mkdir(parents=True, exist_ok=True)
        Path("/usr/local/bin/vsock-proxy").unlink(missing_ok=True)
        Path("/usr/local/bin/vsock-proxy").symlink_to(OPT_VENV / "bin" / "vsock-proxy")
    finally:
        os.umask(umask)


@pytest.fixture(scope="module")
def world(request):
    """Install the unit as the README says, with the fake IMDS and KMS; stop everything after.

    When a test failed, the unit's journal goes to stderr at the end (run with -s to see it).
    """
    install_under_opt()
    install("/usr/local/libexec/vsock-proxy-region", (REPO / "init" / "vsock-proxy-region").read_text(), 0o755)
    install("/etc/systemd/system/" + UNIT, (REPO / "init" / UNIT).read_text(), 0o644)
    install("/etc/nitro_enclaves/vsock-proxy.yaml", (REPO / "conf" / "vsock-proxy.yaml").read_text(), 0o644)
    write_defaults(*TEST_SETTINGS)
    Path("/etc/resolv.conf").unlink()  # the host's, maybe a symlink
    Path("/etc/resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:5\n")
    run("ip", "address", "add", f"{IMDS_ADDRESS}/32", "dev", "lo")
    systemctl("daemon-reload")

    imds_handler = type("IMDS", (FakeIMDS,), {"requests": [], "token_requested": threading.Event(),
                                             "release": threading.Event()})
    imds = http.server.ThreadingHTTPServer((IMDS_ADDRESS, 80), imds_handler)
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    dns = FakeDNS({KMS_NAME: "127.0.0.1"})
    targets = {"kms": HttpTarget("kms", port=443), "a": HttpTarget("a"), "b": HttpTarget("b")}
    try:
        yield {"imds": imds_handler, "dns": dns, **targets}
    finally:
        imds_handler.release.set()
        for target in targets.values():
            target.slow_release.set()
        subprocess.run(["systemctl", "stop", UNIT], timeout=SYSTEMCTL_TIMEOUT, check=False)
        if request.session.testsfailed:
            print(f"---- journalctl --unit {UNIT} ----", file=sys.stderr)
            subprocess.run(["journalctl", "--unit", UNIT, "--output", "short-monotonic", "--no-pager"],
                           stdout=sys.stderr, timeout=60, check=False)
        imds.shutdown()
        imds.server_close()
        dns.close()
        for target in targets.values():
            target.server.stop()


def test_start_reaches_ready_though_sighup_comes_while_the_shell_looks_up_the_region(world):
    imds = world["imds"]
    start = subprocess.Popen(["systemctl", "start", UNIT], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert imds.token_requested.wait(SYSTEMCTL_TIMEOUT), "the region helper never asked the IMDS"
        shell = int(unit_properties("MainPID")["MainPID"])
        assert Path(f"/proc/{shell}/comm").read_text().strip() == "sh"
        os.kill(shell, signal.SIGHUP)
        os.kill(shell, signal.SIGUSR1)
        imds.release.set()
        output, _ = start.communicate(timeout=SYSTEMCTL_TIMEOUT)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    assert start.returncode == 0, output  # returns once READY=1 came (Type=notify)
    state = unit_properties("ActiveState", "SubState", "NRestarts", "MainPID", "StatusText")
    assert (state["ActiveState"], state["SubState"], state["NRestarts"]) == ("active", "running", "0"), state
    assert int(state["MainPID"]) == shell  # the shell exec'd the proxy
    assert "1 service" in state["StatusText"], state
    assert imds.requests == ["PUT /latest/api/token", "GET /latest/meta-data/placement/region"]
    journal_record(rf"^listening on vsock port 8000, forwarding to {re.escape(KMS_NAME)}:443 ")


def test_the_proxy_runs_in_the_units_sandbox(world):
    pid = int(unit_properties("MainPID")["MainPID"])
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    uid = int(status["Uid"].split()[0])
    assert uid >= 61184, status["Uid"]  # DynamicUser's range
    assert status["CapEff"] == status["CapBnd"] == "0000000000000000"
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    # PrivateUsers=yes: the process's user namespace maps root and its own user only.
    uid_map = Path(f"/proc/{pid}/uid_map").read_text().split()
    assert uid_map != Path("/proc/self/uid_map").read_text().split()
    assert str(uid) in uid_map
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max open files +524288 +524288 ", limits, re.M), limits


def test_http_over_vsock_reaches_the_regional_kms_endpoint(world):
    assert body_of(http_over_vsock(8000, "/first")) == b"kms answered /first"
    assert (KMS_NAME, 1) in world["dns"].queries  # resolved over DNS (UDP), from the sandbox


def test_the_journal_has_the_connection_line_at_priority_info(world):
    record = journal_record(r"^closed enclave=1:\d+ target=127\.0\.0\.1:443 up=\d+ down=\d+ duration=\S+ end=eof$")
    assert record["PRIORITY"] == "6", record  # from the <6> prefix, which journald strips
    assert record["SYSLOG_IDENTIFIER"] == "vsock-proxy", record
    info = run("journalctl", "--unit", UNIT, "--priority", "info", "--no-pager", "--output", "cat").stdout
    notice = run("journalctl", "--unit", UNIT, "--priority", "notice", "--no-pager", "--output", "cat").stdout
    assert record["MESSAGE"] in info.splitlines()
    assert "closed enclave=" not in notice


def test_metrics_are_served_on_the_metrics_port(world):
    with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=IO_TIMEOUT) as response:
        text = response.read().decode()
    assert 'vsockproxy_connections_completed_total{service="8000"} 1.0' in text.splitlines()


def test_an_empty_local_port_serves_the_services_file_instead_of_kms(world):
    asked = len(world["imds"].requests)
    write_defaults(*TEST_SETTINGS, "LOCAL_PORT=")
    write_services_file([(8000, world["a"].port)])
    systemctl("restart", UNIT)
    assert unit_properties("ActiveState")["ActiveState"] == "active"
    assert body_of(http_over_vsock(8000, "/from-file")) == b"a answered /from-file"
    assert len(world["imds"].requests) == asked  # no region look-up


def test_reload_serves_a_newly_allowed_service(world):
    pid = unit_properties("MainPID")["MainPID"]
    with pytest.raises(OSError):
        http_over_vsock(8001, "/before")
    write_services_file([(8000, world["a"].port), (8001, world["b"].port)])
    systemctl("reload", UNIT)
    journal_record(r"^reload applied: 2 service\(s\)$", timeout=SYSTEMCTL_TIMEOUT)
    assert body_of(http_over_vsock(8001, "/after")) == b"b answered /after"
    assert body_of(http_over_vsock(8000, "/still")) == b"a answered /still"
    assert unit_properties("MainPID")["MainPID"] == pid


def test_stop_lets_an_open_connection_finish(world):
    target = world["a"]
    stop = None
    try:
        with vsock_connect(8000) as client:
            client.sendall(b"GET /slow HTTP/1.0\r\n\r\n")
            assert target.slow_started.wait(IO_TIMEOUT)
            stop = subprocess.Popen(["systemctl", "stop", UNIT], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            journal_record(r"^stopping: listeners closed, waiting up to 30s for 1 open connection\(s\)$",
                           timeout=SYSTEMCTL_TIMEOUT)
            assert stop.poll() is None  # the drain holds the stop
            target.slow_release.set()
            reply = recv_all(client)
        # The client has closed its side too: the connection has ended, and with it the drain.
        output, _ = stop.communicate(timeout=SYSTEMCTL_TIMEOUT)
    finally:
        if stop is not None and stop.poll() is None:
            stop.kill()
            stop.wait()
    assert stop.returncode == 0, output
    assert hashlib.sha256(body_of(reply)).digest() == hashlib.sha256(SLOW_BODY).digest()
    record = journal_record(rf"^closed enclave=1:\d+ target=127\.0\.0\.1:{target.port} up=\d+ "
                            rf"down={len(reply)} duration=\S+ end=eof$")
    assert record["PRIORITY"] == "6"
    journal_record(r"^stopped$")
    state = unit_properties("ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}


def test_a_privileged_port_needs_the_documented_drop_in(world):
    write_services_file([(999, world["a"].port)])
    refused = subprocess.run(["systemctl", "start", UNIT], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=SYSTEMCTL_TIMEOUT)
    assert refused.returncode != 0
    error = journal_record(r"^vsock-proxy: error: cannot listen on vsock any CID port 999: Permission denied$")
    assert error["PRIORITY"] == "3", error  # SyslogLevel=err: journalctl -p err shows why it failed
    systemctl("stop", UNIT)  # Restart=always would try again
    install("/etc/systemd/system/vsock-proxy.service.d/privileged-port.conf",
            (REPO / "init" / "vsock-proxy-privileged-port.conf").read_text(), 0o644)
    systemctl("daemon-reload")
    systemctl("start", UNIT)
    assert body_of(http_over_vsock(999, "/low")) == b"a answered /low"


# --------------------------------------------------------------------------- upstream's unit name

UPSTREAM = "nitro-enclaves-vsock-proxy.service"
UPSTREAM_FILE = Path("/usr/lib/systemd/system") / UPSTREAM
UPSTREAM_STANDIN = Path("/usr/local/libexec/upstream-vsock-proxy-stand-in")
REPLACE_SCRIPT = Path("/usr/local/libexec/vsock-proxy-replace-upstream")
REPLACE_MARKER = Path("/etc/nitro_enclaves/vsockproxy-replace-upstream")
REPLACE_STATE = Path("/var/lib/vsockproxy/replace-upstream")
# aws-nitro-enclaves-cli 1.5.0's vsock_proxy/service/nitro-enclaves-vsock-proxy.service, but for
# ExecStart: its curl and jq ask the IMDS for the region and exec /usr/bin/vsock-proxy.
UPSTREAM_UNIT = f"""[Unit]
Description=Nitro Enclaves vsock Proxy
After=network-online.target
DefaultDependencies=no

[Service]
Type=simple
StandardOutput=journal
StandardError=journal
SyslogIdentifier=vsock-proxy
# Use RUST_LOG=trace for more verbose logging
ExecStart={UPSTREAM_STANDIN}
Restart=always
TimeoutSec=0

[Install]
WantedBy=multi-user.target
"""
UPSTREAM_PROGRAM = '''#!/usr/bin/python3 -I
"""Stands in for upstream's vsock-proxy: holds vsock port 8000 and answers every request with its pid."""
import os
import socket

listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, 8000))
listener.listen(16)
print("upstream stand-in listening on vsock port 8000", flush=True)
while True:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        conn.recv(4096)
        conn.sendall(b"upstream stand-in pid %d" % os.getpid())
'''


def rpm_scriptlet(name: str) -> str:
    """The spec's %name scriptlet with its macros expanded, for the README's /usr/local install (rpm is
    not needed: the scriptlets use plain %{macro}s of the spec's %globals and scripts/package's defines)."""
    spec = (REPO / "scripts" / "package_lib" / "vsockproxy.spec").read_text()
    macros = dict(re.findall(r"^%global (\w+) (.*)$", spec, re.M), vsockproxy_libexec=str(REPLACE_SCRIPT.parent))
    body = re.search(rf"^%{name}\n(.*?)^%", spec, re.M | re.S).group(1)
    text = re.sub(r"%\{(\w+)\}", lambda match: macros[match.group(1)], body)
    assert "%" not in text, text
    return text


def run_scriptlet(name: str, arg: str, **env: str) -> subprocess.CompletedProcess:
    """Run the RPM's %name scriptlet as rpm does (sh, $1 = arg), with env added to a bare environment."""
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(["sh", "-c", rpm_scriptlet(name), name, arg], env={**base, **env},
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT * 4)
    assert result.returncode == 0, f"%{name} {arg}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def replace_upstream(action: str) -> str:
    return run(str(REPLACE_SCRIPT), action, timeout=SYSTEMCTL_TIMEOUT * 4).stdout


def properties(unit: str, *names: str) -> dict[str, str]:
    output = run("systemctl", "show", unit, *(f"--property={name}" for name in names)).stdout
    return dict(line.split("=", 1) for line in output.splitlines())


def unit_files_state() -> dict:
    """All that the tooling may change about both units: upstream's file, the links to or named after either
    unit under /etc/systemd/system, what each name loads, and whether each unit is enabled."""
    links = {}
    for path in Path("/etc/systemd/system").rglob("*"):
        if path.is_symlink():
            target = os.readlink(path)
            if any(name in path.name or name in target for name in (UNIT, UPSTREAM)):
                links[str(path)] = target
    return {
        "upstream file sha256": hashlib.sha256(UPSTREAM_FILE.read_bytes()).hexdigest(),
        "links": links,
        "upstream": properties(UPSTREAM, "Id", "FragmentPath", "UnitFileState"),
        "ours": properties(UNIT, "Id", "UnitFileState"),
    }


def who_serves_8000() -> str | None:
    """The answer on vsock port 8000 (upstream's stand-in, or our proxy's target), None while nothing listens."""
    try:
        with vsock_connect(8000) as client:
            client.sendall(b"GET /who HTTP/1.0\r\nHost: target\r\n\r\n")
            reply = recv_all(client)
    except OSError:
        return None
    return reply.partition(b"\r\n\r\n")[2].decode() if reply.startswith(b"HTTP/") else reply.decode()


def wait_serving(expected: str) -> str:
    """Until vsock port 8000 answers with text that starts with expected (a Type=simple start returns early)."""
    def answer() -> str | None:
        text = who_serves_8000()
        return text if text is not None and text.startswith(expected) else None
    return wait_until(answer, SYSTEMCTL_TIMEOUT, f"vsock port 8000 answering {expected!r}")


def running(program: Path) -> bool:
    """Whether a process runs program (as its script: its path is in the command line)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(program).encode() in cmdline.read_bytes():
                return True
        except OSError:
            pass  # the process ended meanwhile
    return False


def count_records(pattern: str) -> int:
    return sum(1 for r in journal() if isinstance(r.get("MESSAGE"), str) and re.search(pattern, r["MESSAGE"]))


@pytest.fixture(scope="module")
def upstream(world):
    """Upstream's unit (its real text, a stand-in program) installed, enabled and serving vsock port 8000; ours
    installed but stopped, serving the services: file (port 8000 to target "a") whenever it runs."""
    systemctl("stop", UNIT)
    write_defaults(*TEST_SETTINGS, "LOCAL_PORT=")
    write_services_file([(8000, world["a"].port)])
    install(UPSTREAM_STANDIN, UPSTREAM_PROGRAM, 0o755)
    install(UPSTREAM_FILE, UPSTREAM_UNIT, 0o644)
    install(REPLACE_SCRIPT, (REPO / "init" / "vsock-proxy-replace-upstream").read_text(), 0o755)
    systemctl("daemon-reload")
    systemctl("enable", "--now", UPSTREAM)
    wait_serving("upstream stand-in pid ")
    try:
        yield unit_files_state()
    finally:
        REPLACE_MARKER.unlink(missing_ok=True)
        subprocess.run(["systemctl", "stop", UNIT, UPSTREAM], timeout=SYSTEMCTL_TIMEOUT, check=False)


def test_without_the_opt_in_the_rpm_scriptlets_leave_upstreams_unit_alone(upstream):
    assert not REPLACE_MARKER.exists()
    first = wait_serving("upstream stand-in pid ")
    run_scriptlet("post", "1")  # an install
    run_scriptlet("post", "2", VSOCKPROXY_REPLACE_UPSTREAM="0")  # an upgrade, "0" is no opt-in
    assert unit_files_state() == upstream
    assert properties(UPSTREAM, "ActiveState")["ActiveState"] == "active"
    assert who_serves_8000() == first
    systemctl("restart", "nitro-enclaves-vsock-proxy")  # what the ACM agent runs: upstream's, as before
    assert wait_serving("upstream stand-in pid ") != first
    assert properties(UNIT, "ActiveState")["ActiveState"] == "inactive"
    run_scriptlet("preun", "0")  # a removal
    run_scriptlet("postun", "0")
    assert unit_files_state() == upstream
    assert not REPLACE_STATE.exists()


def test_with_the_opt_in_restarting_upstreams_name_restarts_our_proxy(upstream):
    REPLACE_MARKER.touch()
    listening = r"^listening on vsock port 8000, forwarding "
    started = count_records(listening)
    post = run_scriptlet("post", "1")
    assert (f"vsock-proxy-replace-upstream: on: {UPSTREAM} leads to {UNIT} (upstream's unit was enabled and "
            "active)\n") in post.stdout
    assert who_serves_8000() == "a answered /who"
    state = unit_files_state()
    assert state["upstream"] == {"Id": UNIT, "FragmentPath": "/etc/systemd/system/vsock-proxy.service",
                                 "UnitFileState": "enabled"}  # the name loads our unit
    assert state["links"][f"/etc/systemd/system/{UPSTREAM}"] == "/etc/systemd/system/vsock-proxy.service"
    assert f"/etc/systemd/system/multi-user.target.wants/{UPSTREAM}" not in state["links"]  # upstream disabled
    assert state["links"][f"/etc/systemd/system/multi-user.target.wants/{UNIT}"] == \
        "/etc/systemd/system/vsock-proxy.service"
    assert state["upstream file sha256"] == upstream["upstream file sha256"]

    before = properties(UNIT, "MainPID")["MainPID"]
    systemctl("restart", "nitro-enclaves-vsock-proxy")  # what the ACM agent runs
    after = properties(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert after["MainPID"] != before and (after["ActiveState"], after["NRestarts"]) == ("active", "0"), after
    assert who_serves_8000() == "a answered /who"
    assert count_records(listening) == started + 2  # the start by %post, and the restart by upstream's name
    assert not running(UPSTREAM_STANDIN)

    again = replace_upstream("on")  # idempotent: an RPM upgrade runs it again
    assert again == f"vsock-proxy-replace-upstream: already on: {UPSTREAM} leads to {UNIT}\n"
    assert unit_files_state() == state
    assert properties(UNIT, "MainPID")["MainPID"] == after["MainPID"]


def test_off_restores_upstreams_unit_exactly_and_so_does_removing_the_rpm(upstream):
    output = replace_upstream("off")  # the README's roll back
    assert output == f"vsock-proxy-replace-upstream: off: {UPSTREAM} is upstream's unit again (enabled and active)\n"
    assert unit_files_state() == upstream
    assert properties(UNIT, "ActiveState")["ActiveState"] == "inactive"
    wait_serving("upstream stand-in pid ")
    assert not REPLACE_STATE.exists() and not REPLACE_STATE.parent.exists()
    assert replace_upstream("off") == "vsock-proxy-replace-upstream: already off\n"
    assert unit_files_state() == upstream

    run_scriptlet("post", "1")  # the marker is still there: on again
    assert who_serves_8000() == "a answered /who"
    run_scriptlet("preun", "0")  # removing the RPM undoes it
    run_scriptlet("postun", "0")
    assert unit_files_state() == upstream
    assert properties(UNIT, "ActiveState")["ActiveState"] == "inactive"
    wait_serving("upstream stand-in pid ")
