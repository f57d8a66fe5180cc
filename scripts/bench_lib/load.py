"""The load generators: one function per scenario, run in the bench's own process.

Streaming loads (bulk, aggregate, ping-pong) use plain blocking sockets with 1 MiB
buffers, one OS thread per stream, so the copies run at C speed with the GIL released.
Connection-heavy loads (#413, churn, concurrency, burst) use gevent sockets in one
hub: thousands of connections without thousands of threads.  Every loop is bounded
by a count and by a deadline, and every socket operation has a timeout.

Each function returns a dict of figures; ``failures`` counts operations that did not
complete correctly (errors, short or wrong replies), and ``errors`` samples their causes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from typing import Callable

from bench_lib.net import Addr, connect, require_vm

CHUNK = 1 << 20
MIB = 1 << 20
IO_TIMEOUT = 30.0


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-fraction * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"[:80]


class Failures:
    def __init__(self) -> None:
        self.count = 0
        self.kinds: Counter[str] = Counter()

    def add(self, kind: str) -> None:
        self.count += 1
        self.kinds[kind] += 1

    def report(self) -> dict:
        return {"failures": self.count, "errors": dict(self.kinds.most_common(5))}


class Deadline(Exception):
    pass


class HandshakeRefused(Exception):
    """The proxy's reply to a connection's preamble (e.g. an HTTP CONNECT) was not the one expected."""


HANDSHAKE_MAX = 8192


def handshake(sock, preamble: bytes, expect: bytes) -> bytes:
    """Send ``preamble``, read the reply through its blank line (CRLF CRLF), check it starts with ``expect``.

    Returns the bytes read past the blank line (the relay's first bytes, if any came with it).
    Raises HandshakeRefused for another reply, a close before the blank line, or more than 8 KiB.
    """
    sock.sendall(preamble)
    head = b""
    while True:
        chunk = sock.recv(HANDSHAKE_MAX - len(head))
        if not chunk:
            raise HandshakeRefused(f"closed after {head[:40]!r}")
        head += chunk
        end = head.find(b"\r\n\r\n", max(0, len(head) - len(chunk) - 3))
        if end >= 0:
            if not head.startswith(expect):
                raise HandshakeRefused(head[:40].decode("latin-1").split("\r\n")[0])
            return head[end + 4:]
        if len(head) >= HANDSHAKE_MAX:
            raise HandshakeRefused("no blank line in 8 KiB")


# --------------------------------------------------------------------------- streaming (threads)

def _stream(addr: Addr, direction: str, size: int, deadline: float, ready: threading.Barrier,
            result: dict) -> None:
    """One bulk stream: connect, wait for the others, move ``size`` bytes, check the count."""
    sock = None
    try:
        sock = connect(addr, IO_TIMEOUT)
        ready.wait(IO_TIMEOUT)
        result["start"] = time.perf_counter()
        if direction == "up":
            sock.sendall(b"U" + size.to_bytes(8, "big"))
            payload = memoryview(bytes(CHUNK))
            left = size
            while left:
                step = CHUNK if left >= CHUNK else left
                sock.sendall(payload[:step])
                left -= step
                if time.monotonic() > deadline:
                    raise Deadline("time limit")
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 8:
                chunk = sock.recv(8 - len(reply))
                if not chunk:
                    break
                reply += chunk
            moved = int.from_bytes(reply, "big") if len(reply) == 8 else -1
        else:
            sock.sendall(b"D" + size.to_bytes(8, "big"))
            buffer = bytearray(CHUNK)
            recv_into = sock.recv_into
            moved = 0
            while True:
                got = recv_into(buffer)
                if not got:
                    break
                moved += got
                if moved > size or time.monotonic() > deadline:
                    break
        result["end"] = time.perf_counter()
        result["bytes"] = max(moved, 0)
        if moved != size:
            result["error"] = f"byte count {moved} != {size}"
    except BaseException as exc:  # noqa: BLE001 - recorded as this stream's failure
        result["error"] = describe(exc)
        try:
            ready.abort()
        except Exception:
            pass
    finally:
        if sock is not None:
            sock.close()


def bulk(addr: Addr, *, streams: int, mib: int, directions: tuple[str, ...], time_limit: float) -> dict:
    """``streams`` parallel streams of ``mib`` MiB each, stream i going ``directions[i % len]``.

    Throughput is all verified bytes over the time from the common start to the last stream's end.
    """
    size = mib * MIB
    deadline = time.monotonic() + time_limit
    ready = threading.Barrier(streams)
    results = [{} for _ in range(streams)]
    threads = [threading.Thread(target=_stream, daemon=True, name=f"stream-{i}",
                                args=(addr, directions[i % len(directions)], size, deadline, ready, results[i]))
               for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # joined in slices so that Ctrl-C gets through
            thread.join(0.2)
    failures = Failures()
    for result in results:
        if "error" in result:
            failures.add(result["error"])
    starts = [r["start"] for r in results if "start" in r]
    ends = [r["end"] for r in results if "end" in r]
    moved = sum(r.get("bytes", 0) for r in results if "error" not in r)
    seconds = (max(ends) - min(starts)) if starts and ends else None
    return {"mib_per_s": moved / MIB / seconds if seconds else None, "seconds": seconds,
            "mib": moved / MIB, **failures.report()}


def pingpong(addr: Addr, *, rounds: int, size: int, time_limit: float) -> dict:
    """``rounds`` round trips of ``size`` bytes on one connection to an echo target; p50/p99 in µs."""
    deadline = time.monotonic() + time_limit
    failures = Failures()
    latencies: list[float] = []
    message = os.urandom(size)
    buffer = bytearray(size)
    view = memoryview(buffer)
    clock = time.perf_counter_ns
    sock = None
    try:
        sock = connect(addr, IO_TIMEOUT)
        for i in range(rounds + 10):  # the first 10 warm up and are not counted
            start = clock()
            sock.sendall(message)
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if not n:
                    raise ConnectionError("EOF mid-reply")
                got += n
            elapsed = clock() - start
            if buffer != message:
                raise ValueError("echo mismatch")
            if i >= 10:
                latencies.append(elapsed / 1000.0)
            if time.monotonic() > deadline:
                raise Deadline("time limit")
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        failures.add(describe(exc))
    finally:
        if sock is not None:
            sock.close()
    latencies.sort()
    return {"p50_us": percentile(latencies, 0.50), "p99_us": percentile(latencies, 0.99),
            "rounds": len(latencies), **failures.report()}


def mixed(addr: Addr, pingpong: Callable[..., dict], *, rounds: int, size: int, time_limit: float) -> dict:
    """``pingpong`` on one connection while a second one streams bulk through an echo target.

    The bulk stream sends 1 MiB blocks from one thread and reads the echo in another, for as
    long as the ping-pong lasts; its figure is the echoed MiB/s, every byte counted back.
    """
    deadline = time.monotonic() + time_limit
    failures = Failures()
    stop = threading.Event()
    counts = {"sent": 0, "echoed": 0}
    bulk = connect(addr, IO_TIMEOUT)

    def send() -> None:
        block = memoryview(bytes(CHUNK))
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                bulk.sendall(block)
                counts["sent"] += CHUNK
            bulk.shutdown(socket.SHUT_WR)
        except OSError as exc:
            failures.add(f"bulk send {describe(exc)}")

    def receive() -> None:
        buffer = bytearray(CHUNK)
        try:
            while True:
                got = bulk.recv_into(buffer)
                if not got:
                    return
                counts["echoed"] += got
        except OSError as exc:
            failures.add(f"bulk receive {describe(exc)}")

    threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=receive, daemon=True)]
    started = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        while counts["echoed"] < 4 * CHUNK and time.monotonic() < deadline:
            time.sleep(0.01)  # the bulk stream is in full flow before the first ping
        result = pingpong(addr, rounds=rounds, size=size, time_limit=max(1.0, deadline - time.monotonic()))
        seconds = time.perf_counter() - started
        echoed_then = counts["echoed"]
    finally:
        stop.set()
        for thread in threads:
            thread.join(IO_TIMEOUT)
        bulk.close()
    if counts["echoed"] != counts["sent"]:
        failures.add(f"bulk echoed {counts['echoed']} of {counts['sent']} bytes")
    return {"p50_us": result.get("p50_us"), "p99_us": result.get("p99_us"),
            "bulk_mib_per_s": echoed_then / MIB / seconds,
            "failures": result.get("failures", 0) + failures.count,
            "errors": {**result.get("errors", {}), **failures.report()["errors"]}}


# --------------------------------------------------------------------------- connection-heavy (gevent)

def _gevent():
    import gevent
    import gevent.event
    import gevent.pool
    import gevent.socket
    return gevent, gevent.socket


def _recv_exactly(sock, size: int) -> int:
    got = 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            break
        got += len(chunk)
    return got


def _run_loops(gevent, client, clients: int, duration: float) -> None:
    """Run ``clients`` copies of a timed ``client`` loop to their end; stragglers past the bound are killed."""
    greenlets = [gevent.spawn(client) for _ in range(clients)]
    try:
        gevent.joinall(greenlets, timeout=duration + IO_TIMEOUT + 5)
    finally:
        gevent.killall(greenlets)


def request_reply(addr: Addr, *, clients: int, duration: float, request: int, reply: int,
                  max_exchanges: int) -> dict:
    """Upstream issue #413: ``clients`` loops of connect, request, reply, close for ``duration`` s."""
    gevent, gsocket = _gevent()
    payload = os.urandom(request)
    latencies: list[float] = []
    failures = Failures()
    start = time.monotonic()
    stop_at = start + duration
    clock = time.perf_counter

    def client() -> None:
        while time.monotonic() < stop_at and len(latencies) + failures.count < max_exchanges:
            began = clock()
            sock = None
            try:
                sock = connect(addr, IO_TIMEOUT, gsocket)
                sock.sendall(payload)
                got = _recv_exactly(sock, reply)
                if got != reply:
                    raise ConnectionError(f"short reply {got}/{reply}")
                latencies.append(clock() - began)
            except (OSError, ConnectionError) as exc:
                failures.add(describe(exc))
                gevent.sleep(0.001)  # a refusing proxy must not turn this into a busy loop
            finally:
                if sock is not None:
                    sock.close()

    _run_loops(gevent, client, clients, duration)
    elapsed = time.monotonic() - start
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {"exchanges_per_s": len(latencies) / elapsed, "p50_ms": percentile(ms, 0.5),
            "p99_ms": percentile(ms, 0.99), "exchanges": len(latencies), **failures.report()}


def _echo_once(sock, message: bytes, early: bytes = b"") -> None:
    sock.sendall(message)
    got = early
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        if not chunk:
            raise ConnectionError("EOF before the echo")
        got += chunk
    if got != message:
        raise ValueError("echo mismatch")


def churn(addr: Addr, *, clients: int, duration: float, size: int, max_connections: int,
          preamble: bytes | None = None, expect: bytes = b"") -> dict:
    """Connections per second: ``clients`` loops of connect, ``size``-byte echo, close.

    With ``preamble``, each connection first goes through :func:`handshake` (connect-churn).
    """
    gevent, gsocket = _gevent()
    message = os.urandom(size)
    done = [0]
    latencies: list[float] = []
    failures = Failures()
    start = time.monotonic()
    stop_at = start + duration
    clock = time.perf_counter

    def client() -> None:
        while time.monotonic() < stop_at and done[0] + failures.count < max_connections:
            began = clock()
            sock = None
            try:
                sock = connect(addr, IO_TIMEOUT, gsocket)
                early = handshake(sock, preamble, expect) if preamble is not None else b""
                _echo_once(sock, message, early)
                done[0] += 1
                latencies.append(clock() - began)
            except HandshakeRefused as exc:
                failures.add(f"handshake refused: {exc}"[:80])
                gevent.sleep(0.001)
            except (OSError, ConnectionError, ValueError) as exc:
                failures.add(describe(exc))
                gevent.sleep(0.001)
            finally:
                if sock is not None:
                    sock.close()

    _run_loops(gevent, client, clients, duration)
    elapsed = time.monotonic() - start
    latencies.sort()
    return {"conns_per_s": done[0] / elapsed, "p99_ms": percentile([x * 1000 for x in latencies], 0.99),
            "connections": done[0], **failures.report()}


def concurrency(addr: Addr, *, connections: int, size: int, connect_parallel: int, time_limit: float,
                on_hold: Callable[[], dict] | None = None) -> dict:
    """Open ``connections`` idle connections (``connect_parallel`` connects in flight), then one echo on each.

    ``on_hold`` runs while all connections are still open (after the echoes), to sample the proxy's memory.
    """
    gevent, gsocket = _gevent()
    from gevent.pool import Pool
    message = os.urandom(size)
    failures = Failures()
    socks: list = []
    deadline = time.monotonic() + time_limit
    started = time.monotonic()

    def open_one() -> None:
        if time.monotonic() > deadline:
            failures.add("time limit")
            return
        try:
            socks.append(connect(addr, IO_TIMEOUT, gsocket))
        except OSError as exc:
            failures.add("connect " + describe(exc))

    def echo(sock) -> None:
        try:
            _echo_once(sock, message)
        except (OSError, ConnectionError, ValueError) as exc:
            failures.add("echo " + describe(exc))

    held = {}
    try:
        pool = Pool(connect_parallel)
        for _ in range(connections):
            pool.spawn(open_one)
        pool.join(timeout=max(1.0, deadline - time.monotonic()))
        pool.kill()
        connected_s = time.monotonic() - started
        echo_started = time.monotonic()
        greenlets = [gevent.spawn(echo, sock) for sock in socks]
        gevent.joinall(greenlets, timeout=max(1.0, deadline - time.monotonic()))
        unfinished = sum(1 for g in greenlets if not g.dead)
        gevent.killall(greenlets)
        for _ in range(unfinished):
            failures.add("echo time limit")
        echo_s = time.monotonic() - echo_started
        if on_hold is not None:
            held = on_hold()
    finally:
        for sock in socks:
            sock.close()
    return {"held": len(socks), "connect_s": connected_s, "echo_s": echo_s, **held, **failures.report()}


def burst(addr: Addr, *, clients: int, size: int, time_limit: float) -> dict:
    """``clients`` connects started at the same moment, then one echo each; refused and failed counts."""
    gevent, gsocket = _gevent()
    message = os.urandom(size)
    counts = Counter()
    failures = Failures()
    connect_times: list[float] = []
    clock = time.perf_counter
    gate = gevent.event.Event()

    def client() -> None:
        gate.wait()
        began = clock()
        sock = None
        try:
            try:
                sock = connect(addr, IO_TIMEOUT, gsocket)
            except (ConnectionRefusedError, ConnectionResetError) as exc:
                # TCP refuses; a vsock listener whose accept queue is full resets the connect at once
                counts["refused"] += 1
                failures.add(describe(exc))
                return
            connect_times.append(clock() - began)
            _echo_once(sock, message)
            counts["ok"] += 1
        except (OSError, ConnectionError, ValueError) as exc:
            counts["failed"] += 1
            failures.add(describe(exc))
        finally:
            if sock is not None:
                sock.close()

    greenlets = [gevent.spawn(client) for _ in range(clients)]
    gevent.sleep(0)  # every client is now parked on the gate
    started = time.monotonic()
    gate.set()
    try:
        gevent.joinall(greenlets, timeout=time_limit)
    finally:
        unfinished = sum(1 for g in greenlets if not g.dead)
        gevent.killall(greenlets)
    for _ in range(unfinished):
        counts["failed"] += 1
        failures.add("time limit")
    connect_times.sort()
    return {"refused": counts["refused"], "failed": counts["failed"], "ok": counts["ok"],
            "seconds": time.monotonic() - started,
            "connect_p99_ms": percentile([x * 1000 for x in connect_times], 0.99), **failures.report()}


# --------------------------------------------------------------------------- the C load generator

class FastLoad:
    """Runs ``fastload`` (bench_lib/fastload.c) client commands; each prints one JSON object."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def run(self, args: list, timeout: float) -> dict:
        for arg in args:
            if isinstance(arg, Addr) and arg.family == socket.AF_VSOCK:
                require_vm()
        proc = subprocess.run([self.binary, *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"fastload {args[0]} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return json.loads(proc.stdout)

    def pingpong(self, addr: Addr, *, rounds: int, size: int, time_limit: float) -> dict:
        return self.run(["pingpong", addr, rounds, size], time_limit + 30)

    def request_reply(self, addr: Addr, *, clients: int, duration: float, request: int, reply: int,
                      max_exchanges: int) -> dict:
        out = self.run(["loop", addr, clients, duration, request, reply, max_exchanges], duration + IO_TIMEOUT + 30)
        return {"exchanges_per_s": out["per_s"], "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"],
                "exchanges": out["done"], "failures": out["failures"], "errors": out["errors"]}

    def churn(self, addr: Addr, *, clients: int, duration: float, size: int, max_connections: int,
              preamble: bytes | None = None, expect: bytes = b"") -> dict:
        handshake_args = ["--preamble", preamble.hex(), "--expect", expect.decode()] if preamble is not None else []
        out = self.run(["loop", addr, clients, duration, size, 0, max_connections, *handshake_args],
                       duration + IO_TIMEOUT + 30)
        return {"conns_per_s": out["per_s"], "p99_ms": out["p99_ms"], "connections": out["done"],
                "failures": out["failures"], "errors": out["errors"]}

    def burst(self, addr: Addr, *, clients: int, size: int, time_limit: float) -> dict:
        return self.run(["burst", addr, clients, size, time_limit], time_limit + 30)
