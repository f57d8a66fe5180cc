"""Soak test: mixed traffic through vsockproxy for a while, every byte hash-checked, RSS sampled.

    scripts/soak [--minutes M | --seconds S] [--transport host|vm] [--json FILE]

Three kinds of client run side by side against one echo target, through one proxy, until time is up:
  bulk       2 at a time: connections that stream 1-32 MiB up while the echo streams it back down;
  ping-pong  4 at a time: connections of 100 round trips of 1 B-16 KiB messages each;
  churn      8 at a time: short connections (0-512 bytes, then half-close and read to EOF).
Each connection's bytes are hashed as sent and as echoed back, and the two SHA-256 digests must
match (a mismatch counts, a connection that fails or hangs for 60 s counts as a failure).  The
proxy's RSS and open fds are sampled every 10 s (every 2 s for runs under 2 minutes).

Transports
  host  the real ``vsock-proxy`` command (CLI, supervisor, logging) whose vsock listener is
        swapped for a TCP listener on 127.0.0.1; clients and target are TCP.  Runs anywhere.
  vm    the real command on real AF_VSOCK, clients on CID 1: from the host, soak re-runs itself
        inside scripts/vsock-vm (the only place where a vsock connect is allowed).

Verdict: PASS when the last RSS sample is within +5% (or +2 MiB, whichever is larger) of the first
sample after the warm-up (the first 20% of the run, 5 s to 60 s), no connection failed, no hash
mismatched, the proxy logged no warning, error or traceback and one clean ``closed`` line per
connection, it holds no socket but its listener afterwards (other fds are reported, not judged), and it
exits 0 on SIGTERM.
Exit status: 0 PASS, 1 FAIL, 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import gevent.socket
from gevent.server import StreamServer

from bench_lib.drive import IN_VM, REPO, log, markers, raise_nofile, run_in_vm, write_all

PROG = "soak"
VMADDR_CID_LOCAL = 1
IO_TIMEOUT = 60.0
MIB = 1 << 20
GROWTH_FRACTION = 0.05
GROWTH_FLOOR_KIB = 2 * 1024
WORKERS = {"bulk": 2, "pingpong": 4, "churn": 8}
PINGPONG_ROUND_TRIPS = 100
CLOSED_LINE = re.compile(r" INFO closed enclave=\S+ target=\S+ up=\d+ down=\d+ duration=\S+ end=(\S+)$")

#: The host stand-in: the real CLI, handed a TCP listener factory on 127.0.0.1 (port picked by the
#: kernel and logged before "listening on").
STAND_IN_RUNNER = REPO / "scripts" / "bench_lib" / "run_vsockproxy.py"


# --------------------------------------------------------------------------- the proxy under test

class Proxy:
    """The proxy process: started with its stderr in a file, sampled through /proc, stopped by SIGTERM."""

    def __init__(self, transport: str, target_port: int, workdir: Path) -> None:
        self.transport = transport
        config = workdir / "allowlist.yaml"
        config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {target_port}}}\n")
        self.log_path = workdir / "proxy.log"
        self._log_file = open(self.log_path, "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VSOCK_PROXY_")}
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        # One process: the soak samples its RSS and counts its sockets, which a parent of workers would not show.
        options = ["--processes", "1", "-w", "64", "--config", str(config)]
        if transport == "host":
            argv = [sys.executable, str(STAND_IN_RUNNER), "--stand-in", *options, "5005", "127.0.0.1",
                    str(target_port)]
        else:
            self.vsock_port = free_vsock_port()
            argv = [*vsock_proxy_command(), *options, str(self.vsock_port), "127.0.0.1", str(target_port)]
        self.command = argv
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._log_file)
        self.pid = self.proc.pid
        self.address = self._wait_listening(timeout=120 if IN_VM else 30)

    def _wait_listening(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            if "listening on vsock port" in text:
                if self.transport == "vm":
                    return (VMADDR_CID_LOCAL, self.vsock_port)
                found = re.search(r"stand-in listener: vsock port \d+ is tcp ([\d.]+):(\d+)", text)
                return (found[1], int(found[2]))
            if self.proc.poll() is not None:
                raise SystemExit(f"{PROG}: the proxy exited ({self.proc.returncode}) before listening:\n{text}")
            time.sleep(0.05)
        self.kill()
        raise SystemExit(f"{PROG}: the proxy did not start listening within {timeout:.0f} s")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def socket_fds(self) -> int:
        """Its sockets: the listener, plus two per open connection."""
        count = 0
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                count += os.readlink(f"/proc/{self.pid}/fd/{name}").startswith("socket:")
            except FileNotFoundError:
                pass
        return count

    def settled_fds(self, quiet: float = 1.0, timeout: float = 30.0) -> int:
        """The fd count once it has stopped changing for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last, since = self.fds(), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            gevent.sleep(0.1)
            now = self.fds()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            gevent.sleep(0.05)
        code = self.proc.poll()
        if code is None:
            self.kill()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


