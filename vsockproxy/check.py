"""``vsock-proxy --check``: would this configuration start, and can each service reach its target?

It answers, before switching from upstream, "will my old allowlist pass?" with
start-up's own checks (the supervisor's ``plan()``: the file, the arguments, the
allowlist), then resolves each service's target and connects to it once over
TCP, as a connection from the enclave would.  Nothing listens, nothing connects
over vsock and the service manager hears nothing, so it can run beside the
proxy it is meant to replace.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import TextIO

import gevent
import gevent.socket

from vsockproxy.allowlist import ConfigError, NotAllowed
from vsockproxy.logs import one_line
from vsockproxy.notify import Notifier
from vsockproxy.resolver import Endpoint
from vsockproxy.supervisor import Plan, StartupError, Supervisor


def run_check(settings: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Print one line per service, ``ok`` or ``FAIL``; returns 0 if every one passed, else 1."""
    try:
        plans = Supervisor(settings, notifier=Notifier(address="")).plan()
    except (ConfigError, NotAllowed, StartupError) as exc:  # what start-up would refuse, in its words
        print(f"FAIL {one_line(str(exc))}", file=out)
        return 1
    checks = [gevent.spawn(check_service, plan) for plan in plans.values()]
    gevent.joinall(checks)
    for check in checks:
        print(one_line(check.value[1]), file=out)
    return 0 if all(check.value[0] for check in checks) else 1


def check_service(plan: Plan) -> tuple[bool, str]:
    """Resolve the service's target and connect to it: (passed, the line saying so)."""
    target, resolver = plan.route.target, plan.route.resolver
    try:
        endpoints = target.endpoints(resolver)
    except OSError as exc:  # ResolveError: no address, or none that the allowlist still admits
        return False, f"FAIL {plan.spec}: {exc}"
    failures = []
    for endpoint in endpoints:
        started = time.monotonic()
        try:
            _connect(endpoint, plan.route.connect_timeout)
        except OSError as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else exc.strerror or str(exc)
            failures.append(f"{endpoint}: {reason}")
            continue
        took = (time.monotonic() - started) * 1000
        allowed = (f"allowed by {target.allowed_by}" if target.pinned_to is None
                   else f"its addresses allowed by {target.allowed_by}")
        count = f"{len(endpoints)} address{'' if len(endpoints) == 1 else 'es'}"
        return True, f"ok   {plan.spec} ({allowed}, {count}, connected to {endpoint} in {took:.0f} ms)"
    return False, f"FAIL {plan.spec}: cannot connect to " + "; ".join(failures)


def _connect(endpoint: Endpoint, timeout: float) -> None:
    """One TCP connect to ``endpoint`` within ``timeout``, closed again at once."""
    with gevent.socket.socket(endpoint.family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(endpoint.sockaddr)
