"""Issue 14, defect 4: a reload must not freeze traffic, and no file may cost unbounded work.

Reading the allowlist is CPU work that holds the GIL, so the proxy does it in a child process on
reload.  Checked here: end to end on the stand-in proxy (the real CLI on a TCP listener, see
tests/test_faults.py), a client's ping-pong keeps its latency while a large file is reloaded; files
past a bound (nesting, values, entries, services) or with merge keys are one error line at start-up
and on reload; and the child-process loader itself turns every way a child can fail into one
ConfigError.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, recv_exactly, tracked
from tests.test_faults import StandInProxy, ThreadTarget, blocking_echo
from vsockproxy import loader
from vsockproxy.config import MAX_DEPTH, MAX_ENTRIES, MAX_NODES, MAX_SERVICES, ConfigError, load_file

pytestmark = pytest.mark.timeout(120)

ENTRIES = 5_000


@pytest.fixture
def thread_target():
    yield from tracked(ThreadTarget, ThreadTarget.stop)


def large_allowlist(target_port: int, valid: bool) -> str:
    """The target's entry, then 5,000 more (about 225 KB); if not valid, a last one with port 0."""
    lines = ["allowlist:", f"- {{address: 127.0.0.1, port: {target_port}}}"]
    lines += [f"- {{address: host{index}.example.com, port: 443}}" for index in range(ENTRIES)]
    if not valid:
        lines.append("- {address: last.example.com, port: 0}")
    return "\n".join(lines) + "\n"


