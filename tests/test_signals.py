"""Signals at awkward moments: SIGHUP/SIGUSR1 during start-up, SIGHUP during the SIGTERM drain.

Two kinds of test:

* in a subprocess: the real ``vsock-proxy`` start-up (vsockproxy.__main__.main, which the console
  script and ``python -m vsockproxy`` call) handed TCP listeners on 127.0.0.1 by
  scripts/bench_lib/run_vsockproxy.py; its targets are threads and its clients blocking sockets;
* in this process: a ``Supervisor`` serving on TCP stand-in listeners with a fake DNS that
  can hold a look-up, so that a signal can land while a reload or the start-up waits on DNS.
  The signals are real ones, sent to this process, and handled by the supervisor's gevent handlers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

import gevent
import gevent.socket
import pytest
from gevent.event import Event

import vsockproxy.supervisor as supervisor_module
from tests.helpers import (REPO, STAND_IN_RUNNER, FakeDNS, LoggedProcess, TcpListeners, ThreadedTarget, cli_env, echo,
                           supervisor_for, unused_tcp_port, wait_until)
from vsockproxy.resolver import Resolver

pytestmark = pytest.mark.timeout(90)

START_TIMEOUT = 30.0

# =========================================================================== the stand-in subprocess

def console_script_target() -> str:
    """What the installed ``vsock-proxy`` script calls, e.g. ``vsockproxy.__main__:main``."""
    (entry,) = [entry for entry in distribution("vsockproxy").entry_points
                if entry.group == "console_scripts" and entry.name == "vsock-proxy"]
    return entry.value


class StandIn(LoggedProcess):
    """``vsock-proxy ARGS`` started the real way, on TCP stand-in listeners (see STAND_IN_RUNNER)."""

    def __init__(self, args: list[str], ports: dict[int, int] | None = None) -> None:
        mapping = ",".join(f"{vsock}={tcp}" for vsock, tcp in (ports or {}).items())
        super().__init__([sys.executable, str(STAND_IN_RUNNER), "--stand-in", *args],
                         cli_env(STAND_IN_PORTS=mapping))

    def address(self, vsock_port: int) -> tuple[str, int]:
        line = self.wait_for(f"stand-in listener: vsock port {vsock_port} is tcp", timeout=START_TIMEOUT)
        host, _, port = line.rpartition(" ")[2].rpartition(":")
        return host, int(port)

    def logged(self, needle: str) -> list[str]:
        return [line for line in self.drain() if needle in line]


@pytest.fixture
def stand_in():
    """``stand_in(args, ports=...)`` starts a StandIn; each one still running at teardown is killed."""
    started: list[StandIn] = []

    def start(args: list[str], **kwargs) -> StandIn:
        started.append(StandIn(args, **kwargs))
        return started[-1]

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def echo_target():
    """A TCP echo server, one thread per connection (this process only blocks)."""
    target = ThreadedTarget(echo)
    yield target
    target.stop()


def echo_through(address: tuple[str, int], payload: bytes = b"ping") -> bytes:
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: client.recv(65536), b""))


def services_yaml(target_port: int, services: dict[int, str]) -> str:
    """An allowlist of 127.0.0.1:target_port and one service per ``{listen_port: address}``."""
    lines = ["allowlist:", f"- {{address: 127.0.0.1, port: {target_port}}}", "services:"]
    lines += [f"- {{listen_port: {port}, address: {address}, port: {target_port}}}"
              for port, address in services.items()]
    return "\n".join(lines) + "\n"


def ignores(pid: int, signum: int) -> bool:
    """Whether ``signum``'s disposition in process ``pid`` is SIG_IGN (from /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16) & (1 << (signum - 1)))


def runs_python_code(pid: int) -> bool:
    """Past the interpreter's own start, which no Python code can shorten: it ignores SIGHUP, or imports gevent."""
    return ignores(pid, signal.SIGHUP) or "/gevent/" in Path(f"/proc/{pid}/maps").read_text()


