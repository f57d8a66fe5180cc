"""``--processes N``: the real ``vsock-proxy`` command, forking workers, on TCP stand-in listeners.

Each test starts the command the real way (scripts/bench_lib/run_vsockproxy.py hands it TCP
listeners on 127.0.0.1) in a subprocess, and finds its workers as its children in /proc.
Targets are threads and clients blocking sockets.  Nothing here connects an AF_VSOCK socket.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

import pytest

from tests.helpers import (STAND_IN_RUNNER, LoggedProcess, ThreadedTarget, assert_one_line_error, children_of,
                           cli_env, echo, fetch_pattern, recv_exactly, scrape, streaming, unused_tcp_port,
                           wait_until)
from tests.test_faults import socket_fd_count
from vsockproxy.cli import parse_arguments
from vsockproxy.workers import share

pytestmark = pytest.mark.timeout(90)

START_TIMEOUT = 30.0
#: A log line: a timestamp, a level, a message; anything else is two records run together, or worse.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S")


class Parent(LoggedProcess):
    """``vsock-proxy ARGS`` on stand-in listeners; its workers are its children."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, ports: dict[int, int] | None = None):
        mapping = ",".join(f"{vsock}={tcp}" for vsock, tcp in (ports or {}).items())
        super().__init__([sys.executable, str(STAND_IN_RUNNER), "--stand-in", *args],
                         cli_env(STAND_IN_PORTS=mapping, **(env or {})))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def address(self, vsock_port: int, count: int = 1) -> tuple[str, int]:
        line = self.wait_for(f"stand-in listener: vsock port {vsock_port} is tcp", START_TIMEOUT, count)
        host, _, port = line.rpartition(" ")[2].rpartition(":")
        return host, int(port)

    def wait_ready(self, count: int = 1) -> None:
        self.wait_for("worker processes accept on every listener", START_TIMEOUT, count)

    def workers(self) -> set[int]:
        return children_of(self.pid)

    def wait_workers(self, count: int, timeout: float = 10) -> set[int]:
        return wait_until(lambda: (lambda pids: pids if len(pids) == count else None)(self.workers()),
                          timeout, f"{count} workers")


@pytest.fixture
def parent():
    started: list[Parent] = []

    def start(args: list[str], **kwargs) -> Parent:
        started.append(Parent(args, **kwargs))
        return started[-1]

    yield start
    for process in started:
        workers = process.workers() if process.proc.poll() is None else set()
        process.kill()
        for pid in workers:  # orphans only if the parent failed to end them: never left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def echo_target():
    target = ThreadedTarget(echo)
    yield target
    target.stop()


@pytest.fixture
def stream_target():
    target = ThreadedTarget(streaming())
    yield target
    target.stop()


def config_file(tmp_path, target_port: int, services: dict[int, int] | None = None, name: str = "proxy.yaml"):
    """An allowlist of 127.0.0.1:target_port and a service for each vsock port (``{port: num_workers}``)."""
    lines = ["allowlist:", f"- {{address: 127.0.0.1, port: {target_port}}}"]
    if services:
        lines.append("services:")
        lines += [f"- {{listen_port: {port}, address: 127.0.0.1, port: {target_port}, num_workers: {workers}}}"
                  for port, workers in services.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def echo_once(address, payload: bytes = b"ping", timeout: float = 10) -> bytes:
    with socket.create_connection(address, timeout=timeout) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: client.recv(65536), b""))


def open_echo(address, timeout: float = 10) -> socket.socket:
    """A connection through the proxy that has echoed once: a worker serves it now."""
    client = socket.create_connection(address, timeout=timeout)
    client.sendall(b"hello")
    assert recv_exactly(client, 5) == b"hello"
    return client


def refused(address) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return True
    return False


def connections_of(pid: int, baseline: int) -> int:
    """Connections a worker relays: two sockets each beyond its ``baseline`` (listeners, control socket)."""
    return (socket_fd_count(pid) - baseline) // 2


