"""Side-by-side benchmark of vsock proxies: direct (no proxy), socat, socat -b 262144 and vsockproxy
(--processes auto; "vsockproxy-1" is --processes 1, on request), and AWS's own vsock-proxy ("upstream")
when --upstream names where it is built.

    scripts/bench [--transport host|vm] [--proxies direct,socat,socat-big,vsockproxy,vsockproxy-1,upstream]
                  [--proxy-cmd NAME=TEMPLATE ...] [--scenarios bulk-up,...] [--repeat 3]
                  [--smoke] [--set KEY=VALUE ...] [--load auto|c|python] [--json FILE]
                  [--upstream DIR]

Transports
  host  the enclave side is a TCP stand-in socket on 127.0.0.1 (native speed, runs anywhere);
  vm    real AF_VSOCK, clients on CID 1: run on the host, the bench re-runs itself inside
        scripts/vsock-vm (the only place where a vsock connect is allowed).

One target server (bench_lib/fastload.c "serve", or bench_lib/target.py without a C compiler) listens
for every scenario on 127.0.0.1 (and on vsock, for "direct" in the VM).  Each scenario starts each
proxy in front of it (--smoke keeps proxies across scenarios: start-up dominates there) and runs the
load --repeat times per proxy, proxies interleaved; each figure is the median of the repetitions,
shown with its ratio to direct (xd) and to socat (xs).  Ping-pong, #413, churn and burst load comes
from fastload (C, no GIL); bulk streams from Python threads with 1 MiB buffers; concurrency from
gevent.  Sizes: the issue's on the host, smaller under the VM's emulated CPU (see FULL, VM, SMOKE).
Exit status: 0 when every run completed (whatever the figures), 1 when some run could not be
made (a proxy did not start or died: see "problems"), 2 for usage errors.

Request-routed scenarios (issue 13): connect-churn is churn with an HTTP CONNECT handshake first on
every connection (CONNECT target, expect "HTTP/1.1 200", then the echo).  Only proxies with a
template for the scenario's mode run it (ROUTED_TEMPLATES: vsockproxy with a service of
"mode: http-connect", and any --proxy-cmd NAME@http-connect=TEMPLATE); the others are listed as
skipped ("no CONNECT").  Its table compares each
proxy with its own churn figures of the same run (x churn), and the line under it gives the
handshake's cost per connection.

A proxy is a command template, split like a shell line, with these placeholders:
  {listen}        the socat address to listen on: TCP4-LISTEN:PORT,bind=127.0.0.1 on host,
                  VSOCK-LISTEN:PORT in the VM (so one template serves both transports)
  {listen_port}   the port alone;  {listen_addr}  tcp:127.0.0.1:PORT or vsock:any:PORT
  {target}        HOST:PORT of the target server;  {target_host}, {target_port}
  {allowlist}     a vsock-proxy allowlist YAML file allowing exactly the target
  {routed_config} (request-routed scenarios) that allowlist plus one service listening on
                  {listen_port} with the scenario's mode: services: [{listen_port: P, mode: M}]
  {workers}       the scenario's -w (100 for issue413, enough for every connection elsewhere)
  {backlog}       listen backlog to ask for (4096)
  {python}, {repo}, {transport}

Upstream: --upstream DIR (or $VSOCKPROXY_UPSTREAM_DIR) adds the "upstream" row, from the two builds
of upstream vsock-proxy that ../shared/tools/build-upstream makes: DIR/vsock-proxy-tcp (listens on TCP
127.0.0.1, for the host transport) and DIR/vsock-proxy-anycid (vsock, listen CID any, for the VM).
A missing binary drops the row with a one-line note.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gevent

from bench_lib import load
from bench_lib.drive import REPO, log, markers, run_in_vm, write_all
from bench_lib.drive import raise_nofile as _raise_nofile
from bench_lib.net import Addr, VsockForbidden, connect, free_port, in_vm, parse_addr, tcp, vsock

PROG = "bench"
BACKLOG = 4096
TARGET_SCRIPT = REPO / "scripts" / "bench_lib" / "target.py"

DEFAULT_PROXIES = ["direct", "socat", "socat-big", "vsockproxy"]
UPSTREAM = "upstream"
UPSTREAM_ENV = "VSOCKPROXY_UPSTREAM_DIR"
#: The upstream build for each transport: TCP 127.0.0.1 on the host, vsock (listen CID any) in the VM.
UPSTREAM_BINARIES = {"host": "vsock-proxy-tcp", "vm": "vsock-proxy-anycid"}
UPSTREAM_TEMPLATE = "{binary} {{listen_port}} {{target_host}} {{target_port}} --config {{allowlist}} -w {{workers}}"
TEMPLATES = {
    "socat": "socat {listen},reuseaddr,fork,backlog={backlog} TCP:{target}",
    "socat-big": "socat -b 262144 {listen},reuseaddr,fork,backlog={backlog} TCP:{target}",
    "vsockproxy": "{python} {repo}/scripts/bench_lib/run_vsockproxy.py {listen} {target_host} {target_port} "
                  "--config {allowlist} -w {workers} --backlog {backlog}",
    # The default above is --processes auto (a worker per CPU); this is the single process of 1.x.
    "vsockproxy-1": "{python} {repo}/scripts/bench_lib/run_vsockproxy.py {listen} {target_host} {target_port} "
                    "--config {allowlist} -w {workers} --backlog {backlog} --processes 1",
}
#: The proxies that speak a request-routed mode, by mode: their templates for the scenarios of that mode.
#: The service (port and mode) comes from {routed_config}, so the command line names no target.
ROUTED_TEMPLATES = {
    "http-connect": {
        "vsockproxy": "{python} {repo}/scripts/bench_lib/run_vsockproxy.py --file-services {listen} "
                      "--config {routed_config} -w {workers} --backlog {backlog}",
    },
}

# Sizes of the full run (the issue's), of --smoke (seconds in all), and of the VM, whose
# emulated CPU is far slower.  --set KEY=VALUE overrides any of them.
FULL = {
    "bulk_mib": 1024, "aggregate_streams": 32, "aggregate_mib": 128,
    "pingpong_rounds": 10000, "pingpong_bytes": 1024,
    "issue413_clients": 30, "issue413_seconds": 10.0, "issue413_workers": 100,
    "issue413_request": 2048, "issue413_reply": 4096,
    "churn_clients": 8, "churn_seconds": 5.0, "churn_bytes": 100,
    "concurrency_connections": 10000, "concurrency_connect_parallel": 200, "echo_bytes": 100,
    "burst_clients": 1000,
}
SMOKE = {
    "bulk_mib": 16, "aggregate_streams": 4, "aggregate_mib": 4, "pingpong_rounds": 200,
    "issue413_clients": 10, "issue413_seconds": 0.4, "churn_clients": 4, "churn_seconds": 0.4,
    "concurrency_connections": 200, "burst_clients": 100,
}
# Under the VM's emulated CPU (qemu TCG: tens of MiB/s, ~100 connections/s) the host's sizes would
# take hours; these keep a full VM run near half an hour while keeping the scenarios' shapes, and the
# burst at the full 1,000 connects.
VM = {
    "bulk_mib": 128, "aggregate_mib": 4, "pingpong_rounds": 2000,
    "churn_seconds": 5.0, "concurrency_connections": 1000,
}
VM_SMOKE = {
    "bulk_mib": 2, "aggregate_streams": 4, "aggregate_mib": 1, "pingpong_rounds": 30,
    "issue413_clients": 4, "issue413_seconds": 0.3, "churn_clients": 2, "churn_seconds": 0.3,
    "concurrency_connections": 40, "burst_clients": 40,
}


# --------------------------------------------------------------------------- scenarios

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    ratio: bool = False       # show xdirect / xsocat for it
    better: str = "higher"    # or "lower"; for the reader


@dataclass(frozen=True)
class Scenario:
    name: str
    target_mode: str
    metrics: tuple[Metric, ...]
    describe: Callable[[dict], str]
    workers: Callable[[dict], int]
    run: Callable[..., dict]
    fresh_proxy: bool = False  # a new proxy process per repetition (peak RSS must be this run's)
    # Request-routed scenarios: the service's mode (ROUTED_TEMPLATES), what a proxy without it lacks
    # (its row is skipped), the (preamble, expected reply prefix) of each connection for a target
    # HOST, PORT, and the scenario whose figures, same proxy and run, each figure is compared with.
    mode: str | None = None
    lacks: str = "only a --proxy-cmd NAME@MODE template"
    handshake: Callable[[str, int], tuple[bytes, bytes]] | None = None
    baseline: str | None = None


def http_connect(host: str, port: int) -> tuple[bytes, bytes]:
    """An HTTP CONNECT request for ``host:port``, and the start of the reply that lets it through."""
    authority = f"{host}:{port}"
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(), b"HTTP/1.1 200"


def _bulk_time_limit(mib: float) -> float:
    return 60 + mib * 0.5


SCENARIOS = [
    Scenario("bulk-up", "bulk", (Metric("mib_per_s", "MiB/s", True),),
             lambda p: f"{p['bulk_mib']} MiB enclave->target, one stream",
             lambda p: 4,
             lambda addr, p, hold, gen: load.bulk(addr, streams=1, mib=p["bulk_mib"], directions=("up",),
                                             time_limit=_bulk_time_limit(p["bulk_mib"]))),
    Scenario("bulk-down", "bulk", (Metric("mib_per_s", "MiB/s", True),),
             lambda p: f"{p['bulk_mib']} MiB target->enclave, one stream",
             lambda p: 4,
             lambda addr, p, hold, gen: load.bulk(addr, streams=1, mib=p["bulk_mib"], directions=("down",),
                                             time_limit=_bulk_time_limit(p["bulk_mib"]))),
    Scenario("aggregate", "bulk", (Metric("mib_per_s", "MiB/s", True),),
             lambda p: f"{p['aggregate_streams']} parallel streams x {p['aggregate_mib']} MiB, "
                       "half up and half down, total MiB/s",
             lambda p: p["aggregate_streams"] + 8,
             lambda addr, p, hold, gen: load.bulk(
                 addr, streams=p["aggregate_streams"], mib=p["aggregate_mib"], directions=("up", "down"),
                 time_limit=_bulk_time_limit(p["aggregate_streams"] * p["aggregate_mib"]))),
    Scenario("pingpong", "echo",
             (Metric("p50_us", "p50 us", True, "lower"), Metric("p99_us", "p99 us", True, "lower")),
             lambda p: f"{p['pingpong_bytes']} B ping-pong, {p['pingpong_rounds']} rounds on one connection",
             lambda p: 4,
             lambda addr, p, hold, gen: gen.pingpong(addr, rounds=p["pingpong_rounds"], size=p["pingpong_bytes"],
                                                 time_limit=60 + p["pingpong_rounds"] * 0.01)),
    Scenario("mixed", "echo",
             (Metric("p50_us", "p50 us", True, "lower"), Metric("p99_us", "p99 us", True, "lower"),
              Metric("bulk_mib_per_s", "bulk MiB/s", True)),
             lambda p: f"the pingpong scenario beside one bulk stream, both ways through an echo target, "
                       "on the same proxy",
             lambda p: 4,
             lambda addr, p, hold, gen: load.mixed(addr, gen.pingpong, rounds=p["pingpong_rounds"],
                                                size=p["pingpong_bytes"],
                                                time_limit=60 + p["pingpong_rounds"] * 0.01)),
    Scenario("issue413", "rr",
             (Metric("exchanges_per_s", "exch/s", True), Metric("p99_ms", "p99 ms", True, "lower")),
             lambda p: f"{p['issue413_clients']} clients x (connect, {p['issue413_request']} B request, "
                       f"{p['issue413_reply']} B reply, close) for {p['issue413_seconds']:g} s",
             lambda p: p["issue413_workers"],
             lambda addr, p, hold, gen: gen.request_reply(
                 addr, clients=p["issue413_clients"], duration=p["issue413_seconds"],
                 request=p["issue413_request"], reply=p["issue413_reply"], max_exchanges=10_000_000),
             ),
    Scenario("churn", "echo",
             (Metric("conns_per_s", "conn/s", True), Metric("p99_ms", "p99 ms", True, "lower")),
             lambda p: f"{p['churn_clients']} clients x (connect, {p['churn_bytes']} B echo, close) "
                       f"for {p['churn_seconds']:g} s",
             lambda p: max(100, p["churn_clients"] * 2),
             lambda addr, p, hold, gen: gen.churn(addr, clients=p["churn_clients"], duration=p["churn_seconds"],
                                              size=p["churn_bytes"], max_connections=10_000_000)),
    Scenario("connect-churn", "echo",
             (Metric("conns_per_s", "conn/s", False), Metric("p99_ms", "p99 ms", False, "lower")),
             lambda p: f"churn with an HTTP CONNECT handshake first: {p['churn_clients']} clients x (connect, "
                       f"CONNECT, 200, {p['churn_bytes']} B echo, close) for {p['churn_seconds']:g} s",
             lambda p: max(100, p["churn_clients"] * 2),
             lambda addr, p, hold, gen: gen.churn(addr, clients=p["churn_clients"], duration=p["churn_seconds"],
                                              size=p["churn_bytes"], max_connections=10_000_000,
                                              preamble=p["preamble"], expect=p["expect"]),
             mode="http-connect", lacks="no CONNECT", handshake=http_connect, baseline="churn"),
    Scenario("concurrency", "echo",
             (Metric("held", "held", False), Metric("connect_s", "open s", False, "lower"),
              Metric("peak_rss_mib", "VmHWM MiB", False, "lower"),
              Metric("group_pss_mib", "all-procs PSS MiB", False, "lower"), Metric("procs", "procs", False)),
             lambda p: f"{p['concurrency_connections']} idle connections held at once "
                       f"(opened {p['concurrency_connect_parallel']} at a time), then one "
                       f"{p['echo_bytes']} B echo on each",
             lambda p: p["concurrency_connections"] + 100,
             lambda addr, p, hold, gen: load.concurrency(
                 addr, connections=p["concurrency_connections"], size=p["echo_bytes"],
                 connect_parallel=p["concurrency_connect_parallel"],
                 time_limit=120 + p["concurrency_connections"] * 0.02, on_hold=hold),
             fresh_proxy=True),
    Scenario("burst", "echo",
             (Metric("refused", "refused", False, "lower"), Metric("failed", "failed", False, "lower"),
              Metric("seconds", "all done s", False, "lower"),
              Metric("connect_p99_ms", "connect p99 ms", False, "lower")),
             lambda p: f"{p['burst_clients']} clients connect at once, then one {p['echo_bytes']} B echo each",
             lambda p: p["burst_clients"] + 100,
             lambda addr, p, hold, gen: gen.burst(addr, clients=p["burst_clients"], size=p["echo_bytes"],
                                              time_limit=60 + p["burst_clients"] * 0.05)),
]
SCENARIO_NAMES = [s.name for s in SCENARIOS]


# --------------------------------------------------------------------------- processes

class HarnessError(Exception):
    """The bench could not run something (a proxy did not start, died, ...); not a proxy's data failure."""


