"""The real CLI really listens on AF_VSOCK here, and stops cleanly on SIGTERM.

SAFETY: this host has AF_VSOCK but no loopback transport, so every connect()
would go to the hypervisor.  These tests only ever bind() (and the proxy only
ever listen()s); the proof that the proxy holds the port is that a second bind
to it fails with EADDRINUSE.  Real vsock client traffic is the VM suite's job.
"""

from __future__ import annotations

import errno
import random
import signal
import socket
import sys
import time

import pytest

from tests.helpers import assert_one_line_error, free_vsock_port, vsock_available

pytestmark = pytest.mark.timeout(60)


if not vsock_available():
    pytest.skip("no AF_VSOCK on this kernel", allow_module_level=True)


def bind_vsock(port: int) -> socket.socket:
    """An AF_VSOCK socket bound (never connected) to (VMADDR_CID_ANY, port)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
    except OSError:
        sock.close()
        raise
    return sock


def vsock_port_in_use(port: int) -> bool:
    try:
        bind_vsock(port).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return True
        raise
    return False


@pytest.fixture
def start_proxy(spawn, write_config):
    """Start ``python -m vsockproxy PORT 127.0.0.1 TCPPORT`` on a free random vsock port; wait until it listens.

    Retries with another port if the one picked was taken in the meantime.
    """
    def start(*extra: str):
        tcp_port = 9
        config = write_config([("127.0.0.1", tcp_port)])
        for _ in range(10):
            port = random.randint(20000, 60000)
            if vsock_port_in_use(port):
                continue
            proxy = spawn([sys.executable, "-m", "vsockproxy", str(port), "127.0.0.1", str(tcp_port),
                           "--config", config, "--log-level", "info", *extra])
            try:
                proxy.wait_for("listening", timeout=15)
            except AssertionError:
                if "already in use" in proxy.text():
                    continue  # lost a race for the port: pick another
                raise
            return proxy, port, config
        raise AssertionError("no free vsock port found in 10 tries")

    return start


def test_cli_listens_on_vsock_and_stops_on_sigterm(start_proxy):
    proxy, port, _ = start_proxy()
    line = proxy.wait_for("listening")
    assert str(port) in line and "127.0.0.1:9" in line

    # The proxy holds the vsock port: a second bind fails with EADDRINUSE.  (No connect, ever.)
    with pytest.raises(OSError) as excinfo:
        bind_vsock(port).close()
    assert excinfo.value.errno == errno.EADDRINUSE

    # Let start-up finish: a signal at the very moment of "listening" is its own test below.
    time.sleep(0.3)
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    code = proxy.finish(timeout=10)
    assert code == 0, proxy.text()
    assert time.monotonic() - started < 5
    assert any("stopped" in line for line in proxy.lines), proxy.text()
    assert "Traceback" not in proxy.text()

    # And it let go of the port.
    assert not vsock_port_in_use(port)


def test_sigint_also_stops_cleanly(start_proxy):
    proxy, port, _ = start_proxy()
    time.sleep(0.3)
    proxy.signal(signal.SIGINT)
    assert proxy.finish(timeout=10) == 0, proxy.text()
    assert any("stopped" in line for line in proxy.lines)
    assert "Traceback" not in proxy.text()
    assert not vsock_port_in_use(port)


def test_second_cli_on_the_same_port_exits_1(start_proxy, run_cli):
    proxy, port, config = start_proxy()
    result = run_cli(str(port), "127.0.0.1", "9", "--config", config)
    assert_one_line_error(result, 1, "already in use", str(port))
    # The first one is unaffected and still holds the port.
    assert proxy.proc.poll() is None
    assert vsock_port_in_use(port)
    proxy.signal(signal.SIGTERM)
    assert proxy.finish(timeout=10) == 0


# Runs the real CLI, but raises the signal from inside the process at the exact moment it logs
# "listening": that is when an operator (or systemd, told READY=1) may first stop it.
SIGNAL_ON_LISTENING = """
import logging, os, signal, sys
from vsockproxy import cli

class SignalOnListening(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("listening"):
            os.kill(os.getpid(), int(os.environ["TEST_SIGNAL"]))

logging.getLogger("vsockproxy").addHandler(SignalOnListening())
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_right_after_listening_still_stops_cleanly(spawn, write_config, signum):
    """Once it says it is listening, a stop signal must take the clean path: drain, 'stopped', exit 0.

    Fails if the signal handlers are installed only after "listening" is logged (and READY=1 sent):
    SIGTERM then kills the process outright (-15) and SIGINT becomes a KeyboardInterrupt (130).
    """
    from tests.helpers import cli_env

    config = write_config([("127.0.0.1", 9)])
    port = free_vsock_port()
    proxy = spawn([sys.executable, "-c", SIGNAL_ON_LISTENING, str(port), "127.0.0.1", "9", "--config", config],
                  env=cli_env(TEST_SIGNAL=str(int(signum))))
    code = proxy.finish(timeout=15)
    assert code == 0, (code, proxy.text())
    assert any("stopped" in line for line in proxy.lines), proxy.text()
    assert "Traceback" not in proxy.text()
    assert not vsock_port_in_use(port)


def test_port_held_by_another_socket_exits_1(run_cli, write_config):
    config = write_config([("127.0.0.1", 9)])
    for _ in range(10):
        port = random.randint(20000, 60000)
        try:
            holder = bind_vsock(port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        break
    else:
        raise AssertionError("no free vsock port found in 10 tries")
    with holder:
        holder.listen(1)
        assert_one_line_error(run_cli(str(port), "127.0.0.1", "9", "--config", config), 1, "already in use")
