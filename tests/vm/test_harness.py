"""Tests of scripts/vsock-vm itself, run on the host: each one boots a nested VM.

Only the guest ever connect()s an AF_VSOCK socket: the one script here that does so
checks VSOCKPROXY_IN_VM=1 first.  Every harness run is bounded by a subprocess timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "scripts" / "vsock-vm"
IN_VM_VAR = "VSOCKPROXY_IN_VM"
EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125
# Harness timeout of a run that should finish; a busy host boots the VM slowly.
VM_TIMEOUT_S = 240
WALL_TIMEOUT_S = VM_TIMEOUT_S + 60

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(WALL_TIMEOUT_S + 30, func_only=True),
    pytest.mark.skipif(os.environ.get(IN_VM_VAR) == "1", reason="already inside the VM"),
]

VSOCK_ECHO = """
import os, socket, threading
if os.environ.get("VSOCKPROXY_IN_VM") != "1":
    raise SystemExit("refusing to connect AF_VSOCK outside the VM")
VMADDR_CID_LOCAL = 1  # vsock_loopback; not in Python 3.11's socket module
listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.settimeout(30)
listener.bind((socket.VMADDR_CID_ANY, 5123))
listener.listen(1)

def echo_upper():
    conn, _ = listener.accept()
    with conn:
        conn.sendall(conn.recv(100).upper())

server = threading.Thread(target=echo_upper, daemon=True)
server.start()
with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
    client.settimeout(30)
    client.connect((VMADDR_CID_LOCAL, 5123))
    client.sendall(b"ping over vsock")
    print(client.recv(100).decode())
server.join(30)
"""


@pytest.fixture(scope="module", autouse=True)
def prepared_images() -> None:
    """Install the packages and build the images first, so no test's timing includes that."""
    subprocess.run([str(HARNESS), "--prepare"], stdin=subprocess.DEVNULL, timeout=1200, check=True)


def vsock_vm(*command: str, options: tuple[str, ...] = (), cwd: Path = REPO,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run COMMAND through the harness and capture its output."""
    return subprocess.run(
        [str(HARNESS), "--timeout", str(VM_TIMEOUT_S), *options, "--", *command],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=WALL_TIMEOUT_S, check=False)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains text (to find a qemu left behind)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass  # the process ended meanwhile
    return pids


def test_af_vsock_is_available_in_the_guest() -> None:
    result = vsock_vm("python3", "-c", "import socket; print(socket.AF_VSOCK)")
    assert (result.returncode, result.stdout) == (0, "40\n"), result.stderr


def test_stdout_stderr_and_exit_status_come_back_separately() -> None:
    result = vsock_vm("sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")


def test_no_output_is_lost_when_the_guest_powers_off() -> None:
    result = vsock_vm("sh", "-c", "seq 1 300000; seq 1 1000 >&2")
    assert result.returncode == 0
    assert result.stdout == "".join(f"{i}\n" for i in range(1, 300001))
    assert result.stderr == "".join(f"{i}\n" for i in range(1, 1001))


def test_marker_cwd_environment_and_stdin_in_the_guest() -> None:
    assert os.environ.get(IN_VM_VAR) != "1"
    env = dict(os.environ, VSOCK_VM_TEST_VALUE="it's \"quoted\"\n$HOME `x` \\")
    script = ("import os, sys; print(os.environ.get('VSOCKPROXY_IN_VM')); print(os.getcwd()); "
              "print(repr(os.environ['VSOCK_VM_TEST_VALUE'])); print(sys.argv[1:]); "
              "print(repr(sys.stdin.read()))")
    result = vsock_vm("python3", "-c", script, "a b", "'c'", "", cwd=REPO / "scripts", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "1", str(REPO / "scripts"), repr(env["VSOCK_VM_TEST_VALUE"]), "['a b', \"'c'\", '']", "''"]


def test_a_cwd_under_tmp_with_a_space_keeps_its_path_and_files_in_the_guest(tmp_path: Path) -> None:
    """The guest's /tmp is fresh, but a checkout under the host's /tmp stays reachable at its path."""
    checkout = tmp_path / "my checkout"
    (checkout / "sub dir").mkdir(parents=True)
    (checkout / "sub dir" / "file").write_text("from the host\n")
    script = ("import os; print(os.getcwd()); print(open('sub dir/file').read(), end=''); "
              "open('written in the guest', 'w').write('x'); print(sorted(os.listdir('.'))); "
              "print(os.listdir('/tmp'))")
    result = vsock_vm("python3", "-c", script, cwd=checkout)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        str(checkout), "from the host", "['sub dir', 'written in the guest']",
        str([checkout.relative_to("/tmp").parts[0]])]  # nothing else of the host's /tmp
    assert sorted(p.name for p in checkout.iterdir()) == ["sub dir"]  # the guest's write vanished


def test_tmp_itself_as_the_cwd_is_refused_without_booting() -> None:
    result = vsock_vm("true", cwd=Path("/tmp"))
    assert result.returncode == EXIT_VM_FAILED
    assert result.stderr == ("vsock-vm: the current directory is /tmp, which the VM replaces with a fresh "
                             "mount: run from a directory under it, or another one\n")


def test_vsock_loopback_echo_inside_the_guest() -> None:
    result = vsock_vm("python3", "-c", VSOCK_ECHO)
    assert (result.returncode, result.stdout) == (0, "PING OVER VSOCK\n"), result.stderr


def test_systemd_mode_runs_the_command_as_a_service_of_pid_1() -> None:
    script = "cat /proc/1/comm; sed 's|.*/||' /proc/self/cgroup; echo $VSOCKPROXY_IN_VM; pwd; echo err >&2; exit 7"
    result = vsock_vm("sh", "-c", script, options=("--systemd",), cwd=REPO / "scripts")
    assert (result.returncode, result.stderr) == (7, "err\n"), result.stderr
    assert result.stdout.splitlines() == ["systemd", "vsock-vm-command.service", "1", str(REPO / "scripts")]


def test_timeout_kills_the_vm(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    started = time.monotonic()
    result = subprocess.run([str(HARNESS), "--timeout", "5", "--", "sleep", "600"], env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == EXIT_TIMEOUT, result.stderr
    assert "timed out" in result.stderr
    assert time.monotonic() - started < 30
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_sigterm_kills_the_vm(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    harness = subprocess.Popen([str(HARNESS), "--", "sleep", "600"], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p != harness.pid for p in processes_mentioning(str(tmp_path))):
            assert time.monotonic() < deadline, "qemu did not start"
            time.sleep(0.2)
        harness.send_signal(signal.SIGTERM)
        _, stderr = harness.communicate(timeout=30)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
    assert harness.returncode == 128 + signal.SIGTERM, stderr
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_usage_error_exits_125_without_booting() -> None:
    result = subprocess.run([str(HARNESS), "--mem", "1", "--", "true"], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == EXIT_VM_FAILED
    assert "--mem" in result.stderr


def test_help_documents_the_exit_codes() -> None:
    result = subprocess.run([sys.executable, str(HARNESS), "--help"], capture_output=True,
                            text=True, timeout=30, check=True)
    for code in (str(EXIT_TIMEOUT), str(EXIT_VM_FAILED), IN_VM_VAR):
        assert code in result.stdout