def assert_clean_log(proxy: Parent) -> None:
    lines = proxy.drain()
    assert all(LOG_LINE.match(line) for line in lines), [line for line in lines if not LOG_LINE.match(line)]
    assert not [line for line in lines if "Traceback" in line or " ERROR " in line]


# --------------------------------------------------------------------------- options

def test_share_splits_evenly_spreads_the_remainder_and_gives_each_at_least_one():
    assert [share(7, 3, index) for index in range(3)] == [3, 2, 2]
    assert [share(8, 2, index) for index in range(2)] == [4, 4]
    assert [share(1, 3, index) for index in range(3)] == [1, 1, 1]


def test_auto_is_the_number_of_cpus_this_process_may_use_and_every_source_may_set_it(monkeypatch, tmp_path):
    assert parse_arguments(["1", "a", "2"]).processes == len(os.sched_getaffinity(0))
    assert parse_arguments(["1", "a", "2", "--processes", "AUTO"]).processes == len(os.sched_getaffinity(0))
    assert parse_arguments(["1", "a", "2", "--processes", "3"]).processes == 3
    settings = tmp_path / "settings.conf"
    settings.write_text("processes = 4\n")
    assert parse_arguments(["1", "a", "2", "--settings", str(settings)]).processes == 4
    monkeypatch.setenv("VSOCK_PROXY_PROCESSES", "5")
    assert parse_arguments(["1", "a", "2", "--settings", str(settings)]).processes == 5


@pytest.mark.parametrize("args, env, needle", [
    (["--processes", "0"], {}, "processes must be from 1 to 1024, got 0 (or auto)"),
    (["--processes", "1025"], {}, "processes must be from 1 to 1024, got 1025 (or auto)"),
    (["--processes", "many"], {}, "processes must be a whole number, got 'many' (or auto)"),
    ([], {"VSOCK_PROXY_PROCESSES": "-1"}, "processes must be from 1 to 1024, got -1 (or auto)"),
])
def test_bad_process_counts_are_one_line_usage_errors(run_cli, args, env, needle):
    result = run_cli("5005", "127.0.0.1", "9", *args, env=cli_env(**env))
    assert_one_line_error(result, 2, needle)


def test_processes_1_is_the_single_process(parent, echo_target, tmp_path):
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "1", "5005", "127.0.0.1", str(echo_target.port), "--config", str(config)])
    address = proxy.address(5005)
    proxy.wait_for("listening on vsock port 5005")
    assert echo_once(address) == b"ping"
    assert proxy.workers() == set()
    proxy.signal(signal.SIGTERM)
    assert proxy.finish() == 0
    assert not [line for line in proxy.lines if "worker" in line and "process" in line]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="auto is one process on one CPU")
def test_the_default_forks_one_worker_per_cpu(parent, echo_target, tmp_path):
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["5005", "127.0.0.1", str(echo_target.port), "--config", str(config)])
    proxy.wait_ready()
    assert len(proxy.workers()) == len(os.sched_getaffinity(0))
    assert echo_once(proxy.address(5005)) == b"ping"


# --------------------------------------------------------------------------- serving

def test_workers_share_num_workers_and_bound_it_together(parent, echo_target, tmp_path):
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "3", "-w", "7", "5005", "127.0.0.1", str(echo_target.port),
                    "--config", str(config)])
    address = proxy.address(5005)
    proxy.wait_ready()
    assert "5005, forwarding to 127.0.0.1" in proxy.wait_for("listening on vsock port")
    assert proxy.wait_for("listening on vsock port").endswith("7 worker(s)")
    workers = proxy.wait_workers(3)
    baselines = {pid: socket_fd_count(pid) for pid in workers}
    held = [open_echo(address) for _ in range(7)]  # all seven served at once...
    try:
        late = socket.create_connection(address, timeout=10)
        late.sendall(b"late")
        late.settimeout(1)
        with pytest.raises(socket.timeout):  # ...and not an eighth, whichever worker it went to
            late.recv(4)
        assert sorted(connections_of(pid, baselines[pid]) for pid in workers) == [2, 2, 3]
        held.pop().close()
        late.settimeout(10)
        assert recv_exactly(late, 4) == b"late"
        late.close()
    finally:
        for client in held:
            client.close()
    proxy.signal(signal.SIGTERM)
    assert proxy.finish() == 0
    assert_clean_log(proxy)