_libc = None


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the bench dies without cleaning up (PR_SET_PDEATHSIG)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (one we created with start_new_session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            pids.append(int(entry))
    return pids


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class Target:
    """The target server process: one listener per mode (bulk, echo, rr), shared by every scenario."""

    MODES = ("bulk", "echo", "rr")

    def __init__(self, params: dict, vsock_too: bool, log_path: Path, fastload: str | None) -> None:
        serve = []
        for mode in self.MODES:
            serve.append(f"{mode}=tcp:127.0.0.1:0")
            if vsock_too:  # for "direct" in the VM: the target itself listens on vsock
                serve.append(f"{mode}=vsock:any:0")
        options = ["--backlog", str(BACKLOG), "--request", str(params["issue413_request"]),
                   "--reply", str(params["issue413_reply"])]
        if fastload:
            argv = [fastload, "serve", *options, *serve]
        else:
            argv = [sys.executable, str(TARGET_SCRIPT), *options, *[f"--serve={item}" for item in serve]]
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        line = self._readline(120)
        if not line.startswith("READY "):
            self.stop()
            raise HarnessError(f"target server did not start: {line!r} {log_path.read_text()[-500:]}")
        self.addrs: dict[tuple[str, int], Addr] = {}
        for item in line.split()[1:]:
            mode, _, text = item.partition("=")
            addr = parse_addr(text)
            self.addrs[(mode, addr.family)] = addr

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode().strip() if ready else ""

    def addr(self, mode: str, family: int) -> Addr:
        return self.addrs[(mode, family)]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise HarnessError(f"the target server exited with status {self.proc.returncode}: "
                               f"{self.log_path.read_text(errors='replace')[-500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.log.close()


class ProxyProcess:
    """One proxy under test, started from its command template in a process group of its own."""

    def __init__(self, name: str, template: str, context: dict, client: Addr, log_path: Path,
                 handshake: tuple[bytes, bytes] | None = None) -> None:
        self.name = name
        self.client = client
        self.handshake = handshake  # the readiness probe goes through it too
        self.log_path = log_path
        try:
            self.argv = [token.format_map(context) for token in shlex.split(template)]
        except (KeyError, IndexError, ValueError) as exc:
            raise HarnessError(f"proxy {name}: bad template {template!r}: unknown placeholder {exc}") from None
        self.log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:
            self.log.close()
            raise HarnessError(f"proxy {name}: cannot run {self.argv[0]}: {exc.strerror}") from None
        self.pid = self.proc.pid
        self.baseline_procs = 1

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until a connection through the proxy succeeds (it reaches the target, which sees a bare close).

        With a handshake (connect-churn), the probe makes it and must get the expected reply: a proxy
        that answers but refuses (a wrong config, say) fails here, not as every connection of the run.
        """
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"proxy {self.name} exited with status {self.proc.returncode} before serving: "
                                   f"{self.log_tail()}")
            try:
                with connect(self.client, 2.0) as sock:
                    if self.handshake is not None:
                        load.handshake(sock, *self.handshake)
            except VsockForbidden:
                raise
            except load.HandshakeRefused as exc:
                raise HarnessError(f"proxy {self.name} refused the readiness probe's handshake ({exc}): "
                                   f"{self.log_tail()}") from None
            except OSError as exc:
                last = exc
                time.sleep(0.02)
                continue
            self.settle(5.0)
            self.baseline_procs = len(group_pids(self.pid))
            return
        raise HarnessError(f"proxy {self.name} not reachable at {self.client} after {timeout:g}s ({last}): "
                           f"{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise HarnessError(f"proxy {self.name} exited with status {self.proc.returncode}: {self.log_tail()}")

    def settle(self, timeout: float = 30.0) -> None:
        """Wait for forked per-connection children (socat) of the last run to go away."""
        deadline = time.monotonic() + timeout
        while len(group_pids(self.pid)) > self.baseline_procs and time.monotonic() < deadline:
            time.sleep(0.05)

    def memory(self) -> dict:
        """Summed PSS and RSS of every process of the proxy's group, now."""
        pids = group_pids(self.pid)
        pss = sum(pss_kib(pid) or 0 for pid in pids)
        rss = sum(status_kib(pid, "VmRSS") or 0 for pid in pids)
        return {"group_pss_mib": pss / 1024, "group_rss_mib": rss / 1024, "procs": len(pids)}

    def peak_rss_mib(self) -> float | None:
        kib = status_kib(self.pid, "VmHWM")
        return kib / 1024 if kib is not None else None

    def log_tail(self, size: int = 600) -> str:
        try:
            self.log.flush()
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text[-size:].strip().splitlines()[-5:])

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after a grace; never anything outside our group."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()
                if self.proc.returncode is not None and not group_pids(self.pid):
                    break
                time.sleep(0.02)
            else:
                continue
            break
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


PROBLEM_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|\] [EWF] ")


