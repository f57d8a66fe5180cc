"""vsockproxy.notify: systemd's readiness protocol, one datagram per message, a no-op without a manager."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from vsockproxy.notify import Notifier

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def manager(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("fine")
    notifier.close()


def test_messages_are_key_value_lines(manager):
    notifier = Notifier(manager.getsockname())
    notifier.ready("2 service(s)")
    notifier.reloading()
    notifier.stopping("draining 1 connection(s)")
    notifier.close()
    assert manager.recv(4096) == b"READY=1\nSTATUS=2 service(s)"
    reloading = manager.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].partition("=")[2]) > 0
    assert manager.recv(4096) == b"STOPPING=1\nSTATUS=draining 1 connection(s)"


def test_an_abstract_socket_name_starts_with_at():
    name = f"vsockproxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier("@" + name)
        notifier.send(STATUS="hello")
        notifier.close()
        assert sock.recv(100) == b"STATUS=hello"


def test_a_manager_that_went_away_is_one_warning_not_a_crash(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vsockproxy")
    notifier = Notifier(str(tmp_path / "gone"))
    notifier.ready("x")
    notifier.close()
    (record,) = caplog.records
    assert "cannot notify the service manager at" in record.getMessage()
