"""Fixtures for the host-side suite; the helpers they use live in tests/helpers.py.

Every server, socket and subprocess a fixture starts is stopped, closed or
killed (by its own handle) in the fixture's teardown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import (REPO, FakeDNS, LoggedProcess, Proxy, TcpTarget, cli_env, new_server, no_dns,
                           parse_allowlist, tracked)
from vsockproxy.resolver import Resolver


@pytest.fixture(autouse=True)
def _no_inherited_proxy_env(request, monkeypatch):
    """A VSOCK_PROXY_* variable in the developer's shell must not change a host test's outcome.

    Only for modules directly in tests/: suites in subfolders (tests/vm, tests/e2e) own their environment.
    """
    if Path(str(request.node.path)).parent != Path(__file__).parent:
        return
    for name in list(os.environ):
        if name.startswith("VSOCK_PROXY_") or name == "RUST_LOG":
            monkeypatch.delenv(name)


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


@pytest.fixture
def fake_dns():
    return FakeDNS()


@pytest.fixture
def tcp_target():
    """Start TcpTargets: ``tcp_target(handler, port=0, host="127.0.0.1")``; all stop at teardown."""
    yield from tracked(TcpTarget, TcpTarget.stop)


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
