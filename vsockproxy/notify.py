"""systemd's readiness protocol (sd_notify), so ``Type=notify`` units know when we listen.

The protocol is one datagram per message to the AF_UNIX socket named in
``NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).  Without
that variable every call is a no-op, so the proxy behaves the same by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("vsockproxy")


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: object) -> None:
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="serving")``."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.address.lstrip("\0"), exc.strerror)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