def test_a_worker_killed_under_load_is_replaced_within_a_second_and_the_others_connections_are_intact(
        parent, stream_target, tmp_path):
    config = config_file(tmp_path, stream_target.port)
    proxy = parent(["--processes", "2", "-w", "8", "5005", "127.0.0.1", str(stream_target.port),
                    "--config", str(config)])
    address = proxy.address(5005)
    proxy.wait_ready()
    workers = proxy.wait_workers(2)
    baselines = {pid: socket_fd_count(pid) for pid in workers}
    size = 8 << 20  # 128 chunks with a pause after each: about two seconds per connection
    outcomes: dict[int, str] = {}

    def client(seed: int) -> None:
        with socket.create_connection(address, timeout=30) as sock:
            outcomes[seed] = fetch_pattern(sock, seed, size)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(stream_target.peers) == 8, 10, "8 connections at the target")
        per_worker = {pid: connections_of(pid, baselines[pid]) for pid in workers}
        assert sorted(per_worker.values()) == [4, 4], per_worker  # -w 8 is 4 each
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replaced = wait_until(lambda: proxy.workers() - workers, 5, "a new worker")
        assert time.monotonic() - killed_at < 1.0
    finally:
        for thread in threads:
            thread.join(timeout=30)
    assert sorted(outcomes.values()) == ["cut"] * 4 + ["intact"] * 4, outcomes
    proxy.wait_for(f"worker PID {victim} exited (signal 9); starting a new one")
    assert proxy.workers() == (workers - {victim}) | replaced
    with socket.create_connection(address, timeout=30) as sock:  # the new worker serves too
        assert fetch_pattern(sock, 99, 1 << 16) == "intact"
    proxy.signal(signal.SIGTERM)
    assert proxy.finish() == 0
    assert_clean_log(proxy)


def test_a_worker_that_keeps_dying_young_is_replaced_ever_more_slowly(parent, echo_target, tmp_path):
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "2", "5005", "127.0.0.1", str(echo_target.port), "--config", str(config)])
    proxy.wait_ready()
    workers = proxy.wait_workers(2)
    survivor = max(workers)
    victim = min(workers)
    gaps = []
    for _ in range(4):
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        (victim,) = wait_until(lambda: proxy.workers() - {survivor, victim}, 10, "a new worker")
        gaps.append(time.monotonic() - killed_at)
    assert gaps[0] < 1.0 and 0.5 <= gaps[1] < 1.4 and 1.0 <= gaps[2] < 1.9 and 2.0 <= gaps[3] < 2.9, gaps
    proxy.wait_for("2 time(s) in a row within 5 s of its start; starting a new one in 0.5 s")
    proxy.wait_for("4 time(s) in a row within 5 s of its start; starting a new one in 2 s")
    assert survivor in proxy.workers()
    assert echo_once(proxy.address(5005)) == b"ping"


# --------------------------------------------------------------------------- reload

