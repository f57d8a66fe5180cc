"""The ``vsock-proxy`` command's entry point, for the console script and ``python -m vsockproxy`` alike.

SIGHUP (reload) and SIGUSR1 (summary) kill a process by default, and start-up
imports gevent, PyYAML and prometheus_client before the supervisor can install
its handlers: 0.2 s natively, seconds in a slow VM.  So both signals are ignored
first, before anything heavy is imported; the supervisor's handlers replace that.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, listener_factory: Optional[Callable] = None) -> int:
    """Run ``vsock-proxy`` with ``argv`` (default: ``sys.argv``); returns the exit status.

    ``listener_factory`` replaces vsock's listeners (see cli.main); tests and benchmarks use it.
    """
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    from vsockproxy.cli import main as run_cli  # the heavy imports

    if listener_factory is None:
        return run_cli(argv)
    return run_cli(argv, listener_factory)


if __name__ == "__main__":
    sys.exit(main())
