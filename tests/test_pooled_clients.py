"""Workers by mode: a request-routed port is shared by pooled SDK clients, a fixed route keeps upstream's 4.

A boto3 client keeps up to 10 connections open in its pool.  Through an http-connect
service with upstream's 4 workers, its fifth request would wait in the listen backlog
until a pooled tunnel closed; the routed default must leave room for a whole pool and more.
"""

from __future__ import annotations

import socket

import gevent
import gevent.socket
import pytest

from tests.helpers import TcpListeners, cli_env, echo, http_response_head, recv_exactly, supervisor_for
from vsockproxy.check import workers_warning
from vsockproxy.cli import options_from, parse_arguments
from vsockproxy.config import DEFAULT_NUM_WORKERS, SDK_POOL_CONNECTIONS, configure, load_file

pytestmark = pytest.mark.timeout(60)

HTTP_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"
POOL = 10  # boto3's max_pool_connections


def services_of(tmp_path, services: str, *arguments: str):
    path = tmp_path / "vsock-proxy.yaml"
    path.write_text("allowlist:\n- {address: localhost, port: 443}\nservices:\n" + services)
    options = options_from(parse_arguments(["--config", str(path), *arguments]))
    return configure(load_file(str(path)), options).services


def test_routed_modes_default_to_more_workers_than_an_sdk_pool_and_fixed_keeps_four(tmp_path):
    services = services_of(tmp_path, "- {listen_port: 8000, address: localhost, port: 443}\n"
                                     "- {listen_port: 8080, mode: http-connect}\n"
                                     "- {listen_port: 8081, mode: socks5}\n"
                                     "- {listen_port: 8443, mode: sni, port: 443}\n")
    assert [service.num_workers for service in services] == [4, 64, 64, 64]
    assert DEFAULT_NUM_WORKERS["fixed"] == 4
    assert min(DEFAULT_NUM_WORKERS[mode] for mode in ("http-connect", "socks5", "sni")) > SDK_POOL_CONNECTIONS


@pytest.mark.parametrize("source", ["-w", "environment", "entry"])
def test_a_worker_count_that_is_given_wins_over_the_mode_default(tmp_path, monkeypatch, source):
    entry = ", num_workers: 7" if source == "entry" else ""
    if source == "environment":
        monkeypatch.setenv("VSOCK_PROXY_NUM_WORKERS", "7")
    arguments = ("-w", "7") if source == "-w" else ()
    services = services_of(tmp_path, f"- {{listen_port: 8080, mode: http-connect{entry}}}\n"
                                     f"- {{listen_port: 8000, address: localhost, port: 443{entry}}}\n", *arguments)
    assert [service.num_workers for service in services] == [7, 7]


def test_check_warns_about_a_routed_service_that_one_pooled_client_can_hold(tmp_path):
    few, enough, fixed = services_of(tmp_path, "- {listen_port: 8080, mode: http-connect, num_workers: 9}\n"
                                               "- {listen_port: 8081, mode: socks5, num_workers: 10}\n"
                                               "- {listen_port: 8000, address: localhost, port: 443}\n")
    assert workers_warning(few) == (
        "warn vsock port 8080 (http-connect): 9 worker(s), fewer than one pooled client may hold open "
        "(boto3 keeps up to 10); further connections wait in the listen backlog: raise -w or the service's "
        "num_workers")
    assert workers_warning(enough) is None
    assert workers_warning(fixed) is None  # upstream's -w 4 for one fixed target, as upstream


def test_check_prints_the_warning_after_the_service_line_and_still_passes(run_cli, write_config):
    path = write_config("allowlist:\n- {address: localhost, port: 443}\nservices:\n"
                        "- {listen_port: 8080, mode: http-connect}\n- {listen_port: 8081, mode: socks5}\n")
    env = cli_env()
    env.pop("NOTIFY_SOCKET", None)
    quiet = run_cli("--check", "--config", path, env=env)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert not any(line.startswith("warn") for line in quiet.stdout.splitlines()), quiet.stdout
    result = run_cli("--check", "--config", path, "-w", "4", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["ok", "warn", "ok", "warn"], result.stdout
    assert lines[1].startswith("warn vsock port 8080 (http-connect): 4 worker(s), fewer than one pooled client")
    assert lines[3].startswith("warn vsock port 8081 (socks5): 4 worker(s)")


def test_a_routed_service_with_the_default_serves_a_whole_pool_of_tunnels_and_one_more_at_once(
        tmp_path, tcp_target):
    target = tcp_target(echo)
    path = tmp_path / "vsock-proxy.yaml"
    path.write_text(f"allowlist:\n- {{address: localhost, port: {target.port}}}\n"
                    "services:\n- {listen_port: 9000, mode: http-connect}\n")
    listeners = TcpListeners()
    supervisor = supervisor_for(["--config", str(path), "--shutdown-grace", "1"], listeners)
    supervisor.start()
    tunnels: list[gevent.socket.socket] = []
    try:
        def open_tunnel() -> gevent.socket.socket:
            client = gevent.socket.create_connection(listeners.addresses[9000], timeout=2)
            tunnels.append(client)
            client.sendall(f"CONNECT localhost:{target.port} HTTP/1.1\r\n\r\n".encode())
            assert http_response_head(client) == HTTP_200
            return client

        for number in range(POOL):  # a pool's keep-alive tunnels, each used once and held open
            client = open_tunnel()
            client.sendall(b"request %d" % number)
            assert recv_exactly(client, len(b"request %d" % number)) == b"request %d" % number
        eleventh = open_tunnel()  # within its 2 s timeout, while all ten stay open
        eleventh.sendall(b"at once")
        assert recv_exactly(eleventh, 7) == b"at once"
        for number, client in enumerate(tunnels[:POOL]):  # the pool's tunnels still relay
            client.sendall(b"again")
            assert recv_exactly(client, 5) == b"again", number
    finally:
        for client in tunnels:
            client.close()
        supervisor.drain(0)
        for sock in listeners.sockets.values():
            sock.close()
    with socket.socket() as probe:  # the listener is gone with the drain
        assert probe.connect_ex(listeners.addresses[9000]) != 0