def test_reload_starts_a_new_generation_and_a_bad_file_or_port_changes_nothing(parent, echo_target, tmp_path):
    config = config_file(tmp_path, echo_target.port, {5005: 4, 5006: 4})
    held_port = socket.create_server(("127.0.0.1", 0))
    try:
        proxy = parent(["--processes", "2", "--config", str(config)],
                       ports={5008: held_port.getsockname()[1]})
        first, second = proxy.address(5005), proxy.address(5006)
        proxy.wait_ready()
        old = proxy.wait_workers(2)
        client = open_echo(first)  # stays open through the reload, in an old worker

        config_file(tmp_path, echo_target.port, {5005: 6, 5007: 4})
        proxy.signal(signal.SIGHUP)
        proxy.wait_for("reload applied: 2 service(s)")
        assert "(1 open connection(s) continue)" not in proxy.wait_for("reload: vsock port 5006 no longer served")
        proxy.wait_for("reload: listening on vsock port 5007, forwarding to 127.0.0.1")
        third = proxy.address(5007)
        assert echo_once(third) == b"ping" and echo_once(first) == b"ping"
        wait_until(lambda: refused(second), 5, "vsock port 5006 to close")
        client.sendall(b"still")
        assert recv_exactly(client, 5) == b"still"
        assert len(proxy.wait_workers(3) & old) == 1  # the old one that holds it
        client.close()
        new = proxy.wait_workers(2)
        assert not new & old

        for bad in ("allowlist: [\n", None):
            if bad is None:  # a port that cannot be bound
                config_file(tmp_path, echo_target.port, {5005: 6, 5007: 4, 5008: 1})
            else:
                config.write_text(bad)
            proxy.signal(signal.SIGHUP)
            proxy.wait_for("reload rejected, keeping the running configuration", count=2 if bad is None else 1)
            assert proxy.workers() == new
            assert echo_once(first) == b"ping" and echo_once(third) == b"ping"
        proxy.signal(signal.SIGTERM)
        assert proxy.finish() == 0
    finally:
        held_port.close()
    assert len([line for line in proxy.lines if "reload applied" in line]) == 1
    assert_clean_log_but_rejections(proxy)


def assert_clean_log_but_rejections(proxy: Parent) -> None:
    lines = [line for line in proxy.drain() if "reload rejected" not in line]
    assert all(LOG_LINE.match(line) for line in lines)
    assert not [line for line in lines if "Traceback" in line or " ERROR " in line]


# --------------------------------------------------------------------------- drain

def test_sigterm_drains_every_worker_within_the_grace_and_exits_0(parent, stream_target, echo_target, tmp_path):
    config = tmp_path / "proxy.yaml"
    config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {stream_target.port}}}\n"
                      f"- {{address: 127.0.0.1, port: {echo_target.port}}}\nservices:\n"
                      f"- {{listen_port: 5006, address: 127.0.0.1, port: {echo_target.port}}}\n")
    proxy = parent(["--processes", "2", "--shutdown-grace", "4", "5005", "127.0.0.1", str(stream_target.port),
                    "--config", str(config)])
    streaming_address, idle_address = proxy.address(5005), proxy.address(5006)
    proxy.wait_ready()
    workers = proxy.wait_workers(2)
    outcome = {}
    sock = socket.create_connection(streaming_address, timeout=30)
    fetching = threading.Thread(target=lambda: outcome.setdefault("stream", fetch_pattern(sock, 7, 8 << 20)))
    fetching.start()
    idle = open_echo(idle_address)
    try:
        wait_until(lambda: stream_target.peers, 10, "the streaming connection")
        proxy.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proxy.finish(timeout=15) == 0
        took = time.monotonic() - signalled
        fetching.join(timeout=10)
        assert outcome == {"stream": "intact"}  # about two seconds of bytes: it finishes within the grace
        assert 4 <= took < 6, took  # the idle one holds the drain up to the grace, no longer
        with pytest.raises(ConnectionResetError):  # ended at the grace's end, as a single process ends it
            idle.recv(10)
    finally:
        sock.close()
        idle.close()
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    proxy.wait_for("stopping: listeners closed, waiting up to 4s for 2 open connection(s)")
    assert_clean_log(proxy)