def scan_log(path: Path) -> dict:
    """Counts of log lines and of warning/error lines in a proxy's log, with a few samples."""
    lines = problems = 0
    samples: list[str] = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                lines += 1
                if PROBLEM_LINE.search(line):
                    problems += 1
                    if len(samples) < 5:
                        samples.append(line.strip()[:300])
    except OSError:
        pass
    return {"lines": lines, "problems": problems, "samples": samples}


# --------------------------------------------------------------------------- running

def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def summarize_run(scenario: Scenario, result: dict) -> str:
    parts = [f"{m.label}={fmt(result.get(m.key))}" for m in scenario.metrics]
    parts.append(f"failures={result.get('failures')}")
    if result.get("errors"):
        parts.append(f"errors={result['errors']}")
    if result.get("error"):
        parts.append(f"HARNESS ERROR: {result['error']}")
    return " ".join(parts)


class Bench:
    def __init__(self, args: argparse.Namespace, params: dict, templates: dict[str, str]) -> None:
        self.args = args
        self.params = params
        self.templates = templates
        self.transport = args.transport
        self.tmp = Path(tempfile.mkdtemp(prefix="vsockproxy-bench-"))
        self.live: list = []  # the target and the proxies, to stop on the way out
        self.kept: dict[str, ProxyProcess] = {}  # --smoke: proxies kept for the next scenario
        self.started_proxies = 0
        self.harness_errors = 0
        self.target: Target | None = None
        self.fast: load.FastLoad | None = None
        if args.load != "python":
            binary = fastload_binary(self.tmp)
            if binary is None and args.load == "c":
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise SystemExit(f"{PROG}: --load c, but bench_lib/fastload.c does not compile here")
            self.fast = load.FastLoad(binary) if binary else None
        self.load_kind = "c" if self.fast else "python"

    def close(self) -> None:
        self.kept.clear()
        for thing in reversed(self.live):
            try:
                thing.stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                log(f"{PROG}: cleanup: {exc}")
        self.live.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- proxies
    def client_addr(self, port: int) -> Addr:
        return vsock(port) if self.transport == "vm" else tcp(port)

    def template(self, name: str, scenario: Scenario) -> str | None:
        """``name``'s command template for ``scenario``; None when it cannot run it (direct: no proxy)."""
        if scenario.mode is not None:
            return getattr(self.args, "routed_templates", ROUTED_TEMPLATES)[scenario.mode].get(name)
        return None if name == "direct" else self.templates.get(name)

    def runs(self, name: str, scenario: Scenario) -> bool:
        return name == "direct" and scenario.mode is None or self.template(name, scenario) is not None

    def handshake(self, scenario: Scenario) -> tuple[bytes, bytes] | None:
        if scenario.handshake is None:
            return None
        target_addr = self.target.addr(scenario.target_mode, socket.AF_INET)
        return scenario.handshake(target_addr.sockaddr[0], target_addr.port)

    def start_proxy(self, name: str, scenario: Scenario) -> ProxyProcess:
        target_addr = self.target.addr(scenario.target_mode, socket.AF_INET)
        family = socket.AF_VSOCK if self.transport == "vm" else socket.AF_INET
        port = free_port(family)
        if self.transport == "vm":
            listen, listen_addr = f"VSOCK-LISTEN:{port}", f"vsock:any:{port}"
        else:
            listen, listen_addr = f"TCP4-LISTEN:{port},bind=127.0.0.1", f"tcp:127.0.0.1:{port}"
        allowlist = self.tmp / f"allowlist-{scenario.target_mode}.yaml"
        allowed = f"allowlist:\n- {{address: {target_addr.sockaddr[0]}, port: {target_addr.port}}}\n"
        if not allowlist.exists():
            allowlist.write_text(allowed)
        routed_config = ""
        if scenario.mode is not None:  # the allowlist, and the one service, on this proxy's port
            routed = self.tmp / f"routed-{scenario.mode}-{port}.yaml"
            routed.write_text(f"{allowed}services:\n- {{listen_port: {port}, mode: {scenario.mode}}}\n")
            routed_config = str(routed)
        workers = scenario.workers(self.params)
        context = {
            "listen": listen, "listen_port": port, "listen_addr": listen_addr,
            "target": f"{target_addr.sockaddr[0]}:{target_addr.port}",
            "target_host": target_addr.sockaddr[0], "target_port": target_addr.port,
            "allowlist": str(allowlist), "routed_config": routed_config, "workers": workers, "backlog": BACKLOG,
            "python": sys.executable, "repo": str(REPO), "transport": self.transport,
        }
        self.started_proxies += 1
        proxy = ProxyProcess(name, self.template(name, scenario), context, self.client_addr(port),
                             self.tmp / f"{name}.{self.started_proxies}.log", self.handshake(scenario))
        proxy.key = (name, scenario.target_mode, workers, scenario.mode)
        self.live.append(proxy)
        return proxy

    def stop(self, thing) -> None:
        if thing in self.live:
            self.live.remove(thing)
        thing.stop()

    def start_target(self) -> None:
        self.target = Target(self.params, self.transport == "vm" and "direct" in self.args.proxies,
                             self.tmp / "target.log", self.fast.binary if self.fast else None)
        self.live.append(self.target)

    # -- one scenario
    def run_scenario(self, scenario: Scenario) -> dict:
        """Run ``scenario`` --repeat times per proxy, proxies interleaved; returns the figures by proxy.

        Each scenario gets fresh proxy processes (and the concurrency scenario one per repetition,
        so that each peak RSS is its own), except under --smoke, where proxies with the same target
        and -w are kept across scenarios: start-up dominates a smoke run, above all in the VM.
        """
        proxies = [name for name in self.args.proxies if self.runs(name, scenario)]
        skipped = [name for name in self.args.proxies if name not in proxies]
        reuse = self.args.smoke
        fresh_each_rep = scenario.fresh_proxy and not reuse
        runs: dict[str, list[dict]] = {name: [] for name in proxies}
        running: dict[str, ProxyProcess] = {}
        logs: dict[str, list[Path]] = {name: [] for name in proxies}

        def launch(names: list[str]) -> None:
            started = []
            for name in names:
                key = (name, scenario.target_mode, scenario.workers(self.params), scenario.mode)
                cached = self.kept.get(name)
                if cached is not None and cached.key == key and cached.proc.poll() is None:
                    running[name] = cached
                    continue
                if cached is not None:
                    self.kept.pop(name)
                    self.stop(cached)
                try:
                    proxy = self.start_proxy(name, scenario)
                except HarnessError as exc:
                    runs[name].append({"error": str(exc)})
                    continue
                running[name] = proxy
                started.append(proxy)
            for proxy in started:  # started together, waited for together: one start-up delay, not four
                try:
                    proxy.wait_ready()
                except HarnessError as exc:
                    running.pop(proxy.name, None)
                    self.stop(proxy)
                    runs[proxy.name].append({"error": str(exc)})
            for name, proxy in running.items():
                if proxy.log_path not in logs[name]:
                    logs[name].append(proxy.log_path)

        def retire() -> None:
            for name in list(running):
                proxy = running.pop(name)
                if reuse and proxy.proc.poll() is None:
                    self.kept[name] = proxy
                else:
                    self.stop(proxy)

        try:
            launch([n for n in proxies if n != "direct"])
            for rep in range(self.args.repeat):
                if fresh_each_rep and rep > 0:
                    retire()
                    launch([n for n in proxies if n != "direct"])
                for name in proxies:
                    if name != "direct" and name not in running:
                        continue  # failed to start; its error is recorded
                    result = self.run_once(scenario, name, running.get(name))
                    runs[name].append(result)
                    log(f"  {scenario.name} {rep + 1}/{self.args.repeat} {name:<12} {summarize_run(scenario, result)}")
        finally:
            retire()
        # Logs are scanned now for the log lines of this scenario; a kept proxy's log goes on growing,
        # so under --smoke a later scenario's count includes the earlier ones' lines.
        results = {name: self.aggregate(scenario, runs[name], logs[name]) for name in proxies}
        for name in skipped:
            results[name] = {"skipped": scenario.lacks, "median": {m.key: None for m in scenario.metrics},
                             "failures": 0, "errors": {}, "harness_errors": [], "runs": [], "log": None}
        return results

    def run_once(self, scenario: Scenario, name: str, proxy: ProxyProcess | None) -> dict:
        if proxy is None:
            if self.transport == "vm":
                addr = vsock(self.target.addr(scenario.target_mode, socket.AF_VSOCK).port)
            else:
                addr = self.target.addr(scenario.target_mode, socket.AF_INET)
            hold = lambda: {}  # noqa: E731
        else:
            addr = proxy.client
            hold = proxy.memory
        params = self.params
        handshake = self.handshake(scenario)
        if handshake is not None:
            params = {**params, "preamble": handshake[0], "expect": handshake[1]}
        try:
            result = scenario.run(addr, params, hold, self.fast or load)
            self.target.check_alive()
            if proxy is not None:
                proxy.check_alive()
                result["peak_rss_mib"] = proxy.peak_rss_mib()
                proxy.settle()
        except HarnessError as exc:
            self.harness_errors += 1
            return {"error": str(exc), "failures": 0}
        except VsockForbidden:
            raise
        except Exception as exc:  # noqa: BLE001 - a harness bug must not lose the other figures
            self.harness_errors += 1
            return {"error": f"{type(exc).__name__}: {exc}", "failures": 0}
        return result

    def aggregate(self, scenario: Scenario, runs: list[dict], log_paths: list[Path]) -> dict:
        median_of = {m.key: median([r.get(m.key) for r in runs]) for m in scenario.metrics}
        errors: dict[str, int] = {}
        for run in runs:
            for kind, count in (run.get("errors") or {}).items():
                errors[kind] = errors.get(kind, 0) + count
        harness = [r["error"] for r in runs if r.get("error")]
        if harness:
            self.harness_errors += sum(1 for r in runs if r.get("error") and "failures" not in r)
        logs = [scan_log(path) for path in log_paths]
        return {
            "median": median_of,
            "failures": sum(r.get("failures") or 0 for r in runs),
            "errors": errors,
            "harness_errors": harness,
            "runs": runs,
            "log": {"lines": sum(l["lines"] for l in logs), "problems": sum(l["problems"] for l in logs),
                    "samples": [s for l in logs for s in l["samples"]][:5]} if log_paths else None,
        }