def free_vsock_port() -> int:
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:  # bind only: never leaves the machine
        probe.bind((socket.VMADDR_CID_ANY, 0xFFFFFFFF))
        return probe.getsockname()[1]


def vsock_proxy_command() -> list[str]:
    """The installed console script (this interpreter's, else the checkout's venv's), else the module."""
    for script in (Path(sys.executable).parent / "vsock-proxy", REPO / ".venv" / "bin" / "vsock-proxy"):
        if script.exists():
            return [str(script)]
    return [sys.executable, "-m", "vsockproxy"]


# --------------------------------------------------------------------------- the target and the clients

class Tally:
    def __init__(self) -> None:
        self.connections = {kind: 0 for kind in WORKERS}
        self.round_trips = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.failures = 0
        self.mismatches = 0
        self.examples: list[str] = []
        self.target_errors = 0

    def failed(self, kind: str, exc: BaseException) -> None:
        self.failures += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {type(exc).__name__}: {exc}")

    def mismatched(self, kind: str, detail: str) -> None:
        self.mismatches += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: hash mismatch: {detail}")

    @property
    def total(self) -> int:
        return sum(self.connections.values())


def echo_target(tally: Tally) -> StreamServer:
    def handle(sock, _address) -> None:
        sock.settimeout(IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray(256 * 1024)
        view = memoryview(buffer)
        try:
            while True:
                count = sock.recv_into(buffer)
                if not count:
                    break
                sock.sendall(view[:count])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            tally.target_errors += 1

    server = StreamServer(("127.0.0.1", 0), handle, backlog=1024)
    server.start()
    return server


class Source:
    """Pseudo-random bytes to send: slices of one random block, from a random offset."""

    def __init__(self, seed: int) -> None:
        self.block = random.Random(seed).randbytes(4 * MIB)
        self.view = memoryview(self.block + self.block[:256 * 1024])  # a slice may run over the end

    def chunks(self, rng: random.Random, total: int, size: int = 256 * 1024):
        offset = rng.randrange(len(self.block))
        while total > 0:
            take = min(size, total)
            yield self.view[offset:offset + take]
            total -= take
            offset = (offset + take) % len(self.block)


def connect(address):
    family = socket.AF_VSOCK if isinstance(address[0], int) else socket.AF_INET
    if family == socket.AF_VSOCK and not IN_VM:
        raise RuntimeError("refusing to connect AF_VSOCK outside the test VM (VSOCKPROXY_IN_VM is not 1)")
    sock = gevent.socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.connect(address)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def read_to_eof(sock, digest) -> int:
    buffer = bytearray(256 * 1024)
    total = 0
    while True:
        count = sock.recv_into(buffer)
        if not count:
            return total
        digest.update(memoryview(buffer)[:count])
        total += count
        gevent.sleep(0)  # a socket with data never blocks: let the other clients have their turn


def bulk_once(address, source: Source, rng: random.Random, tally: Tally) -> None:
    size = rng.randint(1 * MIB, 32 * MIB)
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    with connect(address) as sock:
        def send() -> None:
            for chunk in source.chunks(rng, size):
                sent.update(chunk)
                sock.sendall(chunk)
                gevent.sleep(0)
            sock.shutdown(socket.SHUT_WR)

        sender = gevent.spawn(send)
        try:
            received = read_to_eof(sock, echoed)
            sender.get(timeout=IO_TIMEOUT)
        finally:
            sender.kill()
    tally.bytes_up += size
    tally.bytes_down += received
    if received != size or sent.digest() != echoed.digest():
        tally.mismatched("bulk", f"sent {size} bytes, {received} came back, digests differ")


def recv_exactly(sock, size: int, digest) -> int:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if not count:
            break
        got += count
    digest.update(view[:got])
    return got


def pingpong_once(address, source: Source, rng: random.Random, tally: Tally) -> None:
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    up = down = 0
    with connect(address) as sock:
        for _ in range(PINGPONG_ROUND_TRIPS):
            size = rng.randint(1, 16 * 1024)
            message = next(source.chunks(rng, size, size))
            sent.update(message)
            sock.sendall(message)
            got = recv_exactly(sock, size, echoed)
            up, down = up + size, down + got
            tally.round_trips += 1
            if got != size:
                break
        sock.shutdown(socket.SHUT_WR)
        down += read_to_eof(sock, echoed)
    tally.bytes_up += up
    tally.bytes_down += down
    if up != down or sent.digest() != echoed.digest():
        tally.mismatched("pingpong", f"sent {up} bytes, {down} came back, digests differ")


def churn_once(address, source: Source, rng: random.Random, tally: Tally) -> None:
    size = rng.choice((0, rng.randint(1, 512)))
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    with connect(address) as sock:
        if size:
            message = next(source.chunks(rng, size, size))
            sent.update(message)
            sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        received = read_to_eof(sock, echoed)
    tally.bytes_up += size
    tally.bytes_down += received
    if received != size or sent.digest() != echoed.digest():
        tally.mismatched("churn", f"sent {size} bytes, {received} came back, digests differ")


RUNS = {"bulk": bulk_once, "pingpong": pingpong_once, "churn": churn_once}


def worker(kind: str, index: int, address, source: Source, deadline: float, tally: Tally) -> None:
    rng = random.Random(f"{kind}-{index}")
    while time.monotonic() < deadline:
        tally.connections[kind] += 1
        try:
            RUNS[kind](address, source, rng, tally)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            tally.failed(kind, exc)
            gevent.sleep(0.1)


# --------------------------------------------------------------------------- the run

def plan_times(duration: float) -> tuple[float, float]:
    """(sample interval, warm-up) for a run of ``duration`` seconds."""
    interval = 10.0 if duration >= 120 else 2.0
    warmup = min(60.0, max(5.0, 0.2 * duration))
    warmup = interval * -(-warmup // interval)  # on a sample
    return interval, warmup


def scan_proxy_log(path: Path) -> dict:
    closed = eof = 0
    warnings, errors, other = [], [], []
    for line in path.read_text(errors="replace").splitlines():
        match = CLOSED_LINE.search(line)
        if match:
            closed += 1
            eof += match[1] == "eof"
            if match[1] != "eof" and len(other) < 5:
                other.append(line)
        elif " WARNING " in line:
            warnings.append(line)
        elif " ERROR " in line or "Traceback" in line or line.startswith("ERROR:"):
            errors.append(line)
    return {"closed": closed, "closed_eof": eof, "warnings": len(warnings), "errors": len(errors),
            "examples": (errors + warnings + other)[:10]}


def soak(duration: float, transport: str) -> dict:
    interval, warmup = plan_times(duration)
    tally = Tally()
    target = echo_target(tally)
    workdir = Path(tempfile.mkdtemp(prefix="vsockproxy-soak-"))
    proxy = None
    try:
        proxy = Proxy(transport, target.server_port, workdir)
        source = Source(seed=20240601)
        proxy.settled_fds()
        sockets_before, fds_before = proxy.socket_fds(), proxy.fds()
        what = "vsock-proxy on a TCP stand-in listener" if transport == "host" else shlex.join(proxy.command)
        log(f"{PROG}: {transport} transport, {duration:g} s of traffic (warm-up {warmup:g} s, "
            f"a sample every {interval:g} s); proxy pid {proxy.pid}: {what} at {proxy.address}")
        header = f"{'t/s':>6} {'RSS/MiB':>8} {'fds':>5} {'CPU/s':>7} {'conns':>8} {'MiB moved':>10} " \
                 f"{'fail':>5} {'mism':>5}"
        log(header)
        started = time.monotonic()
        deadline = started + duration
        workers = [gevent.spawn(worker, kind, index, proxy.address, source, deadline, tally)
                   for kind, count in WORKERS.items() for index in range(count)]
        samples = []
        next_at = started + interval
        while True:
            gevent.sleep(max(0.0, next_at - time.monotonic()))
            if proxy.proc.poll() is not None:
                tally.failed("proxy", RuntimeError(f"the proxy exited with {proxy.proc.returncode}"))
                break
            sample = {"t": round(next_at - started, 1), "rss_kib": proxy.rss_kib(), "fds": proxy.fds(),
                      "cpu_s": round(proxy.cpu_seconds(), 2), "connections": tally.total,
                      "bytes": tally.bytes_up + tally.bytes_down, "failures": tally.failures,
                      "mismatches": tally.mismatches}
            samples.append(sample)
            log(f"{sample['t']:>6.0f} {sample['rss_kib'] / 1024:>8.1f} {sample['fds']:>5} {sample['cpu_s']:>7.1f} "
                f"{sample['connections']:>8} {sample['bytes'] / MIB:>10.0f} {sample['failures']:>5} "
                f"{sample['mismatches']:>5}")
            if next_at >= deadline - 1e-6:
                break
            next_at = min(deadline, next_at + interval)
        gevent.joinall(workers, timeout=IO_TIMEOUT + 30)
        for straggler in [w for w in workers if not w.ready()]:
            straggler.kill()
            tally.failed("worker", RuntimeError("still running 90 s after the end"))
        elapsed = time.monotonic() - started
        fds_after = sockets_after = None
        if proxy.proc.poll() is None:
            fds_after = proxy.settled_fds()
            sockets_after = proxy.socket_fds()
        exit_code = proxy.stop()
    finally:
        if proxy is not None:
            proxy.kill()
        target.stop(timeout=1)
    proxy_log = scan_proxy_log(proxy.log_path)
    shutil.rmtree(workdir, ignore_errors=True)

    after_warmup = [s for s in samples if s["t"] >= warmup - 1e-6]
    baseline = after_warmup[0]["rss_kib"] if after_warmup else None
    final = samples[-1]["rss_kib"] if samples else None
    limit = max(GROWTH_FRACTION * baseline, GROWTH_FLOOR_KIB) if baseline else 0
    checks = {
        "rss_no_growth": baseline is not None and len(after_warmup) >= 2 and final - baseline <= limit,
        "zero_failures": tally.failures == 0 and tally.target_errors == 0,
        "zero_mismatches": tally.mismatches == 0,
        "proxy_log_clean": proxy_log["warnings"] == 0 and proxy_log["errors"] == 0
                           and proxy_log["closed"] == proxy_log["closed_eof"] == tally.total,
        "sockets_back": sockets_after == sockets_before,
        "proxy_exit_0": exit_code == 0,
    }
    return {
        "transport": transport,
        "duration_s": duration,
        "elapsed_s": round(elapsed, 1),
        "sample_interval_s": interval,
        "warmup_s": warmup,
        "workers": WORKERS,
        "samples": samples,
        "baseline_rss_kib": baseline,
        "final_rss_kib": final,
        "peak_rss_kib": max((s["rss_kib"] for s in after_warmup), default=None),
        "growth_kib": None if baseline is None else final - baseline,
        "growth_limit_kib": round(limit),
        "connections": {**tally.connections, "total": tally.total},
        "round_trips": tally.round_trips,
        "bytes_up": tally.bytes_up,
        "bytes_down": tally.bytes_down,
        "failures": tally.failures,
        "target_errors": tally.target_errors,
        "mismatches": tally.mismatches,
        "failure_examples": tally.examples,
        "proxy_log": proxy_log,
        "fds": {"before": fds_before, "after": fds_after, "sockets_before": sockets_before,
                "sockets_after": sockets_after},
        "proxy_exit_code": exit_code,
        "proxy_cpu_s": samples[-1]["cpu_s"] if samples else None,
        "checks": checks,
        "verdict": "pass" if all(checks.values()) else "fail",
    }


def summary(report: dict) -> str:
    mib = 1024
    lines = []
    if report["baseline_rss_kib"] is not None:
        lines.append(f"RSS {report['baseline_rss_kib'] / mib:.1f} MiB at {report['warmup_s']:g} s (after warm-up) -> "
                     f"{report['final_rss_kib'] / mib:.1f} MiB at the end: {report['growth_kib'] / mib:+.2f} MiB "
                     f"(limit +{report['growth_limit_kib'] / mib:.2f} MiB), peak {report['peak_rss_kib'] / mib:.1f} MiB")
    conns = report["connections"]
    moved = (report["bytes_up"] + report["bytes_down"]) / (1 << 30)
    lines.append(f"{conns['total']} connections (bulk {conns['bulk']}, ping-pong {conns['pingpong']}, "
                 f"churn {conns['churn']}), {report['round_trips']} round trips, {moved:.2f} GiB moved "
                 f"and hash-checked in {report['elapsed_s']:g} s")
    lines.append(f"{report['failures']} failures, {report['mismatches']} hash mismatches, "
                 f"{report['target_errors']} target errors")
    plog = report["proxy_log"]
    lines.append(f"proxy log: {plog['closed']} closed lines ({plog['closed_eof']} end=eof), {plog['warnings']} "
                 f"warnings, {plog['errors']} errors; open sockets {report['fds']['sockets_before']} -> "
                 f"{report['fds']['sockets_after']} (all fds {report['fds']['before']} -> {report['fds']['after']}); "
                 f"exit {report['proxy_exit_code']}")
    for example in report["failure_examples"] + plog["examples"]:
        lines.append(f"  e.g. {example}")
    failed = [name for name, ok in report["checks"].items() if not ok]
    lines.append("verdict: PASS" if not failed else f"verdict: FAIL ({', '.join(failed)})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the VM hop

# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, metavar="M", help="how long to run (default: 5)")
    length.add_argument("--seconds", type=float, metavar="S", help="how long to run, in seconds")
    parser.add_argument("--transport", choices=("host", "vm"), default="host",
                        help="host: TCP stand-in listener (default); vm: real vsock inside scripts/vsock-vm")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    duration = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 5)
    if not 5 <= duration <= 24 * 3600:
        parser.error(f"the run must last from 5 seconds to 24 hours, got {duration:g} s")
    args.duration = duration
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.transport == "vm" and not IN_VM:
        return run_in_vm(PROG, argv, args.json, ["--timeout", str(int(args.duration + 900))])
    if args.transport == "host" and IN_VM:
        log(f"{PROG}: note: host transport inside the VM measures TCP stand-ins under emulation")
    raise_nofile(4096)
    report = soak(args.duration, args.transport)
    report["command"] = shlex.join(["scripts/soak", *[a for a in argv if a != "--json-stdout"]])
    text = summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.json_stdout:
        begin, end = markers(PROG)
        write_all(sys.stdout, f"{begin}\n{json.dumps(report, indent=2)}\n{end}\n")
    write_all(sys.stderr, text + "\n")
    return 0 if report["verdict"] == "pass" else 1