def test_sigterm_to_every_process_at_once_as_systemctl_stop_sends_it_is_one_clean_drain(parent, echo_target,
                                                                                           tmp_path):
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "2", "5005", "127.0.0.1", str(echo_target.port), "--config", str(config)])
    proxy.wait_ready()
    workers = proxy.wait_workers(2)
    for pid in (*workers, proxy.pid):  # the workers first: the parent must not take their exits for deaths
        os.kill(pid, signal.SIGTERM)
    assert proxy.finish() == 0
    assert not [line for line in proxy.lines if "starting a new one" in line or " WARNING " in line], proxy.lines


def test_workers_drain_and_exit_when_the_parent_dies(parent, echo_target, tmp_path):
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "2", "--shutdown-grace", "1", "5005", "127.0.0.1", str(echo_target.port),
                    "--config", str(config)])
    proxy.wait_ready()
    workers = proxy.wait_workers(2)
    held = open_echo(proxy.address(5005))
    try:
        proxy.proc.kill()
        wait_until(lambda: not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], 5, "the workers to exit")
    finally:
        held.close()
    proxy.finish()
    assert len([line for line in proxy.lines if "the parent process is gone; draining" in line]) == 2


# --------------------------------------------------------------------------- figures and readiness

def test_metrics_and_the_summary_are_totals_that_survive_a_worker_s_death(parent, echo_target, tmp_path):
    metrics_address = ("127.0.0.1", unused_tcp_port())
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "2", "-w", "4", "--metrics-address", "%s:%d" % metrics_address,
                    "5005", "127.0.0.1", str(echo_target.port), "--config", str(config)])
    address = proxy.address(5005)
    proxy.wait_ready()
    workers = proxy.wait_workers(2)
    held = [open_echo(address) for _ in range(4)]  # -w 4 is 2 each: both workers have served some
    for client in held:
        client.close()
    for _ in range(6):
        assert echo_once(address, b"x" * 1000) == b"x" * 1000

    def figures() -> tuple:
        samples = scrape(metrics_address)
        return tuple(samples.get(f'vsockproxy_{name}{{{labels}service="5005"}}') for name, labels in [
            ("connections_accepted_total", ""), ("connections_completed_total", ""),
            ("bytes_total", 'direction="enclave_to_target",'), ("bytes_total", 'direction="target_to_enclave",'),
            ("active_connections", "")])

    expected = (10.0, 10.0, 6020.0, 6020.0, 0.0)
    wait_until(lambda: figures() == expected, 10, f"the totals {expected}, not {figures()}")
    os.kill(min(workers), signal.SIGKILL)
    proxy.wait_workers(2)
    assert figures() == expected  # the dead worker's counters stay in the totals
    held = open_echo(address)
    assert figures() == (11.0, 10.0, 6025.0, 6025.0, 1.0)
    held.close()
    wait_until(lambda: figures()[1] == 11.0, 10, "the eleventh to complete")

    proxy.signal(signal.SIGUSR1)
    summary = proxy.wait_for("summary: ")
    assert summary.endswith(f"summary: port 5005->127.0.0.1:{echo_target.port}: "
                            "active=0 accepted=11 completed=11 failed=0 up=6025 down=6025"), summary
    time.sleep(0.5)
    assert len([line for line in proxy.drain() if "summary: " in line]) == 1


def connect_through(address, host: str, port: int) -> tuple[socket.socket, bytes]:
    """A connection that has asked an http-connect service for host:port, and the status line it got."""
    client = socket.create_connection(address, timeout=10)
    client.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(1)
        assert chunk, head
        head += chunk
    return client, head.split(b"\r\n")[0]


