#!/usr/bin/env python3
"""The memory and reload figures of ``--processes N``: what issue 20 asks to choose a process model by.

    footprint.py [--processes N] [--connections C] [--reloads R]

Runs the real ``vsock-proxy`` command on a TCP stand-in listener (run_vsockproxy.py --stand-in),
relaying to a target in this process on 127.0.0.1, and prints:

* the PSS of the whole process tree (the parent and every descendant, from
  /proc/PID/smaps_rollup) at idle and with C connections open through it;
* the time from SIGHUP to ``reload applied`` (the new generation accepts, the old one is
  retired), and to the first connection through the proxy after it, for each of R reloads.

Nothing here connects AF_VSOCK; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def tree_of(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
    tree, frontier = [pid], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        tree += sorted(frontier)
    return tree


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mib(pid: int) -> tuple[float, int]:
    processes = tree_of(pid)
    return sum(pss_kib(process) for process in processes) / 1024, len(processes)


class Target:
    """Accepts and holds every connection; counts them."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return


class Proxy:
    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, STAND_IN_PORTS="", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "run_vsockproxy.py"), "--stand-in", *args],
                                     cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stderr], daemon=True).start()

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if needle in line:
                return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="2")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--reloads", type=int, default=5)
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    target = Target()
    config = f"/tmp/footprint-{os.getpid()}.yaml"
    with open(config, "w") as file:
        file.write(f"allowlist:\n- {{address: 127.0.0.1, port: {target.port}}}\n")
    proxy = Proxy(["--processes", options.processes, "-w", str(options.connections + 10), "--config", config,
                   "5005", "127.0.0.1", str(target.port)])
    clients: list[socket.socket] = []
    try:
        line = proxy.wait_for("stand-in listener: vsock port 5005 is tcp")
        host, _, port = line.rpartition(" ")[2].rpartition(":")
        address = (host, int(port))
        proxy.wait_for("listening on vsock port 5005")
        time.sleep(2)
        idle, count = tree_pss_mib(proxy.proc.pid)
        print(f"idle: PSS {idle:.1f} MiB in {count} processes")
        for _ in range(options.connections):
            clients.append(socket.create_connection(address, timeout=10))
        deadline = time.monotonic() + 60
        while len(target.held) < options.connections and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        busy, count = tree_pss_mib(proxy.proc.pid)
        print(f"{len(target.held)} open connections: PSS {busy:.1f} MiB in {count} processes")
        for client in clients:
            client.close()
        clients = []
        time.sleep(1)
        applied, serving = [], []
        for _ in range(options.reloads):
            before = len(target.held)
            sent = time.monotonic()
            proxy.proc.send_signal(signal.SIGHUP)
            proxy.wait_for("reload applied")
            applied.append(time.monotonic() - sent)
            clients.append(socket.create_connection(address, timeout=10))
            while len(target.held) <= before:
                time.sleep(0.001)
            serving.append(time.monotonic() - sent)
            time.sleep(1)
        print(f"SIGHUP to 'reload applied': median {statistics.median(applied):.3f} s "
              f"(min {min(applied):.3f}, max {max(applied):.3f}); to the next connection served after it: "
              f"median {statistics.median(serving):.3f} s")
    finally:
        for client in clients:
            client.close()
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.proc.wait(timeout=60)
        os.unlink(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