def add_ratios(scenario: Scenario, results: dict, earlier: dict | None = None) -> None:
    """Each proxy's ratios to direct and socat; with a baseline scenario in ``earlier`` (the report's
    scenarios so far), to its own figures there, and the extra time per connection that this costs."""
    baseline = (earlier or {}).get(scenario.baseline, {}).get("results", {}) if scenario.baseline else {}
    for name, entry in results.items():
        if scenario.baseline:
            theirs = baseline.get(name, {}).get("median", {})
            entry[f"vs_{scenario.baseline}"] = {
                m.key: entry["median"].get(m.key) / theirs[m.key]
                if entry["median"].get(m.key) is not None and theirs.get(m.key) else None
                for m in scenario.metrics}
            mine, base = entry["median"].get("conns_per_s"), theirs.get("conns_per_s")
            # a connection's share of the machine: 1/(conn/s); the handshake adds the difference
            entry["extra_us_per_connection"] = 1e6 * (1 / mine - 1 / base) if mine and base else None
        for base in ("direct", "socat"):
            ratios = {}
            for metric in scenario.metrics:
                if not metric.ratio:
                    continue
                mine = entry["median"].get(metric.key)
                theirs = results.get(base, {}).get("median", {}).get(metric.key)
                ratios[metric.key] = mine / theirs if mine is not None and theirs else None
            entry[f"vs_{base}"] = ratios