def test_request_routed_services_run_in_the_workers_and_their_requests_are_totalled(parent, echo_target, tmp_path):
    metrics_address = ("127.0.0.1", unused_tcp_port())
    config = tmp_path / "proxy.yaml"
    config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {echo_target.port}}}\n"
                      "services:\n- {listen_port: 5005, mode: http-connect}\n")
    proxy = parent(["--processes", "2", "-w", "2", "--metrics-address", "%s:%d" % metrics_address,
                    "--config", str(config)])
    address = proxy.address(5005)
    proxy.wait_ready()
    held = []
    for _ in range(2):  # -w 2 is one each: both workers relay one
        client, status = connect_through(address, "127.0.0.1", echo_target.port)
        assert status == b"HTTP/1.1 200 Connection established"
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
        held.append(client)
    for client in held:
        client.close()
    client, status = connect_through(address, "127.0.0.2", echo_target.port)
    client.close()
    assert status.startswith(b"HTTP/1.1 403 ")
    label = 'vsockproxy_requests_total{allowed_by="%s",mode="http-connect",outcome="%s",service="5005"}'
    wait_until(lambda: (lambda samples: samples.get(label % (f"127.0.0.1:{echo_target.port}", "connected")) == 2.0
                        and samples.get(label % ("", "not-allowed")) == 1.0)(scrape(metrics_address)),
               10, "the requests of both workers in the totals")


@pytest.fixture
def notify_socket():
    directory = tempfile.mkdtemp(prefix="vsp-", dir="/tmp")  # short: sun_path is 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(directory, "notify"))
    sock.settimeout(20)
    yield sock
    sock.close()
    shutil.rmtree(directory)


def test_ready_when_every_worker_accepts_and_status_counts_every_worker_s_connections(parent, echo_target,
                                                                                      tmp_path, notify_socket):
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "2", "-w", "2", "5005", "127.0.0.1", str(echo_target.port), "--config",
                    str(config)], env={"NOTIFY_SOCKET": notify_socket.getsockname()})

    def next_message() -> str:
        return notify_socket.recv(4096).decode()

    assert next_message() == "READY=1\nSTATUS=1 service(s), 0 active connection(s)"
    assert "worker processes accept on every listener" in proxy.wait_for("worker processes", timeout=1)
    assert len(proxy.workers()) == 2
    address = proxy.address(5005)
    held = [open_echo(address) for _ in range(2)]  # one in each worker: -w 2 is one each
    try:
        message = next_message()  # every STATUS_INTERVAL
        while message != "STATUS=1 service(s), 2 active connection(s)":
            assert message.startswith("STATUS=1 service(s), "), message
            message = next_message()
        proxy.signal(signal.SIGHUP)
        assert next_message().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert next_message() == "READY=1\nSTATUS=1 service(s), 2 active connection(s)"
        proxy.wait_for("reload applied")
    finally:
        for client in held:
            client.close()
    proxy.wait_for("closed enclave=", count=2)
    proxy.signal(signal.SIGTERM)
    message = next_message()
    while message.startswith("STATUS="):
        message = next_message()
    assert message == "STOPPING=1\nSTATUS=draining 0 connection(s)"
    assert proxy.finish() == 0


# --------------------------------------------------------------------------- a storm of SIGHUPs

def process_tree(pid: int) -> dict[int, int]:
    """Every process below ``pid`` (its children, theirs, and so on), each with its parent, from one /proc scan."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rpartition(")")[2].split()[1])
            except OSError:  # gone meanwhile
                continue
    tree: dict[int, int] = {}
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier and child not in tree}
        tree.update((child, parents[child]) for child in frontier)
    return tree


class StormWatch:
    """Samples the process tree below ``pid`` until it settles: the same two workers, and nothing else, for
    ``quiet`` seconds.  Any grandchild seen on the way is kept."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.grandchildren: set[int] = set()

    def sample(self) -> dict[int, int]:
        tree = process_tree(self.pid)
        self.grandchildren |= {child for child, parent in tree.items() if parent != self.pid}
        return tree

    def settle(self, timeout: float, quiet: float = 2.0) -> float:
        """Seconds until the tree was two workers that then stayed; fails after ``timeout``."""
        began = time.monotonic()
        steady, since = None, began
        while time.monotonic() - began < timeout:
            workers = set(self.sample())
            if len(workers) != 2 or workers != steady:
                steady, since = (workers if len(workers) == 2 else None), time.monotonic()
            elif time.monotonic() - since >= quiet:
                return since - began
            time.sleep(0.05)
        raise AssertionError(f"the process tree did not settle to 2 workers within {timeout}s: {process_tree(self.pid)}")


