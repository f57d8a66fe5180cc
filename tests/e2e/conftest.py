"""Fixtures for the end-to-end suite; its helpers live in tests/e2e/vsock.py.

Tests marked ``vsock`` run only inside the VM that ``scripts/vsock-vm`` boots.
"""

from __future__ import annotations

import pytest

from tests.e2e.vsock import IN_VM, ProxyProcess, ThreadedTarget, vsock_proxy_command
from tests.helpers import cli_env, tracked


def pytest_collection_modifyitems(config, items):
    if IN_VM:
        return
    skip = pytest.mark.skip(reason="real vsock client traffic runs only inside scripts/vsock-vm")
    for item in items:
        if "vsock" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def target():
    """Start ThreadedTargets: ``target(handler, host="127.0.0.1", port=0)``; each stops at teardown."""
    yield from tracked(ThreadedTarget, ThreadedTarget.stop)


@pytest.fixture
def proxy(tmp_path):
    """Start the real CLI: ``proxy(args, allow=[(host, port)], yaml=None, env=None)``."""
    started: list[ProxyProcess] = []

    def start(args: list[str], allow=(), yaml: str | None = None, env: dict | None = None,
              wait: bool = True, listeners: int = 1) -> ProxyProcess:
        config = tmp_path / f"vsock-proxy-{len(started)}.yaml"
        if yaml is None:
            entries = "".join(f"- {{address: '{host}', port: {port}}}\n" for host, port in allow)
            yaml = "allowlist:\n" + (entries or "[]\n")
        config.write_text(yaml)
        process = ProxyProcess([*vsock_proxy_command(), *args, "--config", str(config)], cli_env(**(env or {})))
        process.config = config
        started.append(process)
        if wait:
            process.wait_listening(listeners)
        return process

    yield start
    for process in started:
        process.kill()
