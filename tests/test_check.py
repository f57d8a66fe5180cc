"""``vsock-proxy --check``: start-up's own checks, then one TCP connect per service; one line each.

SAFETY: --check never listens and never connects over vsock.  These tests only
bind a vsock port (to show that --check does not need it) and connect over TCP
to listeners on 127.0.0.1 that they own.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
import tempfile

import pytest

from tests.helpers import assert_one_line_error, cli_env, unused_tcp_port, vsock_available

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def tcp_listener():
    """Plain listening sockets on 127.0.0.1: the kernel completes a connect even if nobody accepts."""
    sockets = []

    def listen(backlog: int = 16) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(backlog)
        sockets.append(sock)
        return sock.getsockname()[1]

    yield listen
    for sock in sockets:
        sock.close()


def check_env(**extra: str) -> dict[str, str]:
    env = cli_env(**extra)
    env.pop("RUST_LOG", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def services_file(write_config, allow, services) -> str:
    lines = ["allowlist:"] + [f"- {{address: {address}, port: {port}}}" for address, port in allow]
    lines += ["services:"] + [f"- {{listen_port: {listen}, address: {address}, port: {port}}}"
                              for listen, address, port in services]
    return write_config("\n".join(lines) + "\n")


def test_check_passes_when_every_target_accepts(run_cli, write_config, tcp_listener):
    first, second = tcp_listener(), tcp_listener()
    config = services_file(write_config, [("127.0.0.1", f"[{first}, {second}]"), ("localhost", second)],
                           [(47001, "localhost", second)])
    result = run_cli("--check", "47000", "--config", config, "127.0.0.1", str(first), env=check_env())
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    ports = ",".join(str(port) for port in sorted((first, second)))
    assert lines[0].startswith(f"ok   vsock port 47000 -> 127.0.0.1:{first} (allowed by 127.0.0.1:{ports}, "
                               f"1 address, connected to 127.0.0.1:{first} in "), lines[0]
    assert lines[0].endswith(" ms)")
    assert lines[1].startswith(f"ok   vsock port 47001 -> localhost:{second} (allowed by localhost:{second}, "), lines[1]
    assert f"connected to 127.0.0.1:{second} in " in lines[1]


def test_check_fails_for_a_refused_target_and_reports_every_service(run_cli, write_config, tcp_listener):
    listening, refused = tcp_listener(), unused_tcp_port()
    config = services_file(write_config, [("127.0.0.1", f"[{listening}, {refused}]")],
                           [(47001, "127.0.0.1", refused), (47002, "127.0.0.1", listening)])
    result = run_cli("--check", "--config", config, env=check_env())
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0] == f"FAIL vsock port 47001 -> 127.0.0.1:{refused}: cannot connect to 127.0.0.1:{refused}: " \
                       "Connection refused", result.stdout
    assert lines[1].startswith(f"ok   vsock port 47002 -> 127.0.0.1:{listening} ("), result.stdout
    assert len(lines) == 2


def test_check_honours_connect_timeout(run_cli, write_config, tcp_listener):
    """A listener whose accept queue is full drops the SYN: the connect times out within --connect-timeout."""
    port = tcp_listener(backlog=0)
    fillers = []
    try:
        for _ in range(4):  # more than a backlog of 0 holds
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        config = write_config([("127.0.0.1", port)])
        result = run_cli("--check", "--connect-timeout", "0.5", "47000", "127.0.0.1", str(port), "--config", config,
                         env=check_env())
    finally:
        for filler in fillers:
            filler.close()
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == f"FAIL vsock port 47000 -> 127.0.0.1:{port}: cannot connect to 127.0.0.1:{port}: " \
                            "timed out\n"


@pytest.mark.parametrize("kind", ["not-allowed", "bad-port", "nothing-to-serve", "port-twice"])
def test_check_refuses_what_start_up_refuses_in_the_same_words(run_cli, write_config, tcp_listener, kind):
    port = tcp_listener()
    config = {
        "not-allowed": write_config([("127.0.0.1", port)]),
        "bad-port": write_config(f"allowlist:\n- {{address: 127.0.0.1, port: '{port}'}}\n"),
        "nothing-to-serve": write_config("allowlist: []\n"),
        "port-twice": services_file(write_config, [("127.0.0.1", port)], [(47000, "127.0.0.1", port)]),
    }[kind]
    args = ["--config", config] if kind == "nothing-to-serve" else \
        ["47000", "127.0.0.2" if kind == "not-allowed" else "127.0.0.1", str(port), "--config", config]
    start_up = assert_one_line_error(run_cli(*args, env=check_env()), 1)  # refused before anything listens
    result = run_cli("--check", *args, env=check_env())
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == "FAIL " + start_up[len("vsock-proxy: error: "):] + "\n"


@pytest.mark.parametrize("args, needle", [
    (["--check", "47000"], "REMOTE_ADDR"),
    (["--check", "47000", "127.0.0.1", "--bogus", "9"], "unrecognized arguments: --bogus (see"),
])
def test_check_usage_errors_exit_2(run_cli, args, needle):
    assert_one_line_error(run_cli(*args, env=check_env()), 2, needle)


def bind_some_vsock_port(sock: socket.socket) -> int:
    """Bind (never connect) ``sock`` to a random free high vsock port; returns it."""
    for _ in range(20):
        port = random.randint(20000, 60000)
        try:
            sock.bind((socket.VMADDR_CID_ANY, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return port
    raise AssertionError("no free vsock port found in 20 tries")


@pytest.mark.skipif(not vsock_available(), reason="no AF_VSOCK on this kernel")
def test_check_runs_beside_the_proxy_it_replaces(run_cli, write_config, tcp_listener):
    """The vsock port is taken (as by upstream's running proxy) and NOTIFY_SOCKET is set: --check binds
    nothing, tells systemd nothing, and passes."""
    port = tcp_listener()
    config = write_config([("127.0.0.1", port)])
    directory = tempfile.mkdtemp(prefix="vsp-", dir="/tmp")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    taken = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        notify.bind(os.path.join(directory, "notify"))
        vsock_port = bind_some_vsock_port(taken)
        result = run_cli("--check", str(vsock_port), "127.0.0.1", str(port), "--config", config,
                         env=check_env(NOTIFY_SOCKET=os.path.join(directory, "notify")))
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.recv(4096)
    finally:
        taken.close()
        notify.close()
        shutil.rmtree(directory)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"ok   vsock port {vsock_port} -> 127.0.0.1:{port} ("), result.stdout


def test_request_routed_services_pass_with_a_line_saying_their_targets_are_checked_per_request(
        run_cli, write_config, tcp_listener):
    port = tcp_listener()
    path = write_config(f"allowlist:\n- {{address: 127.0.0.1, port: {port}}}\nservices:\n"
                        f"- {{listen_port: 8000, address: 127.0.0.1, port: {port}}}\n"
                        "- {listen_port: 8080, mode: http-connect}\n- {listen_port: 8443, mode: sni, port: 443}\n")
    result = run_cli("--check", "--config", path, env=check_env())
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"ok   vsock port 8000 -> 127.0.0.1:{port} (allowed by 127.0.0.1:{port}")
    assert lines[1:] == [
        "ok   vsock port 8080 (http-connect) (each request's target is checked against the allowlist when it comes)",
        "ok   vsock port 8443 (sni, port 443) (each request's target is checked against the allowlist when it comes)"]
