"""Shared fixtures for the host-side suite.

Nothing here ever connect()s an AF_VSOCK socket: the data-path tests inject a
TCP or Unix listener into ``VsockProxyServer(listener=...)`` and talk to real
TCP targets on 127.0.0.1.  Every server, socket and subprocess a fixture starts
is stopped, closed or killed (by its own handle) in the fixture's teardown.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

import vsockproxy.allowlist as _allowlist  # noqa: E402
import vsockproxy.server as _server  # noqa: E402
from vsockproxy.resolver import Resolver  # noqa: E402
from vsockproxy.server import VsockProxyServer  # noqa: E402


# --------------------------------------------------------------------------- product API shortcuts

def load_allowlist(path: str):
    """The Allowlist read from the YAML file at ``path`` (raises ConfigError)."""
    return _allowlist.load_config(path).allowlist


def parse_allowlist(document, source: str):
    """The Allowlist in an already-loaded YAML document (raises ConfigError)."""
    return _allowlist.parse_config(document, source).allowlist


def new_server(target, resolver, *, listener, num_workers: int = 4, connect_timeout: float = 2.0,
               idle_timeout: float = 0.0):
    """A VsockProxyServer forwarding to ``target`` from an injected ``listener``."""
    return VsockProxyServer(_server.Route(target, resolver, connect_timeout=connect_timeout,
                                          idle_timeout=idle_timeout),
                            num_workers=num_workers, listener=listener)


# --------------------------------------------------------------------------- environment

@pytest.fixture(autouse=True)
def _no_inherited_proxy_env(request, monkeypatch):
    """A VSOCK_PROXY_* variable in the developer's shell must not change a host test's outcome.

    Only for modules directly in tests/: suites in subfolders (tests/vm, tests/e2e) own their environment.
    """
    if Path(str(request.node.path)).parent != Path(__file__).parent:
        return
    for name in list(os.environ):
        if name.startswith("VSOCK_PROXY_"):
            monkeypatch.delenv(name)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a ``python -m vsockproxy`` subprocess: repo importable, no stray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSOCK_PROXY_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "250"  # argparse would otherwise wrap long words at hyphens
    env.update(extra)
    return env


@pytest.fixture
def run_cli():
    """Run ``python -m vsockproxy ARGS`` to completion (bounded) and return the CompletedProcess."""

    def run(*args: str, timeout: float = 10, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([sys.executable, "-m", "vsockproxy", *args], cwd=REPO, env=env or cli_env(),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it by now
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr
            raise AssertionError(f"vsock-proxy {' '.join(args)} still running after {timeout}s "
                                 f"(it should have exited); stderr: {stderr}") from None

    return run


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The process failed with ``code`` and exactly one stderr line, no traceback, containing each needle."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("vsock-proxy: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- long-running subprocesses

class LoggedProcess:
    """A subprocess whose stderr lines are collected by a reader thread, so tests can wait for one."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump_stderr, daemon=True)
        self._reader.start()

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, needle: str, timeout: float = 10, count: int = 1) -> str:
        """The ``count``-th stderr line (new or already seen) containing ``needle``; fails after ``timeout``."""
        matches = [line for line in self.lines if needle in line]
        deadline = time.monotonic() + timeout
        while len(matches) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not logged {count} time(s) within {timeout}s; "
                                     f"stderr: {self.text()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"process exited ({self.proc.poll()}) before logging {needle!r}; "
                                     f"stderr: {self.text()}")
            self.lines.append(line)
            if needle in line:
                matches.append(line)
        return matches[count - 1]

    def drain(self) -> list[str]:
        """Every stderr line so far (collects what the reader thread has queued)."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.lines
            if line is None:
                self._queue.put(None)
                return self.lines
            self.lines.append(line)

    def finish(self, timeout: float = 10) -> int:
        """Wait for exit, then collect the rest of stderr."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self.drain()
        return code

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def text(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            self._reader.join(timeout=5)
            self.proc.stderr.close()


@pytest.fixture
def spawn():
    """Start long-running subprocesses; each one still running at teardown is killed by its handle."""
    started: list[LoggedProcess] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> LoggedProcess:
        process = LoggedProcess(argv, env or cli_env())
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


# --------------------------------------------------------------------------- files

@pytest.fixture
def write_config(tmp_path):
    """Write an allowlist file and return its path."""
    counter = iter(range(1_000_000))

    def write(text_or_entries, name: str | None = None) -> str:
        path = tmp_path / (name or f"allowlist-{next(counter)}.yaml")
        if isinstance(text_or_entries, str):
            path.write_text(text_or_entries)
        else:
            lines = ["allowlist:"] + [f"- {{address: {a}, port: {p}}}" for a, p in text_or_entries]
            path.write_text("\n".join(lines) + "\n")
        return str(path)

    return write


# --------------------------------------------------------------------------- fake DNS

def addrinfo(addresses: Iterable[str], port: int, family: int) -> list[tuple]:
    """What getaddrinfo returns for ``addresses`` (TCP), filtered by family like the real one."""
    result = []
    for address in addresses:
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        if family not in (socket.AF_UNSPEC, fam):
            continue
        sockaddr = (address, port, 0, 0) if fam == socket.AF_INET6 else (address, port)
        result.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
    if not result:
        raise socket.gaierror(socket.EAI_NODATA, "No address associated with hostname")
    return result


class FakeDNS:
    """A ``getaddrinfo`` stand-in: a dict of name -> addresses, a call log, optional delay and failures."""

    def __init__(self, records: dict[str, Iterable[str]] | None = None, delay: float = 0.0) -> None:
        self.records = {k: list(v) for k, v in (records or {}).items()}
        self.delay = delay
        self.calls: list[tuple] = []
        self.fail_next: dict[str, int] = {}

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.calls.append((host, port, family, type, proto))
        if self.delay:
            gevent.sleep(self.delay)
        if self.fail_next.get(host, 0) > 0:
            self.fail_next[host] -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return addrinfo(self.records[host], port, family)

    def count(self, host: str) -> int:
        return sum(1 for call in self.calls if call[0] == host)


@pytest.fixture
def fake_dns():
    return FakeDNS()


def no_dns(*args, **kwargs):
    raise AssertionError(f"unexpected DNS look-up {args!r}")


# --------------------------------------------------------------------------- gevent helpers

def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Poll ``predicate`` cooperatively (the hub keeps serving) until truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        gevent.sleep(0.01)


class TcpTarget:
    """A real TCP server on 127.0.0.1 that runs ``handler(sock)`` in a greenlet per connection."""

    def __init__(self, handler: Callable, port: int = 0, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.server = StreamServer((host, port), self._handle, backlog=1024)  # bursts from the proxy fit
        self.server.start()
        self.port = self.server.server_port

    def _handle(self, sock, _address) -> None:
        self.accepted += 1
        sock.settimeout(20)
        try:
            self.handler(sock)
        except Exception as exc:  # recorded so a test can fail on it, never printed by gevent
            self.errors.append(exc)

    def stop(self) -> None:
        self.server.stop(timeout=1)


def tracked(make: Callable, stop: Callable):
    """Body of a factory fixture: hands out ``make(...)`` and calls ``stop`` on each at teardown."""
    made = []

    def start(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    yield start
    for thing in made:
        stop(thing)


@pytest.fixture
def tcp_target():
    """Start TcpTargets: ``tcp_target(handler, port=0, host="127.0.0.1")``; all stop at teardown."""
    yield from tracked(TcpTarget, TcpTarget.stop)


def unused_tcp_port(host: str = "127.0.0.1") -> int:
    """A port on which nothing listens right now (bound and released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class Proxy:
    """A started VsockProxyServer on an injected TCP or Unix listener, and how to reach it."""

    def __init__(self, server: VsockProxyServer, listener: socket.socket, address, family: int) -> None:
        self.server = server
        self.listener = listener
        self.address = address
        self.family = family

    def connect(self, timeout: float = 10):
        """A gevent client socket connected to the proxy: the 'enclave' side."""
        client = gevent.socket.socket(self.family, socket.SOCK_STREAM)
        client.settimeout(timeout)
        client.connect(self.address)
        return client


@pytest.fixture
def make_proxy():
    """Start proxies in this process (gevent), each stopped and its listener closed at teardown."""
    proxies: list[Proxy] = []
    dirs: list[str] = []

    def make(target_port: int, *, host: str = "127.0.0.1", entries=None, resolver: Resolver | None = None,
             num_workers: int = 4, connect_timeout: float = 2.0, listener: str = "tcp",
             backlog: int = 128, idle_timeout: float = 0.0) -> Proxy:
        entries = entries if entries is not None else [{"address": host, "port": target_port}]
        allowlist = parse_allowlist({"allowlist": entries}, "test-allowlist.yaml")
        resolver = resolver or Resolver(getaddrinfo=no_dns)
        target = allowlist.authorize(host, target_port, resolver)
        if listener == "unix":
            directory = tempfile.mkdtemp(prefix="vsp-", dir="/tmp")  # short: sun_path is 108 bytes
            dirs.append(directory)
            address = os.path.join(directory, "enclave.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(address)
            family = socket.AF_UNIX
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            address = sock.getsockname()
            family = socket.AF_INET
        sock.listen(backlog)
        sock.setblocking(False)
        server = new_server(target, resolver, num_workers=num_workers, connect_timeout=connect_timeout,
                            listener=sock, idle_timeout=idle_timeout)
        server.start()
        proxy = Proxy(server, sock, address, family)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.server.stop(timeout=1)
        proxy.listener.close()
    for directory in dirs:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def echo(sock) -> None:
    """A target handler: send back everything until EOF, then half-close."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def recv_all(sock, limit: int = 1 << 30) -> bytes:
    """Read until EOF."""
    chunks = []
    total = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        assert total <= limit, "peer sent more than expected"


def recv_exactly(sock, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- hypothesis

from hypothesis import Phase, settings as _hypothesis_settings  # noqa: E402

# Reproducible runs, nothing written to .hypothesis/, no "explain" phase (it imports libcst and patches files).
_hypothesis_settings.register_profile(
    "vsockproxy", database=None, derandomize=True, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
_hypothesis_settings.load_profile("vsockproxy")