def replace_file(path: Path, text: str) -> None:
    """Swap the file in whole, as an editor or config manager would, so a reload never reads half of it."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def child_pids(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            children += [int(child) for child in listing.read().split()]
    return children


class PingPong:
    """One byte each way through the proxy, over and over in a thread, timing each exchange."""

    def __init__(self, proxy: StandInProxy) -> None:
        self.client = proxy.connect()
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.sendall(b"E")  # ThreadTarget: echo
        assert recv_exactly(self.client, 1) == b"E"
        self.exchanges: list[tuple[float, float]] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                self.client.sendall(b"p")
                assert recv_exactly(self.client, 1) == b"p", "the echo connection broke"
                self.exchanges.append((started, time.perf_counter()))
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.failure = exc

    def wait_for_exchanges(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.exchanges) < count:
            assert self.failure is None and time.monotonic() < deadline, (self.failure, len(self.exchanges))
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.close()
        assert self.failure is None, f"the client's exchanges failed: {self.failure!r}"

    def worst_between(self, start: float, end: float) -> tuple[float, int]:
        """The longest exchange that overlapped [start, end], and how many did."""
        during = [done - began for began, done in self.exchanges if done >= start and began <= end]
        return max(during, default=0.0), len(during)


@pytest.mark.parametrize("valid", [True, False], ids=["valid", "invalid"])
def test_reloading_a_large_allowlist_does_not_stall_open_connections(tmp_path, thread_target, valid):
    """Defect 4: the proxy parsed the file on its event loop, so every exchange waited for the whole parse.

    The parse time is measured here, in this process, on the same file with the same code; the worst
    exchange while the proxy reloads must stay far below it (on the old code it was about equal).
    """
    target = thread_target()
    config = tmp_path / "allowlist.yaml"
    config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {target.port}}}\n")
    proxy = StandInProxy(config, target.port)
    try:
        replace_file(config, large_allowlist(target.port, valid))
        started = time.perf_counter()
        try:
            load_file(str(config))
        except ConfigError:
            assert not valid
        parse_seconds = time.perf_counter() - started

        pings = PingPong(proxy)
        pings.wait_for_exchanges(50)
        signalled = time.perf_counter()
        proxy.signal(signal.SIGHUP)
        if valid:
            proxy.wait_for("reload applied: 1 service(s)", timeout=60)
        else:
            line = proxy.wait_for("reload rejected", timeout=60)
            assert f"reload rejected, keeping the running configuration: {config}: allowlist entry {ENTRIES + 2}: " \
                   f"port must be from 1 to 65535, got 0" in line, line
        reloaded = time.perf_counter()
        pings.wait_for_exchanges(len(pings.exchanges) + 50)
        pings.stop()

        worst, count = pings.worst_between(signalled, reloaded)
        assert count > 0
        assert worst < parse_seconds / 2, (
            f"an exchange took {worst * 1000:.0f} ms during the reload, against {parse_seconds * 1000:.0f} ms "
            f"to parse the file: the parse stalls the proxy")
        assert blocking_echo(proxy) == b"next connection works"
        assert child_pids(proxy.pid) == [], "the loader process was not reaped"
        assert [line for line in proxy.drain() if "Traceback" in line] == []
        assert proxy.stop() == 0
    finally:
        proxy.kill()


BOMBS = {
    # Each one fits in 256 KiB, so only the bounds on nesting and values, or the refusal of merge keys, stop it.
    "flow-nesting-100000": ("[" * 100_000 + "]" * 100_000, f"nested more than {MAX_DEPTH} levels deep at line 1"),
    "allowlist-nesting-100000": ("allowlist: " + "[" * 100_000, f"nested more than {MAX_DEPTH} levels deep"),
    "block-nesting-700": ("".join(f"{' ' * level}a:\n" for level in range(700)),
                          f"nested more than {MAX_DEPTH} levels deep at line {MAX_DEPTH + 1}"),
    "120000-values": ("allowlist: [" + "a," * 120_000 + "]\n", f"more than {MAX_NODES} YAML values"),
    # 5,000 entries that each merge in a mapping of 1,000 keys: 5 million keys built from 60 KB.
    "merge-keys": ("allowlist:\n- &big {" + ", ".join(f"k{key}: 0" for key in range(1000)) + "}\n"
                   + "- {<<: *big}\n" * 5000, "merge key '<<' at line "),
}


def test_a_merge_key_is_refused_since_upstream_reads_it_as_a_plain_key(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("allowlist:\n- &kms {address: kms.example, port: 443}\n- {<<: *kms, port: 8443}\n")
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert str(info.value) == f"{path}: merge key '<<' at line 3: write the keys out"


@pytest.mark.parametrize("name", BOMBS)
def test_bombs_are_one_error_line_at_start_up(tmp_path, run_cli, name):
    text, needle = BOMBS[name]
    config = tmp_path / "bomb.yaml"
    config.write_text(text)
    assert config.stat().st_size <= 256 * 1024
    assert_one_line_error(run_cli("--config", str(config), "5005", "127.0.0.1", "443", timeout=30), 1,
                          f"{config}: {needle}")


def test_bombs_are_rejected_on_reload_and_the_proxy_keeps_serving(tmp_path, thread_target):
    target = thread_target()
    config = tmp_path / "allowlist.yaml"
    good = f"allowlist:\n- {{address: 127.0.0.1, port: {target.port}}}\n"
    config.write_text(good)
    proxy = StandInProxy(config, target.port)
    try:
        for count, (text, needle) in enumerate(BOMBS.values(), 1):
            replace_file(config, text)
            proxy.signal(signal.SIGHUP)
            line = proxy.wait_for("reload rejected", timeout=60, count=count)
            assert f"reload rejected, keeping the running configuration: {config}: {needle}" in line, line
            assert blocking_echo(proxy) == b"next connection works"
        replace_file(config, good)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for("reload applied", timeout=60)
        assert blocking_echo(proxy) == b"next connection works"
        assert child_pids(proxy.pid) == []
        assert [line for line in proxy.drain() if "Traceback" in line] == []
    finally:
        proxy.kill()


# --------------------------------------------------------------------------- bounds on entries and services

def test_the_entry_bound_refuses_only_entries_multiplied_by_aliases(tmp_path):
    """The fullest allowlist written out within 256 KiB loads; 20,000 entries only fit through aliases
    (``- *e``, 5 bytes each), and one more than that is one error line."""
    lines = ["allowlist:"]
    size = len("allowlist:\n")
    while size < 256 * 1024 - 40:
        lines.append(f"- {{address: h{len(lines)}.io, port: 1}}")
        size += len(lines[-1]) + 1
    path = tmp_path / "full.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(load_file(str(path)).allowlist.rules) == len(lines) - 1 > 8_000

    aliases = "allowlist:\n- &e {address: a.example, port: 443}\n"
    path.write_text(aliases + "- *e\n" * (MAX_ENTRIES - 1))
    assert len(load_file(str(path)).allowlist.rules) == MAX_ENTRIES
    path.write_text(aliases + "- *e\n" * MAX_ENTRIES)
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert str(info.value) == f"{path}: {MAX_ENTRIES + 1} allowlist entries, more than the {MAX_ENTRIES} allowed"


def test_too_many_services_is_one_error_line(tmp_path):
    path = tmp_path / "services.yaml"
    path.write_text("allowlist: [{address: a.example, port: 443}]\nservices:\n" + "".join(
        f"- {{listen_port: {port}, address: a.example, port: 443}}\n" for port in range(1, MAX_SERVICES + 2)))
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert str(info.value) == f"{path}: {MAX_SERVICES + 1} services, more than the {MAX_SERVICES} allowed"
    path.write_text("allowlist: [{address: a.example, port: 443}]\nservices:\n" + "".join(
        f"- {{listen_port: {port}, address: a.example, port: 443}}\n" for port in range(1, MAX_SERVICES + 1)))
    assert len(load_file(str(path)).services) == MAX_SERVICES


def test_an_aliased_port_list_is_checked_once_not_once_per_entry(tmp_path):
    """``port: *ports`` in each of N entries must not cost N times the list (in time and memory):
    2,000 ports aliased by 2,000 entries were 4 million checks and 2,000 copies."""
    ports = ", ".join(str(port) for port in range(1, 2001))
    path = tmp_path / "ports.yaml"
    path.write_text(f"allowlist:\n- {{address: host0.example, port: &ports [{ports}]}}\n"
                    + "".join(f"- {{address: host{index}.example, port: *ports}}\n" for index in range(1, 2000)))
    rules = load_file(str(path)).allowlist.rules
    assert len(rules) == 2000 and rules[0].ports == frozenset(range(1, 2001))
    assert all(rule.ports is rules[0].ports for rule in rules)


# --------------------------------------------------------------------------- the child-process loader

@pytest.fixture
def no_children_left():
    yield
    assert child_pids(os.getpid()) == [], "a loader process was left behind"


EVERY_KIND = """\
allowlist:
- {address: kms.us-east-1.amazonaws.com, port: 443}
- {address: "*.s3.example.com", port: [443, 8443]}
- {address: 10.0.0.0/8, port: &web [80, 443]}
- {address: "fe80::%eth0/64", port: *web}
- {address: 127.0.0.1, port: 9}
- {address: "::1", port: 65535}
services:
- {listen_port: 8000, address: kms.us-east-1.amazonaws.com, port: 443}
- {listen_port: 4294967294, address: a.s3.example.com, port: 8443, num_workers: 16, ipv4: true,
   connect_timeout: 2.5, idle_timeout: 0}