class EchoLoad:
    """Clients that echo through the proxy over and over, each byte checked, until stopped."""

    def __init__(self, address: tuple[str, int], clients: int = 4) -> None:
        self.address = address
        self.rounds = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(seed,)) for seed in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, seed: int) -> None:
        payload = bytes((seed + i) % 251 for i in range(4096))
        while not self._stop.is_set():
            try:
                got = echo_once(self.address, payload)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if got != payload:
                self.failures.append(f"{len(got)} byte(s) back, not the {len(payload)} sent")
            self.rounds += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_a_storm_of_sighups_under_load_never_makes_a_worker_act_as_the_parent(parent, echo_target, tmp_path):
    """30 SIGHUPs in 3 s with echo load and scrapes: generation after generation, and no worker forks.

    Fails on the original code: a new worker that wakes a sibling's watcher (pending at the fork)
    runs the parent's reap and fork: the same exit logged again and again ("status unknown": not
    its child), grandchildren, "internal error" lines, backoffs of many seconds.
    """
    metrics_address = ("127.0.0.1", unused_tcp_port())
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "2", "--metrics-address", "%s:%d" % metrics_address,
                    "5005", "127.0.0.1", str(echo_target.port), "--config", str(config)])
    address = proxy.address(5005)
    proxy.wait_ready()
    proxy.wait_workers(2)
    load = EchoLoad(address)
    scrapes: list[str] = []
    scraping = threading.Event()

    def scrape_repeatedly() -> None:
        while not scraping.is_set():
            try:
                scrape(metrics_address, timeout=10)
            except (OSError, AssertionError) as exc:
                scrapes.append(repr(exc))
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape_repeatedly)
    scraper.start()
    watch = StormWatch(proxy.pid)
    try:
        for _ in range(30):
            proxy.signal(signal.SIGHUP)
            watch.sample()
            time.sleep(0.1)
        assert watch.settle(timeout=10) < 5  # no generations queued behind, no respawns
        assert not watch.grandchildren
    finally:
        load.stop()
        scraping.set()
        scraper.join(timeout=30)
    assert load.rounds > 0 and not load.failures, load.failures[:5]
    assert not scrapes, scrapes[:5]
    assert echo_once(address) == b"ping"
    proxy.signal(signal.SIGTERM)
    assert proxy.finish(timeout=30) == 0
    exits = [re.search(r"worker PID (\d+) exited", line).group(1) for line in proxy.lines if " exited (" in line]
    assert len(exits) == len(set(exits)), [line for line in proxy.lines if " exited (" in line]
    assert not [line for line in proxy.lines if "starting a new one" in line or "internal error" in line]
    assert_clean_log(proxy)


def test_sighups_that_come_while_a_reload_is_pending_or_running_fold_into_one_more(parent, echo_target, tmp_path):
    """30 SIGHUPs at once are one reload and one more at most, not 30 generations one after another.

    Fails on the original code: every SIGHUP queues a reload of its own.
    """
    config = config_file(tmp_path, echo_target.port)
    proxy = parent(["--processes", "2", "5005", "127.0.0.1", str(echo_target.port), "--config", str(config)])
    address = proxy.address(5005)
    proxy.wait_ready()
    proxy.wait_workers(2)
    for _ in range(30):
        proxy.signal(signal.SIGHUP)
    proxy.wait_for("reload applied")
    StormWatch(proxy.pid).settle(timeout=10)  # a reload queued behind would start within its quiet time
    assert echo_once(address) == b"ping"
    proxy.signal(signal.SIGTERM)
    assert proxy.finish(timeout=30) == 0
    assert 1 <= len([line for line in proxy.lines if "reload applied" in line]) <= 2, proxy.lines
    assert_clean_log(proxy)
