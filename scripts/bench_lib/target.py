#!/usr/bin/env python3
"""The bench's target server (the "TCP endpoint" behind the proxy), one gevent process per scenario.

    target.py [--request N --reply N] --serve MODE=ADDR [--serve MODE=ADDR ...]

MODE is bulk, echo or rr; ADDR is tcp:HOST:PORT or vsock:CID:PORT (port 0: any free one).

Modes:
  bulk  each connection starts with a 9-byte header: b"U" or b"D" and a 64-bit big-endian length.
        U: read until EOF, then reply with the 64-bit count of bytes read (the integrity check).
        D: send that many bytes, then close.
  echo  send back whatever arrives, until EOF.
  rr    read a --request byte request, send a --reply byte reply, wait for the client's close.

It prints ``READY MODE=ADDR...`` (the bound addresses) on stdout
once listening, and exits on SIGTERM/SIGINT or when its stdin closes (the bench went away).
Copies use 1 MiB buffers so that the target, not the proxy, is never the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from bench_lib.net import bound_addr, listen, parse_addr  # noqa: E402

CHUNK = 1 << 20
SCRATCH = bytearray(CHUNK)          # upload bytes are counted, never looked at: one buffer for all
ZEROS = memoryview(bytes(CHUNK))    # download payload, read-only and shared
HEADER = 9
IO_TIMEOUT = 120.0


def recv_exactly(sock, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def handle_bulk(sock, _args) -> None:
    header = recv_exactly(sock, HEADER)
    if len(header) < HEADER:
        return  # a readiness probe, or a client that gave up
    op, length = header[:1], int.from_bytes(header[1:], "big")
    if op == b"U":
        total = 0
        recv_into = sock.recv_into
        while True:
            got = recv_into(SCRATCH)
            if not got:
                break
            total += got
        sock.sendall(total.to_bytes(8, "big"))
    elif op == b"D":
        left = length
        while left:
            step = CHUNK if left >= CHUNK else left
            sock.sendall(ZEROS[:step])
            left -= step
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):  # the client closes after EOF; don't reset it with unread data
            pass


def handle_echo(sock, _args) -> None:
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def handle_rr(sock, args) -> None:
    request = recv_exactly(sock, args.request)
    if len(request) < args.request:
        return
    sock.sendall(args.reply_bytes)
    while sock.recv(65536):
        pass


HANDLERS = {"bulk": handle_bulk, "echo": handle_echo, "rr": handle_rr}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="append", required=True, metavar="MODE=ADDR",
                        help="serve MODE (bulk, echo, rr) on ADDR (tcp:HOST:PORT or vsock:CID:PORT)")
    parser.add_argument("--request", type=int, default=2048)
    parser.add_argument("--reply", type=int, default=4096)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    args.reply_bytes = bytes(range(256)) * (args.reply // 256) + bytes(args.reply % 256)
    stats = {"connections": 0, "errors": 0}

    def server_for(handler):
        def serve(sock, _address):
            stats["connections"] += 1
            sock.settimeout(IO_TIMEOUT)
            if sock.family != socket.AF_VSOCK:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                handler(sock, args)
            except OSError:
                stats["errors"] += 1
        return serve

    servers = []
    for item in args.serve:
        mode, sep, text = item.partition("=")
        if not sep or mode not in HANDLERS:
            parser.error(f"--serve wants MODE=ADDR with MODE one of {', '.join(sorted(HANDLERS))}, got {item!r}")
        listener = listen(parse_addr(text), args.backlog)
        listener.setblocking(False)
        server = StreamServer(listener, server_for(HANDLERS[mode]))
        server.start()
        servers.append((mode, server))
    print("READY " + " ".join(f"{mode}={bound_addr(server.socket)}" for mode, server in servers), flush=True)

    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)

    def watch_stdin():
        try:
            while True:
                gevent.socket.wait_read(0)
                if not os.read(0, 4096):
                    break
        except OSError:
            pass
        stop.set()

    gevent.spawn(watch_stdin)
    stop.wait()
    for _mode, server in servers:
        server.close()
    print(f"STATS connections={stats['connections']} errors={stats['errors']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