"""


def test_loader_answers_exactly_what_load_config_returns(tmp_path, no_children_left):
    path = tmp_path / "allowlist.yaml"
    for text in (EVERY_KIND, large_allowlist(9, valid=True)):
        path.write_text(text)
        assert loader.load_file_in_child(str(path)) == load_file(str(path))
    for text in (large_allowlist(9, valid=False), BOMBS["flow-nesting-100000"][0], "allowlist: [\n"):
        path.write_text(text)
        with pytest.raises(ConfigError) as in_child:
            loader.load_file_in_child(str(path))
        with pytest.raises(ConfigError) as in_process:
            load_file(str(path))
        assert str(in_child.value) == str(in_process.value)
    with pytest.raises(ConfigError) as info:
        loader.load_file_in_child(str(tmp_path / "missing.yaml"))
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: no such file"


def _killed(path: str):
    os.kill(os.getpid(), signal.SIGKILL)


def _crashes(path: str):
    raise RuntimeError("a bug")


def _hangs(path: str):
    time.sleep(60)


@pytest.mark.parametrize("load, deadline, message", [
    (_killed, 30, "cannot load: the loader process was killed by SIGKILL"),
    (_crashes, 30, "cannot load: the loader process exited with status 1 without an answer"),
    (_hangs, 0.5, "loading took longer than 0.5s; the loader process was stopped"),
], ids=["killed", "crashes", "hangs"])
def test_a_failing_loader_process_is_one_config_error(monkeypatch, load, deadline, message, no_children_left):
    monkeypatch.setattr(loader, "load_file", load)
    with pytest.raises(ConfigError) as info:
        loader.load_file_in_child("/etc/vsock-proxy.yaml", deadline=deadline)
    assert str(info.value) == f"/etc/vsock-proxy.yaml: {message}"