# --------------------------------------------------------------------------- report

def render_table(report: dict) -> str:
    out = []
    proxies = report["proxies"]
    has_socat = "socat" in proxies
    out.append(f"vsock proxy benchmark: transport={report['transport']}{' (smoke)' if report['smoke'] else ''}, "
               f"median of {report['repeat']}; xd = ratio to direct, xs = ratio to socat")
    m = report["machine"]
    out.append(f"machine: {m['cores']} cores ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, "
               f"gevent {m['gevent']}, {m['socat']}; target and load generators: {report['load_generator']}; "
               f"RLIMIT_NOFILE {m['nofile'][0]}")
    for scenario in SCENARIOS:
        if scenario.name not in report["scenarios"]:
            continue
        entry = report["scenarios"][scenario.name]
        out.append("")
        out.append(f"{scenario.name}: {entry['description']} (-w {entry['workers']})")
        baseline = scenario.baseline
        header = ["proxy"]
        for metric in scenario.metrics:
            header.append(metric.label)
            if metric.ratio:
                header.append("xd")
                if has_socat:
                    header.append("xs")
            if baseline:
                header.append(f"x {baseline}")
        header.append("failures")
        rows = [header]
        skipped = [name for name in proxies if entry["results"][name].get("skipped")]
        for name in proxies:
            res = entry["results"][name]
            if res.get("skipped"):
                continue
            row = [name]
            for metric in scenario.metrics:
                row.append(fmt(res["median"].get(metric.key)))
                if metric.ratio:
                    row.append(fmt_ratio(res["vs_direct"].get(metric.key)))
                    if has_socat:
                        row.append(fmt_ratio(res["vs_socat"].get(metric.key)))
                if baseline:
                    row.append(fmt_ratio(res[f"vs_{baseline}"].get(metric.key)))
            row.append(str(res["failures"]) + (" !" if res["harness_errors"] else ""))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            out.append("  " + "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                        for i, cell in enumerate(row)))
        if skipped:
            out.append(f"  not run ({entry['results'][skipped[0]]['skipped']}): {', '.join(skipped)}")
        if baseline:
            if baseline not in report["scenarios"]:
                out.append(f"  x {baseline}: -, {baseline} was not in this run (add it to --scenarios)")
            for name in proxies:
                res = entry["results"][name]
                extra = res.get("extra_us_per_connection")
                if res.get("skipped") or extra is None:
                    continue
                ratio = res[f"vs_{baseline}"]
                out.append(f"  handshake cost, {name}: conn/s {fmt_ratio(ratio.get('conns_per_s'))}x and p99 "
                           f"{fmt_ratio(ratio.get('p99_ms'))}x {baseline}'s, {extra:+.0f} us of the machine "
                           f"per connection")
    notes = []
    for scenario_name, entry in report["scenarios"].items():
        for name, res in entry["results"].items():
            if res["errors"]:
                notes.append(f"  {scenario_name}/{name}: failures by cause {res['errors']}")
            for error in res["harness_errors"][:2]:
                notes.append(f"  {scenario_name}/{name}: HARNESS ERROR {error}")
            if res["log"] and res["log"]["problems"]:
                notes.append(f"  {scenario_name}/{name}: {res['log']['problems']} warning/error log line(s), "
                             f"e.g. {res['log']['samples'][0]}")
    if notes:
        out.append("")
        out.append("problems:")
        out.extend(notes)
    out.append("")
    loads = [x for e in report["scenarios"].values() for x in e.get("loadavg", []) if x is not None]
    busy = f"; 1-min load average {min(loads):.1f} to {max(loads):.1f} on {m['cores']} cores" if loads else ""
    before = report.get("busy_cores_before")
    if before is not None:
        busy += f"; {before:.1f} cores busy before it started"
    out.append(f"total {report['elapsed_s']:.1f} s{busy}")
    return "\n".join(out)


def loadavg() -> float | None:
    """The 1-minute load average: other work on the machine skews every figure; the JSON keeps it."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def busy_cores(seconds: float) -> float | None:
    """How many cores' worth of CPU the machine spent over ``seconds`` (before we start anything)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def machine_info() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    socat = "socat not installed"
    if shutil.which("socat"):
        try:
            text = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10).stdout
            socat = next((l.strip() for l in text.splitlines() if l.startswith("socat version")), "socat")
            socat = " ".join(socat.split()[:3])
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)), "loadavg_at_start": loadavg(),
            "python": platform.python_version(), "gevent": gevent.__version__, "socat": socat}