# =========================================================================== SIGHUP/SIGUSR1 during start-up

def test_the_console_script_and_python_m_start_where_signals_are_ignored_first():
    assert console_script_target() == "vsockproxy.__main__:main"
    assert "sys.exit(main())" in (REPO / "vsockproxy" / "__main__.py").read_text()


def test_sighup_and_sigusr1_throughout_start_up_never_kill_it(stand_in, echo_target, tmp_path):
    """A reload or a summary asked for while it starts must not kill it (their default action).

    The signals go out every few milliseconds from the moment the process runs Python code until it
    says it is listening.  Fails when they are not ignored from the entry point on: the first one
    that lands during the imports (0.2 s natively) kills it with -1 or -10.
    """
    config = tmp_path / "allowlist.yaml"
    config.write_text(services_yaml(echo_target.port, {5005: "127.0.0.1"}))
    proxy = stand_in(["--config", str(config)])
    pid = proxy.proc.pid
    wait_until_true(lambda: proxy.proc.poll() is not None or runs_python_code(pid), "Python code to run")
    sent = 0
    deadline = time.monotonic() + START_TIMEOUT
    while not proxy.logged("listening on vsock port 5005"):
        assert proxy.proc.poll() is None, \
            f"killed during start-up after {sent} SIGHUP+SIGUSR1 pairs: exit {proxy.proc.returncode}; {proxy.text()}"
        assert time.monotonic() < deadline, f"not listening after {START_TIMEOUT}s: {proxy.text()}"
        proxy.signal(signal.SIGHUP)
        proxy.signal(signal.SIGUSR1)
        sent += 1
        time.sleep(0.003)
    assert sent >= 3, f"start-up was too quick to test: {sent} pairs sent"
    assert echo_through(proxy.address(5005)) == b"ping"
    proxy.signal(signal.SIGTERM)
    assert proxy.finish(timeout=30) == 0, proxy.text()
    assert "Traceback" not in proxy.text()
    assert proxy.logged("stopped")


def wait_until_true(predicate, what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll ``predicate`` every millisecond (blocking: nothing in this process needs the hub)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.001)


# =========================================================================== SIGHUP during the drain

def test_sighup_during_the_drain_is_refused_and_opens_no_listener(stand_in, echo_target, tmp_path):
    """After SIGTERM nothing new may open: a reload then is refused in one line, the drain carries on.

    Fails on the original code: the reload binds the service added to the file after the drain
    took its list of servers ("reload: listening on vsock port 5006" after "stopping"), so a
    connection to it is accepted, reaches the target, and is cut at exit with no log line.
    """
    config = tmp_path / "allowlist.yaml"
    config.write_text(services_yaml(echo_target.port, {5005: "127.0.0.1"}))
    added_port = unused_tcp_port()
    proxy = stand_in(["--config", str(config), "--shutdown-grace", "60"], ports={5006: added_port})
    proxy.wait_for("listening on vsock port 5005", timeout=START_TIMEOUT)
    with socket.create_connection(proxy.address(5005), timeout=10) as held:
        held.sendall(b"before")
        assert held.recv(100) == b"before"
        config.write_text(services_yaml(echo_target.port, {5005: "127.0.0.1", 5006: "127.0.0.1"}))
        proxy.signal(signal.SIGTERM)
        proxy.wait_for("stopping", timeout=10)
        proxy.signal(signal.SIGHUP)
        refusal = proxy.wait_for("reload refused", timeout=10)
        assert "shutting down" in refusal, refusal
        time.sleep(0.5)  # a reload that (wrongly) went ahead has bound and logged by now
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", added_port), timeout=10).close()
        held.sendall(b"after")
        assert held.recv(100) == b"after"
    assert proxy.finish(timeout=30) == 0, proxy.text()
    assert not proxy.logged("vsock port 5006"), proxy.text()
    assert len(proxy.logged("reload refused")) == 1, proxy.text()
    assert proxy.logged("stopped")
    closed = proxy.logged("closed enclave=")
    assert len(closed) == 1 and "end=eof" in closed[0], proxy.text()


