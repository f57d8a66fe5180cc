"""A pooled SDK client's keep-alive tunnels over real vsock: the routed default leaves room for a whole pool.

The real command with its defaults (``--processes auto``, no ``-w``): ten CONNECT
tunnels held open, as boto3's pool of 10 holds them, and an eleventh request that is
answered at once rather than waiting in the listen backlog.
"""

from __future__ import annotations

import socket

import pytest

from tests.e2e.vsock import free_vsock_port, recv_exactly, vsock_connect
from tests.helpers import echo

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(240)]

POOL = 10  # boto3's max_pool_connections
HTTP_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"


def open_tunnel(port: int, target_port: int, timeout: float) -> socket.socket:
    client = vsock_connect(port, timeout=timeout)
    try:
        client.sendall(f"CONNECT localhost:{target_port} HTTP/1.1\r\nHost: localhost:{target_port}\r\n\r\n".encode())
        assert recv_exactly(client, len(HTTP_200)) == HTTP_200
    except BaseException:
        client.close()
        raise
    return client


def test_ten_keep_alive_tunnels_and_an_eleventh_request_at_once(proxy, target):
    echo_target = target(echo)
    port = free_vsock_port()
    running = proxy([], yaml=f"allowlist:\n- {{address: localhost, port: {echo_target.port}}}\n"
                             f"services:\n- {{listen_port: {port}, mode: http-connect}}\n")
    tunnels = []
    try:
        for number in range(POOL):
            tunnels.append(open_tunnel(port, echo_target.port, timeout=30))
            message = b"pooled request %d" % number
            tunnels[-1].sendall(message)
            assert recv_exactly(tunnels[-1], len(message)) == message
        # With upstream's 4 workers this connect would sit in the backlog until a tunnel closed.
        eleventh = open_tunnel(port, echo_target.port, timeout=15)
        tunnels.append(eleventh)
        eleventh.sendall(b"at once")
        assert recv_exactly(eleventh, 7) == b"at once"
        for client in tunnels[:POOL]:
            client.sendall(b"again")
            assert recv_exactly(client, 5) == b"again"
    finally:
        for client in tunnels:
            client.close()
    assert running.stop() == 0
