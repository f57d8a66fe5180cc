#!/usr/bin/env python3
"""Run the real ``vsock-proxy`` command, listening on a socat-style address.

    run_vsockproxy.py LISTEN REMOTE_ADDR REMOTE_PORT [vsock-proxy options...]

LISTEN is what the bench's ``{listen}`` placeholder expands to:
  VSOCK-LISTEN:PORT                  the real thing: ``vsock-proxy PORT ...`` unchanged (inside the VM);
  TCP-LISTEN:PORT[,bind=HOST]        the host stand-in: the same command, CLI, allowlist, logging and
  TCP4-LISTEN / TCP6-LISTEN          signal handling, except that its listener is a TCP socket on
                                     HOST:PORT (default 127.0.0.1) instead of vsock PORT.

Only the listener factory (``vsock_listener``) is swapped, wherever vsockproxy imported it, so the
proxy under test is the product's own code path from option parsing to SIGTERM.
"""

from __future__ import annotations

import os
import re
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

LISTEN_RE = re.compile(r"^(?P<kind>VSOCK-LISTEN|TCP-LISTEN|TCP4-LISTEN|TCP6-LISTEN):(?P<port>\d+)(?P<opts>(,[^,]*)*)$",
                       re.IGNORECASE)


def main(argv: list[str]) -> int:
    if not argv or not LISTEN_RE.match(argv[0]):
        print("usage: run_vsockproxy.py VSOCK-LISTEN:PORT|TCP-LISTEN:PORT[,bind=HOST] REMOTE_ADDR REMOTE_PORT "
              "[vsock-proxy options]", file=sys.stderr)
        return 2
    match = LISTEN_RE.match(argv[0])
    kind, port = match["kind"].upper(), int(match["port"])
    options = dict(opt.partition("=")[::2] for opt in match["opts"].split(",") if opt)
    rest = argv[1:]

    from vsockproxy import cli
    import vsockproxy.server as server_module

    if kind != "VSOCK-LISTEN":
        host = options.get("bind") or ("::1" if kind == "TCP6-LISTEN" else "127.0.0.1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        original = server_module.vsock_listener

        def tcp_listener(cid: int, vsock_port: int, backlog: int) -> socket.socket:
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            return server_module.start_listening(listener, (host, vsock_port), backlog,
                                                 f"tcp {host}:{vsock_port}")

        patched = 0
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] == "vsockproxy" and getattr(module, "vsock_listener", None) is original:
                module.vsock_listener = tcp_listener
                patched += 1
        if not patched:  # pragma: no cover - the product was refactored; this runner must follow
            print("run_vsockproxy: vsockproxy has no vsock_listener() to replace; update this runner",
                  file=sys.stderr)
            return 1
    return cli.main([str(port), *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