# =========================================================================== in this process

class HeldDNS(FakeDNS):
    """A FakeDNS whose look-ups of the ``held`` name wait until ``release`` is set; ``waited`` counts them."""

    def __init__(self, records: dict[str, list[str]], held: str) -> None:
        super().__init__(records)
        self.held = held
        self.release = Event()
        self.waited = 0

    def __call__(self, host, port, *args, **kwargs):
        if host == self.held and not self.release.is_set():
            self.waited += 1
            self.release.wait()
        return super().__call__(host, port, *args, **kwargs)


class InProcess:
    """A Supervisor of this process on TCP stand-in listeners, with every resolver using ``dns``."""

    def __init__(self, monkeypatch, caplog, config: Path, dns: FakeDNS) -> None:
        self.caplog = caplog

        def resolver(family=socket.AF_UNSPEC, ttl=30.0, **kwargs) -> Resolver:
            return Resolver(family, ttl, getaddrinfo=dns, **kwargs)

        monkeypatch.setattr(supervisor_module, "Resolver", resolver)
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        listeners = TcpListeners()
        self.addresses, self.listeners = listeners.addresses, listeners.sockets
        self.supervisor = supervisor_for(["--config", str(config), "--shutdown-grace", "5"], listeners)
        self.serving = gevent.spawn(self.supervisor.serve)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.caplog.records if record.name == "vsockproxy"]

    def logged(self, needle: str) -> list[str]:
        return [message for message in self.messages() if needle in message]

    def wait_logged(self, needle: str, timeout: float = 10) -> str:
        return wait_until(lambda: self.logged(needle), timeout, f"{needle!r} in the log")[0]

    def stop(self) -> None:
        """SIGTERM, then wait for serve() to return (never signals once serve()'s handlers are gone)."""
        assert not self.serving.dead, "serve() ended before SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)
        self.join()

    def join(self) -> None:
        self.serving.join(timeout=15)
        assert self.serving.dead, "serve() still running 15 s after SIGTERM"
        self.serving.get()  # re-raises what serve() raised

    def refuses(self, vsock_port: int) -> bool:
        """Whether the stand-in listener of ``vsock_port`` refuses connections (it was closed)."""
        try:
            gevent.socket.create_connection(self.addresses[vsock_port], timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False


@pytest.fixture
def in_process(monkeypatch, caplog, request):
    """``in_process(config, dns)`` runs a Supervisor here; signal dispositions are restored afterwards."""
    caplog.set_level("INFO", logger="vsockproxy")
    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1]
    saved = {signum: signal.getsignal(signum) for signum in handled}
    started: list[InProcess] = []

    def start(config: Path, dns: FakeDNS) -> InProcess:
        started.append(InProcess(monkeypatch, caplog, config, dns))
        return started[-1]

    yield start
    for run in started:
        run.serving.kill(timeout=5)
        for listener in run.listeners.values():
            listener.close()
    for signum, handler in saved.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def reload_held_on_dns(in_process, tmp_path):
    """A running in-process proxy whose SIGHUP reload now waits on the DNS look-up of a new service's name."""
    target_port = unused_tcp_port()
    config = tmp_path / "allowlist.yaml"
    config.write_text(services_yaml(target_port, {5005: "127.0.0.1"}))
    dns = HeldDNS({"slow.example": ["127.0.0.1"]}, held="slow.example")
    run = in_process(config, dns)
    run.wait_logged("listening on vsock port 5005")
    config.write_text(services_yaml(target_port, {5005: "127.0.0.1", 5006: "slow.example"}))
    os.kill(os.getpid(), signal.SIGHUP)
    wait_until(lambda: dns.waited, 10, "the reload's look-up of slow.example")
    return run, dns