# --------------------------------------------------------------------------- set-up

FASTLOAD_SOURCE = REPO / "scripts" / "bench_lib" / "fastload.c"


def fastload_cache() -> Path:
    digest = hashlib.sha256(FASTLOAD_SOURCE.read_bytes()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vsockproxy-bench" / f"fastload-{digest}"


def fastload_binary(scratch: Path | None = None) -> str | None:
    """The compiled C target and load generator: cached per source hash, built on first use.

    Built with the system C compiler (cc/gcc); None (the Python fallback) when there is none or it fails.
    """
    cached = fastload_cache()
    if os.access(cached, os.X_OK):
        return str(cached)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log(f"{PROG}: no C compiler: the target and load generators run in Python (slower; see --load)")
        return None
    for where in (cached.parent, scratch):  # the cache, else (read-only home, e.g. in the VM) scratch
        if where is None:
            continue
        try:
            where.mkdir(parents=True, exist_ok=True)
            out = where / f"{cached.name}.{os.getpid()}.tmp"
            result = subprocess.run([compiler, "-O2", "-pthread", "-o", str(out), str(FASTLOAD_SOURCE)],
                                    capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log(f"{PROG}: cannot build fastload in {where}: {exc}")
            continue
        if result.returncode != 0:
            log(f"{PROG}: fastload.c did not compile ({result.stderr.strip()[-300:]}); using the Python load")
            out.unlink(missing_ok=True)
            return None
        final = where / cached.name
        os.replace(out, final)
        return str(final)
    return None


def raise_nofile(needed: int) -> None:
    if not _raise_nofile(needed):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        log(f"{PROG}: warning: cannot raise RLIMIT_NOFILE above its hard limit {hard} here (need about "
            f"{needed}): a one-process proxy holding N connections needs 2N+ descriptors, so the "
            "concurrency scenario may fail with EMFILE")


def ensure_socat(templates: dict[str, str], proxies: list[str]) -> None:
    wanted = any(shlex.split(templates[name])[0] == "socat" for name in proxies if name in templates)
    if not wanted or shutil.which("socat"):
        return
    if in_vm():
        raise SystemExit(f"{PROG}: socat is not installed; install it on the host (apt-get install -y socat)")
    log(f"{PROG}: socat is missing; installing Debian's socat")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "socat"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    if subprocess.run(install, **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], **quiet)
        subprocess.run(install, **quiet)
    if not shutil.which("socat"):
        raise SystemExit(f"{PROG}: socat is missing and apt-get could not install it")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=("host", "vm"), default="host")
    parser.add_argument("--proxies", help=f"comma-separated, from {','.join(DEFAULT_PROXIES)} and --proxy-cmd names "
                                          f"(default: all of those)")
    parser.add_argument("--proxy-cmd", action="append", default=[], metavar="NAME=TEMPLATE",
                        help="add or replace a proxy's command template (see the placeholders above); "
                             f"NAME@MODE=TEMPLATE: its template for the scenarios of a request-routed MODE "
                             f"({', '.join(ROUTED_TEMPLATES)}), typically with {{routed_config}}")
    parser.add_argument("--scenarios", default=",".join(SCENARIO_NAMES),
                        help=f"comma-separated, from {','.join(SCENARIO_NAMES)} (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per figure, at least 3 (default: 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and durations: the whole run in seconds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"override a size or duration: {', '.join(sorted(FULL))}")
    parser.add_argument("--load", choices=("auto", "c", "python"), default="auto",
                        help="target server and connection load generators: C (bench_lib/fastload.c, built "
                             "with cc) or Python; auto: C when it builds (default)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure (and each run's) to FILE")
    parser.add_argument("--upstream", metavar="DIR", default=os.environ.get(UPSTREAM_ENV) or None,
                        help=f"add an '{UPSTREAM}' row: AWS's vsock-proxy, DIR/{UPSTREAM_BINARIES['host']} on the "
                             f"host transport, DIR/{UPSTREAM_BINARIES['vm']} in the VM (default: ${UPSTREAM_ENV})")
    parser.add_argument("--vm-timeout", type=float, default=5400, help="vm transport: limit for the whole VM run "
                                                                          "in seconds (default: 5400)")
    parser.add_argument("--vm-mem", type=int, default=4096, help="vm transport: guest memory in MiB (default: 4096)")
    args = parser.parse_args(argv)

    templates = dict(TEMPLATES)
    routed = {mode: dict(by_name) for mode, by_name in ROUTED_TEMPLATES.items()}
    custom = []
    for item in args.proxy_cmd:
        name, sep, template = item.partition("=")
        name, at, mode = name.partition("@")
        if not sep or not name or not template.strip() or name == "direct" or (at and mode not in routed):
            parser.error(f"--proxy-cmd wants NAME=TEMPLATE or NAME@MODE=TEMPLATE (NAME not 'direct', MODE "
                         f"one of {', '.join(routed)}), got {item!r}")
        (routed[mode] if at else templates)[name] = template
        if name not in DEFAULT_PROXIES and name not in custom:
            custom.append(name)
    upstream = upstream_template(args.upstream, args.transport) if UPSTREAM not in templates else None
    if upstream is not None:
        templates[UPSTREAM] = upstream
        custom.insert(0, UPSTREAM)
    args.proxies = (args.proxies.split(",") if args.proxies else DEFAULT_PROXIES + custom)
    args.proxies = [p for p in dict.fromkeys(n.strip() for n in args.proxies) if p]
    if UPSTREAM in args.proxies and UPSTREAM not in templates:
        if args.upstream is None:  # asked for by name, but never said where it is
            log(f"{PROG}: note: no {UPSTREAM} row: give --upstream DIR or ${UPSTREAM_ENV}")
        args.proxies.remove(UPSTREAM)
    known = [*templates, *(name for by_name in routed.values() for name in by_name if name not in templates)]
    unknown = [p for p in args.proxies if p != "direct" and p not in known]
    if unknown or not args.proxies:
        parser.error(f"unknown proxy {', '.join(unknown) or '(none)'}; known: direct, {', '.join(known)}")
    args.templates = templates
    args.routed_templates = routed
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in SCENARIO_NAMES]
    if bad or not args.scenarios:
        parser.error(f"unknown scenario {', '.join(bad) or '(none)'}; known: {', '.join(SCENARIO_NAMES)}")
    if args.repeat < 1 or (args.repeat < 3 and not args.smoke):
        parser.error("--repeat must be at least 3 (at least 1 with --smoke)")
    params = dict(FULL)
    if args.transport == "vm":
        params.update(VM)
    if args.smoke:
        params.update(SMOKE)
        if args.transport == "vm":
            params.update(VM_SMOKE)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in FULL:
            parser.error(f"--set wants KEY=VALUE with KEY one of {', '.join(sorted(FULL))}, got {item!r}")
        try:
            params[key] = type(FULL[key])(value)
        except ValueError:
            parser.error(f"--set {key}: {value!r} is not a {type(FULL[key]).__name__}")
    args.params = params
    return args


