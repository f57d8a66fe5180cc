#!/usr/bin/env python3
"""Run the real ``vsock-proxy`` command, listening on TCP instead of vsock where asked.

    run_vsockproxy.py VSOCK-LISTEN:PORT|TCP-LISTEN:PORT[,bind=HOST] REMOTE_ADDR REMOTE_PORT [options...]
    run_vsockproxy.py --file-services VSOCK-LISTEN:PORT|TCP-LISTEN:PORT[,bind=HOST] --config FILE [options...]
    run_vsockproxy.py --stand-in [vsock-proxy arguments...]

The first form is what the bench's ``{listen}`` placeholder expands to: VSOCK-LISTEN runs
``vsock-proxy PORT ...`` unchanged (inside the VM); TCP-LISTEN (or TCP4-/TCP6-LISTEN) runs the same
command with its listener on TCP HOST:PORT (default 127.0.0.1).

The --file-services form runs no command-line service: the services of the --config file listen,
each on its ``listen_port``, on the transport the address names (vsock, or TCP HOST); PORT is the
file's service's port, written there by the bench (``{routed_config}``: a service with a ``mode``).

The second form is the test suites' stand-in: every service's vsock port P listens on TCP 127.0.0.1,
on the port that $STAND_IN_PORTS maps P to ("5005=40001,5006=40002"), or any free port, and logs
``stand-in listener: vsock port P is tcp HOST:PORT`` before the proxy's own "listening" line.

Both run the product's own entry point (vsockproxy.__main__.main) and hand it a listener factory,
so everything from option parsing to SIGTERM is the real code path.  Importing this module is cheap
(no gevent), so a signal's start-up window is the real command's.
"""

from __future__ import annotations

import os
import re
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from vsockproxy.__main__ import main as vsock_proxy  # noqa: E402  (light: the heavy imports come later)

LISTEN_RE = re.compile(r"^(?P<kind>VSOCK-LISTEN|TCP-LISTEN|TCP4-LISTEN|TCP6-LISTEN):(?P<port>\d+)(?P<opts>(,[^,]*)*)$",
                       re.IGNORECASE)
USAGE = ("usage: run_vsockproxy.py VSOCK-LISTEN:PORT|TCP-LISTEN:PORT[,bind=HOST] REMOTE_ADDR REMOTE_PORT "
         "[vsock-proxy options] | --file-services VSOCK-LISTEN:PORT|TCP-LISTEN:PORT[,bind=HOST] --config FILE "
         "[vsock-proxy options] | --stand-in [vsock-proxy arguments]")


def tcp_listener_factory(host: str, port_for):
    """A vsock-proxy listener factory that listens on TCP ``host``, port ``port_for(vsock_port)``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def listen(vsock_port: int, *, cid: int, backlog: int) -> socket.socket:
        from vsockproxy.listen import start_listening

        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited: vsock has no Nagle either
        return start_listening(listener, (host, port_for(vsock_port)), backlog, f"tcp {host}:{vsock_port}")

    return listen


def stand_in_factory():
    """The test suites' listeners: 127.0.0.1, at $STAND_IN_PORTS's port or any, each logged."""
    mapping = dict(item.split("=") for item in os.environ.get("STAND_IN_PORTS", "").split(",") if item)
    listen_tcp = tcp_listener_factory("127.0.0.1", lambda port: int(mapping.get(str(port), 0)))

    def listen(vsock_port: int, *, cid: int, backlog: int) -> socket.socket:
        import logging

        listener = listen_tcp(vsock_port, cid=cid, backlog=backlog)
        host, tcp_port = listener.getsockname()[:2]
        logging.getLogger("vsockproxy").info("stand-in listener: vsock port %d is tcp %s:%d", vsock_port, host,
                                             tcp_port)
        return listener

    return listen


def main(argv: list[str]) -> int:
    if argv[:1] == ["--stand-in"]:
        return vsock_proxy(argv[1:], stand_in_factory())
    file_services = argv[:1] == ["--file-services"]
    if file_services:
        argv = argv[1:]
    match = LISTEN_RE.match(argv[0]) if argv else None
    if match is None:
        print(USAGE, file=sys.stderr)
        return 2
    kind, port = match["kind"].upper(), match["port"]
    options = dict(opt.partition("=")[::2] for opt in match["opts"].split(",") if opt)
    command = argv[1:] if file_services else [port, *argv[1:]]
    if kind == "VSOCK-LISTEN":
        return vsock_proxy(command)
    host = options.get("bind") or ("::1" if kind == "TCP6-LISTEN" else "127.0.0.1")
    return vsock_proxy(command, tcp_listener_factory(host, lambda vsock_port: vsock_port))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