def test_a_reload_waiting_on_dns_when_sigterm_arrives_commits_nothing(in_process, tmp_path):
    """A reload that yields in a DNS look-up and resumes during the drain must not open its listeners.

    Fails on the original code: the reload commits after the drain took its list of servers,
    "reload: listening on vsock port 5006" is logged, and that listener outlives serve().
    """
    run, dns = reload_held_on_dns(in_process, tmp_path)
    os.kill(os.getpid(), signal.SIGTERM)
    run.wait_logged("stopping")
    dns.release.set()
    run.join()
    wait_until(lambda: run.logged("reload refused") or run.logged("reload applied"), 10, "the reload's outcome")
    assert run.logged("reload refused: shutting down"), run.messages()
    assert not run.logged("reload: listening"), run.messages()
    assert 5006 not in run.supervisor.servers
    assert all(run.refuses(port) for port in run.addresses), f"a listener outlived serve(): {run.addresses}"


def test_sighup_while_starting_reloads_once_started(in_process, tmp_path):
    """The file may change after start-up read it: a SIGHUP then must be applied once serving, not dropped.

    Start-up waits on DNS after reading the file; the file changes and SIGHUP arrives meanwhile.
    Fails on the original code: it logs "SIGHUP ignored: still starting" and never serves port 5006.
    """
    target_port = unused_tcp_port()
    config = tmp_path / "allowlist.yaml"
    config.write_text(services_yaml(target_port, {5005: "slow.example"}))
    dns = HeldDNS({"slow.example": ["127.0.0.1"]}, held="slow.example")
    run = in_process(config, dns)
    wait_until(lambda: dns.waited, 10, "start-up's look-up of slow.example")
    config.write_text(services_yaml(target_port, {5005: "slow.example", 5006: "127.0.0.1"}))
    logged_before = len(run.messages())
    os.kill(os.getpid(), signal.SIGHUP)
    wait_until(lambda: len(run.messages()) > logged_before, 10, "the SIGHUP handler's log line")
    dns.release.set()
    run.wait_logged("listening on vsock port 5005")
    wait_until(lambda: 5006 in run.supervisor.servers, 10, f"port 5006 served; log: {run.messages()}")
    run.stop()
    assert run.logged("reload: listening on vsock port 5006"), run.messages()


def test_serve_leaves_signal_dispositions_as_it_found_them(in_process, tmp_path):
    """The entry point ignores SIGHUP and SIGUSR1; after serve() they must be ignored again, not fatal.

    gevent's handlers, when cancelled, reset the OS disposition to SIG_DFL, so a reload sent
    while the process exits would kill it.  Fails on the original code for that reason.
    """
    config = tmp_path / "allowlist.yaml"
    config.write_text(services_yaml(unused_tcp_port(), {5005: "127.0.0.1"}))
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    run = in_process(config, FakeDNS())
    run.wait_logged("listening on vsock port 5005")
    assert not ignores(os.getpid(), signal.SIGHUP), "gevent's handler should be in place while serving"
    run.stop()
    assert ignores(os.getpid(), signal.SIGHUP) and ignores(os.getpid(), signal.SIGUSR1)


def test_sighups_while_a_reload_waits_fold_into_one_more_reload(in_process, tmp_path):
    """SIGHUPs that come while a reload is under way are one more reload, not one each.

    The first reload waits on DNS while 30 more SIGHUPs come.  Fails on the original code:
    each SIGHUP queues a reload of its own, and 31 are applied one after another.
    """
    run, dns = reload_held_on_dns(in_process, tmp_path)
    for _ in range(30):
        os.kill(os.getpid(), signal.SIGHUP)
        gevent.sleep(0.01)  # each one handled before the next: the kernel folds only signals not yet handled
    dns.release.set()
    wait_until(lambda: len(run.logged("reload applied")) >= 2, 10, "the reload and one more")
    gevent.sleep(1)  # a third reload, wrongly queued, would be applied by now
    run.stop()
    assert len(run.logged("reload applied")) == 2, run.messages()
    assert len(run.logged("reload: listening on vsock port 5006")) == 1, run.messages()