def upstream_template(directory: str | None, transport: str) -> str | None:
    """The command template of upstream's build for ``transport`` in ``directory``; None, with a note, if absent."""
    if not directory:
        return None
    binary = Path(directory).resolve() / UPSTREAM_BINARIES[transport]
    if not os.access(binary, os.X_OK):
        log(f"{PROG}: note: no {UPSTREAM} row: {binary} is missing or not executable "
            "(../shared/tools/build-upstream makes it)")
        return None
    return UPSTREAM_TEMPLATE.format(binary=shlex.quote(str(binary)))


# --------------------------------------------------------------------------- the VM hop

def run_bench_in_vm(argv: list[str], args: argparse.Namespace) -> int:
    """On the host: re-run this very command inside scripts/vsock-vm, and bring its JSON back."""
    ensure_socat(args.templates, args.proxies)
    if args.load != "python":
        fastload_binary()  # built on the host, where the cache is writable; the VM sees it read-only
    if UPSTREAM in args.proxies and "--upstream" not in argv:  # from the environment, which stays outside
        argv = [*argv, "--upstream", str(Path(args.upstream).resolve())]
    return run_in_vm(PROG, argv, args.json, ["--timeout", str(int(args.vm_timeout)), "--mem", str(args.vm_mem)])


# --------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    json_stdout = "--json-stdout" in argv
    argv = [a for a in argv if a != "--json-stdout"]
    args = parse_args(argv)
    if args.transport == "vm" and not in_vm():
        return run_bench_in_vm(argv, args)
    if args.transport == "host" and in_vm():
        log(f"{PROG}: note: host transport inside the VM measures TCP stand-ins under emulation")
    ensure_socat(args.templates, args.proxies)
    raise_nofile(3 * args.params["concurrency_connections"] + 4096)

    import greenlet
    main_greenlet = greenlet.getcurrent()

    def terminate(signum, _frame):
        """SIGTERM/SIGHUP/SIGINT end the run like Ctrl-C, always in the main greenlet (quietly)."""
        if greenlet.getcurrent() is main_greenlet:
            raise KeyboardInterrupt
        main_greenlet.throw(KeyboardInterrupt)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, terminate)

    busy = busy_cores(0.3 if args.smoke else 2.0)
    if busy is not None and busy > 0.3:
        log(f"{PROG}: warning: the machine is already busy ({busy:.1f} cores in use before the bench); "
            "figures will be noisy")
    started = time.monotonic()
    scenarios = [s for s in SCENARIOS if s.name in args.scenarios]
    report = {
        "transport": args.transport, "smoke": args.smoke, "repeat": args.repeat,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
        "command": "scripts/bench " + shlex.join(argv), "params": args.params,
        "load_generator": None, "busy_cores_before": busy,
        "proxies": args.proxies, "templates": {n: args.templates.get(n) for n in args.proxies},
        "routed_templates": {mode: {n: t for n, t in by_name.items() if n in args.proxies}
                             for mode, by_name in args.routed_templates.items()},
        "scenarios": {},
    }
    bench = Bench(args, args.params, args.templates)
    report["load_generator"] = bench.load_kind
    try:
        bench.start_target()
        for scenario in scenarios:
            log(f"{PROG}: {scenario.name}: {scenario.describe(args.params)}")
            scenario_started = time.monotonic()
            load_before = loadavg()
            results = bench.run_scenario(scenario)
            add_ratios(scenario, results, report["scenarios"])
            report["scenarios"][scenario.name] = {
                "description": scenario.describe(args.params), "workers": scenario.workers(args.params),
                "metrics": {m.key: {"label": m.label, "better": m.better, "ratio": m.ratio} for m in scenario.metrics},
                "results": results, "seconds": time.monotonic() - scenario_started,
                "loadavg": [load_before, loadavg()],
            }
    except KeyboardInterrupt:
        log(f"{PROG}: interrupted; stopping what it started")
        bench.close()
        return 130
    except (VsockForbidden, HarnessError) as exc:
        bench.close()
        log(f"{PROG}: error: {exc}")
        return 1
    finally:
        bench.close()
    report["elapsed_s"] = time.monotonic() - started
    report["harness_errors"] = bench.harness_errors
    output = render_table(report) + "\n"
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if json_stdout:
        begin, end = markers(PROG)
        output += f"{begin}\n{json.dumps(report, indent=2)}\n{end}\n"
    write_all(sys.stdout, output)
    return 1 if bench.harness_errors else 0

