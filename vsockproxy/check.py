"""``vsock-proxy --check``: would this configuration start, and can each service reach its target?

It answers, before switching from upstream, "will my old allowlist pass?" with
start-up's own checks (the supervisor's ``authorize()``: the file, the arguments,
the allowlist), then resolves each service's target and connects to it once over
TCP, as a connection from the enclave would.  Nothing listens, nothing connects
over vsock and the service manager hears nothing, so it can run beside the
proxy it is meant to replace.  A target whose addresses are screened (a wildcard's, or any
with ``deny:`` networks) gets a line per address saying whether it would be refused, and
why; only the others are connected to.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import TextIO

import gevent
import gevent.socket

from vsockproxy.allowlist import NotAllowed, Target
from vsockproxy.config import FIXED, SDK_POOL_CONNECTIONS, ConfigError, Options, Service
from vsockproxy.logs import one_line
from vsockproxy.notify import Notifier
from vsockproxy.resolver import Endpoint
from vsockproxy.supervisor import Authorized, Supervisor


def run_check(options: Options, out: TextIO = sys.stdout) -> int:
    """Print a line per service, ``ok`` or ``FAIL``, and its notes; returns 0 if every one passed, else 1."""
    try:
        services = Supervisor(options, _never_listen, notifier=Notifier(address="")).authorize()
    except (ConfigError, NotAllowed) as exc:  # what start-up would refuse, in its words
        print(f"FAIL {one_line(str(exc))}", file=out)
        return 1
    checks = [gevent.spawn(check_service, service) for service in services.values()]
    gevent.joinall(checks)
    for check, authorized in zip(checks, services.values()):
        warning = workers_warning(authorized.service)
        for line in check.value[1] + ([warning] if warning else []):
            print(one_line(line), file=out)
    return 0 if all(check.value[0] for check in checks) else 1


def workers_warning(service: Service) -> str | None:
    """A request-routed service that one pooled SDK client can hold whole, in a ``warn`` line; else None.

    Such a port is shared by every client in the enclave, so a pool that keeps all
    its workers busy leaves the others waiting in the backlog until one closes.
    """
    if service.mode == FIXED or service.num_workers >= SDK_POOL_CONNECTIONS:
        return None
    return (f"warn {service}: {service.num_workers} worker(s), fewer than one pooled client may hold open "
            f"(boto3 keeps up to {SDK_POOL_CONNECTIONS}); further connections wait in the listen backlog: "
            f"raise -w or the service's num_workers")


def _never_listen(port: int) -> socket.socket:
    raise AssertionError("--check listens on nothing")


def check_service(authorized: Authorized) -> tuple[bool, list[str]]:
    """Resolve the service's target and connect to it: (passed, the line saying so and its notes)."""
    target, service = authorized.target, authorized.service
    notes = [] if service.from_cids is None else \
        [f"     only from CIDs {', '.join(str(cid) for cid in sorted(service.from_cids))}"]
    if target is None:
        return True, [f"ok   {service} (each request's target is checked against the allowlist when it comes)",
                      *notes]
    try:
        screened = target.screen(authorized.resolver)
    except OSError as exc:  # ResolveError: no address, or none that the allowlist still admits
        return False, [f"FAIL {service}: {exc}", *notes]
    if target.screens_addresses:
        notes += [f"     address {endpoint}: " + ("may be used" if refusal is None else f"refused: {refusal.reason}")
                  for endpoint, refusal in screened]
    endpoints = [endpoint for endpoint, refusal in screened if refusal is None]
    if not endpoints:
        return False, [f"FAIL {service}: every address of {target} is refused", *notes]
    passed, line = _connect_any(service, target, endpoints)
    return passed, [line, *notes]


def _connect_any(service: Service, target: Target, endpoints: list[Endpoint]) -> tuple[bool, str]:
    """Connect to the first of ``endpoints`` that accepts: (passed, the service's line)."""
    failures = []
    for endpoint in endpoints:
        started = time.monotonic()
        try:
            _connect(endpoint, service.connect_timeout)
        except OSError as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else exc.strerror or str(exc)
            failures.append(f"{endpoint}: {reason}")
            continue
        took = (time.monotonic() - started) * 1000
        allowed = (f"allowed by {target.allowed_by}" if target.pinned_to is None
                   else f"its addresses allowed by {target.allowed_by}")
        count = f"{len(endpoints)} address{'' if len(endpoints) == 1 else 'es'}"
        return True, f"ok   {service} ({allowed}, {count}, connected to {endpoint} in {took:.0f} ms)"
    return False, f"FAIL {service}: cannot connect to " + "; ".join(failures)


def _connect(endpoint: Endpoint, timeout: float) -> None:
    """One TCP connect to ``endpoint`` within ``timeout``, closed again at once."""
    with gevent.socket.socket(endpoint.family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(endpoint.sockaddr)
