"""The metrics endpoint and what it reports (issue 14, defects 3 and 7), on the host.

Two kinds of proxy run here, neither of which ever connects an AF_VSOCK socket:

* in this process: a VsockProxyServer or a whole Supervisor whose vsock listeners are TCP
  listeners on 127.0.0.1, read through its Metrics registry and ``caplog``;
* in a subprocess: tests/test_faults.py's StandInProxy with ``--metrics-address``, so that its
  sockets can be counted and its RLIMIT_NOFILE lowered from /proc, and its stderr read whole.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import urllib.request

import gevent
import gevent.socket
import pytest
from prometheus_client import generate_latest

import vsockproxy.supervisor as supervisor_module
from tests.helpers import TcpListeners, echo, route_to, supervisor_for, no_dns, parse_allowlist, recv_all, recv_exactly, unused_tcp_port, wait_until
from tests.test_faults import blocking_echo, problems_in, stand_in, thread_target  # noqa: F401 (fixtures)
from tests.helpers import free_vsock_port
from vsockproxy.metrics import Metrics
from vsockproxy.resolver import Resolver
from vsockproxy.server import VsockProxyServer

pytestmark = pytest.mark.timeout(90)

#: Connections the endpoint serves at once (vsockproxy.metrics_server.MAX_SCRAPES, as documented).
MAX_SCRAPES = 4


# =========================================================================== helpers

def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in a scrape, or None when there is none."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def http_scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def raw_exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as is and return everything the endpoint sends before it closes (b"" on a reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        try:
            client.sendall(request)
            return recv_all(client)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def open_without_waiting(port: int, count: int) -> list[socket.socket]:
    """``count`` non-blocking TCP connects to ``port``: those past the listen backlog stay in SYN_SENT."""
    clients = []
    for _ in range(count):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        clients.append(client)
    return clients


def closed_by_peer(client: socket.socket) -> bool:
    """Whether the peer has closed or reset ``client`` (a non-blocking socket), without waiting."""
    try:
        return client.recv(4096) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except ConnectionResetError:
        return True
    except OSError:  # not connected yet: still in the kernel's hands
        return False


def close_all(clients: list[socket.socket]) -> None:
    for client in clients:
        client.close()


@pytest.fixture
def metered_proxy(tcp_target):
    """``metered_proxy(num_workers)``: an echo target behind a VsockProxyServer on a TCP listener,
    counted under service "5005" of a Metrics of its own; returns (server, metrics, address)."""
    started = []

    def start(num_workers: int = 4):
        target = tcp_target(echo)
        allowlist = parse_allowlist({"allowlist": [{"address": "127.0.0.1", "port": target.port}]}, "test.yaml")
        resolver = Resolver(getaddrinfo=no_dns)
        route = route_to(allowlist.authorize("127.0.0.1", target.port, resolver), resolver)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        metrics = Metrics()
        server = VsockProxyServer(listener, route, num_workers=num_workers, metrics=metrics.service("5005"))
        server.start()
        started.append((server, listener))
        return server, metrics, listener.getsockname()

    yield start
    for server, listener in started:
        server.stop(timeout=1)
        listener.close()


def connect(address, timeout: float = 10) -> gevent.socket.socket:
    return gevent.socket.create_connection(address, timeout=timeout)


def echoes(client, payload: bytes) -> bool:
    client.sendall(payload)
    return recv_exactly(client, len(payload)) == payload


@pytest.fixture
def tcp_supervisor(monkeypatch, tmp_path):
    """``tcp_supervisor(yaml, *options)``: a started Supervisor whose vsock listeners are TCP ones;
    ``.rewrite(yaml)`` changes its file, ``.addresses[vsock_port]`` is where each one listens."""
    listeners = TcpListeners()
    config = tmp_path / "vsock-proxy.yaml"
    started = []

    def start(yaml: str, *options: str):
        config.write_text(yaml)
        supervisor = supervisor_for(["--config", str(config), *options], listeners)
        supervisor.start()
        supervisor.addresses = listeners.addresses
        supervisor.rewrite = config.write_text
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.drain(0)


def services_yaml(target_port: int, ports: list[int]) -> str:
    lines = ["allowlist:", f"- {{address: 127.0.0.1, port: {target_port}}}", "services:"]
    lines += [f"- {{listen_port: {port}, address: 127.0.0.1, port: {target_port}}}" for port in ports]
    return "\n".join(lines) + "\n"


# =========================================================================== defect 3: the endpoint

@pytest.mark.timeout(60)
def test_slowloris_scrapers_are_cut_off_by_a_whole_request_deadline(stand_in, thread_target):
    """Twenty clients trickle one byte a second and never finish their request: a per-byte timeout
    would keep them forever; the whole-request deadline closes each one it has accepted."""
    metrics_port = unused_tcp_port()
    proxy = stand_in(thread_target().port, "--metrics-address", f"127.0.0.1:{metrics_port}")
    trickle = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100
    clients = open_without_waiting(metrics_port, 20)
    closed: set[int] = set()
    try:
        deadline = time.monotonic() + 15
        for offset in range(len(trickle)):
            for index, client in enumerate(clients):
                if index in closed:
                    continue
                if closed_by_peer(client):
                    closed.add(index)
                    continue
                try:
                    client.send(trickle[offset:offset + 1])
                except OSError:
                    pass
            if len(closed) >= MAX_SCRAPES or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        close_all(clients)
    assert len(closed) >= MAX_SCRAPES, f"only {len(closed)} of 20 trickling clients closed after 15 s"
    assert "vsockproxy_active_connections" in http_scrape(metrics_port)
    assert proxy.stop() == 0
    assert problems_in(proxy.lines) == [], proxy.text()


@pytest.mark.timeout(60)
def test_more_concurrent_scrapers_than_the_cap_never_hold_more_connections(stand_in, thread_target):
    """Twelve scrapers start their request at once; the proxy holds at most four of their
    connections (the rest wait in the kernel's backlog), and every one is answered in turn."""
    metrics_port = unused_tcp_port()
    proxy = stand_in(thread_target().port, "--metrics-address", f"127.0.0.1:{metrics_port}")
    proxy.settled_fds()
    baseline = proxy.socket_fds()
    clients = [socket.create_connection(("127.0.0.1", metrics_port), timeout=10) for _ in range(12)]
    try:
        for client in clients:
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        most = 0
        for _ in range(15):
            most = max(most, proxy.socket_fds() - baseline)
            time.sleep(0.1)
        assert most <= MAX_SCRAPES, f"the proxy held {most} scraper connections at once"
        for client in clients:
            client.sendall(b"\r\n")
        answers = [recv_all(client) for client in clients]
    finally:
        close_all(clients)
    assert all(answer.startswith(b"HTTP/1.1 200 ") and b"vsockproxy_active_connections" in answer
               for answer in answers), [answer[:40] for answer in answers]
    assert proxy.stop() == 0
    assert problems_in(proxy.lines) == [], proxy.text()


MALFORMED = {
    "200 headers": b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "head over 8 KiB": b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xff\xfe\r\n\r\n",
    "forged log line": b"GET /\x1b[31mX\n2099-01-01 00:00:00,000 ERROR forged entry HTTP/1.1\r\n\r\n",
    "no version": b"GET /metrics\r\n\r\n",
    "unknown method": b"BREW /metrics HTTP/1.1\r\n\r\n",
    "unknown path": b"GET /../../etc/passwd HTTP/1.1\r\n\r\n",
    "binary": bytes(range(256)) + b"\r\n\r\n",
}


@pytest.mark.timeout(60)
def test_malformed_requests_get_an_http_error_and_leave_no_traceback_or_raw_text_in_the_log(
        stand_in, thread_target):
    metrics_port = unused_tcp_port()
    proxy = stand_in(thread_target().port, "--metrics-address", f"127.0.0.1:{metrics_port}",
                     "--log-level", "debug")
    answers = {name: raw_exchange(metrics_port, request) for name, request in MALFORMED.items()}
    status = {name: answer.split(b"\r\n", 1)[0].decode("latin-1") for name, answer in answers.items()}
    for name, line in status.items():
        assert line == "" or re.fullmatch(r"HTTP/1\.[01] 4\d\d .*", line), (name, line)
    assert status["200 headers"] in ("", "HTTP/1.1 431 Request Header Fields Too Large"), status
    assert status["unknown path"] == "HTTP/1.1 404 Not Found", status
    assert status["unknown method"] == "HTTP/1.1 405 Method Not Allowed", status
    assert status["no version"] == "HTTP/1.1 400 Bad Request", status
    assert "vsockproxy_active_connections" in http_scrape(metrics_port)
    assert proxy.stop() == 0
    assert problems_in(proxy.lines) == [], proxy.text()
    assert not [line for line in proxy.lines if "\x1b" in line or "forged entry" in line
                or not line.isprintable()], proxy.text()


@pytest.mark.timeout(90)
def test_idle_connections_to_the_metrics_port_cannot_take_the_proxys_descriptors(stand_in, thread_target):
    """150 idle connections to the metrics port of a proxy limited to 128 fds: proxied
    connections must still be served, and the log must stay free of tracebacks."""
    metrics_port = unused_tcp_port()
    proxy = stand_in(thread_target().port, "--metrics-address", f"127.0.0.1:{metrics_port}")
    assert blocking_echo(proxy) == b"next connection works"
    proxy.set_nofile(128)
    idle = open_without_waiting(metrics_port, 150)
    try:
        time.sleep(1)  # the endpoint has taken all it will take
        for index in range(10):
            payload = b"echo %d under 150 idle scrapers" % index
            assert blocking_echo(proxy, payload) == payload
    finally:
        close_all(idle)
    assert "vsockproxy_active_connections" in http_scrape(metrics_port)
    assert proxy.stop() == 0
    assert problems_in(proxy.lines) == [], proxy.text()


@pytest.mark.timeout(60)
def test_running_out_of_fds_while_accepting_a_scrape_is_one_warning_line_then_the_scrape_is_served(
        stand_in, thread_target):
    metrics_port = unused_tcp_port()
    proxy = stand_in(thread_target().port, "--metrics-address", f"127.0.0.1:{metrics_port}")
    assert blocking_echo(proxy) == b"next connection works"
    proxy.set_nofile(len(proxy.settled_fds()) + 2)
    holder = proxy.connect()
    scraper = None
    try:
        holder.sendall(b"Eheld")
        assert recv_exactly(holder, 5) == b"Eheld"  # it has taken the last two fds
        scraper = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
        scraper.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        proxy.wait_for("metrics: accept failed: Too many open files; retrying in", timeout=10)
        time.sleep(1)
        holder.close()
        answer = recv_all(scraper)
    finally:
        holder.close()
        if scraper is not None:
            scraper.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100]
    assert proxy.stop() == 0
    assert problems_in(proxy.lines) == [], proxy.text()


def test_an_unresolvable_metrics_host_is_reported_in_the_resolvers_words(run_cli, write_config):
    host = "no-such-host.invalid"  # RFC 6761: never resolves
    try:
        socket.getaddrinfo(host, 9100, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        reason = exc.strerror
    else:
        pytest.skip(f"{host} resolves here")
    config = write_config([("127.0.0.1", 9000)])
    result = run_cli(str(free_vsock_port()), "127.0.0.1", "9000", "--config", config,
                     "--metrics-address", f"{host}:9100", timeout=30)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"vsock-proxy: error: cannot serve metrics on {host}:9100: {reason}\n"


# =========================================================================== defect 7: the figures

def test_pool_full_seconds_grows_while_the_pool_is_full(metered_proxy):
    server, metrics, address = metered_proxy(num_workers=1)
    with connect(address) as holder:
        assert echoes(holder, b"holding the only worker")
        with connect(address) as waiter:
            waiter.sendall(b"waiting")
            wait_until(lambda: sample(scrape(metrics), "vsockproxy_pool_full_total", service="5005") == 1,
                       what="the pool to be reported full")
            before = sample(scrape(metrics), "vsockproxy_pool_full_seconds_total", service="5005")
            gevent.sleep(0.5)
            during = sample(scrape(metrics), "vsockproxy_pool_full_seconds_total", service="5005")
            assert during - before >= 0.4, (before, during)
            holder.close()
            assert recv_exactly(waiter, 7) == b"waiting"
    wait_until(lambda: server.active_connections == 0, what="both connections to end")
    after = sample(scrape(metrics), "vsockproxy_pool_full_seconds_total", service="5005")
    gevent.sleep(0.2)
    assert sample(scrape(metrics), "vsockproxy_pool_full_seconds_total", service="5005") == after >= during


def test_bytes_of_an_open_connection_are_counted_before_it_closes(metered_proxy):
    server, metrics, address = metered_proxy()
    payload = b"x" * 1000
    with connect(address) as client:
        assert echoes(client, payload)
        text = scrape(metrics)
        assert sample(text, "vsockproxy_bytes_total", service="5005", direction="enclave_to_target") == 1000
        assert sample(text, "vsockproxy_bytes_total", service="5005", direction="target_to_enclave") == 1000
        snapshot = server.metrics.snapshot()
        assert (snapshot["up"], snapshot["down"]) == (1000, 1000), snapshot  # what SIGUSR1 logs
    wait_until(lambda: server.active_connections == 0, what="the connection to end")
    text = scrape(metrics)  # counted once, not again at the close
    assert sample(text, "vsockproxy_bytes_total", service="5005", direction="enclave_to_target") == 1000
    assert sample(text, "vsockproxy_bytes_total", service="5005", direction="target_to_enclave") == 1000


def test_series_of_a_removed_service_go_once_its_last_connection_ends_unless_it_is_served_again(
        tcp_supervisor, tcp_target):
    target = tcp_target(echo)
    supervisor = tcp_supervisor(services_yaml(target.port, [5001, 5002]))
    addresses, metrics = supervisor.addresses, supervisor.metrics

    def served(service: int) -> bool:
        return f'service="{service}"' in scrape(metrics)

    first = connect(addresses[5001])
    try:
        assert echoes(first, b"one")
        supervisor.rewrite(services_yaml(target.port, [5002]))
        assert supervisor.reload()
        assert served(5001), "a removed service's series went while its connection was open"
        supervisor.rewrite(services_yaml(target.port, [5001, 5002]))
        assert supervisor.reload()  # served again, on a new listener, before its last connection ended
    finally:
        first.close()
    gevent.sleep(0.2)
    assert served(5001), "the series of a service being served went when an old connection ended"

    second = connect(addresses[5001])
    try:
        assert echoes(second, b"two")
        supervisor.rewrite(services_yaml(target.port, [5002]))
        assert supervisor.reload()
        assert sample(scrape(metrics), "vsockproxy_active_connections", service="5001") == 1
    finally:
        second.close()
    wait_until(lambda: not served(5001), what="the removed service's series to go")
    assert sample(scrape(metrics), "vsockproxy_connections_accepted_total", service="5002") == 0


# =========================================================================== the pool-full warning

def test_a_pool_full_with_connections_waiting_is_one_warning_a_minute(tcp_supervisor, tcp_target, caplog,
                                                                      monkeypatch):
    caplog.set_level(logging.INFO, logger="vsockproxy")
    monkeypatch.setattr(supervisor_module, "POOL_FULL_WARNING_AFTER", 0.3)
    monkeypatch.setattr(supervisor_module, "POOL_FULL_CHECK_INTERVAL", 0.05)
    target = tcp_target(echo)
    supervisor = tcp_supervisor(services_yaml(target.port, [5001]), "-w", "1")
    address = supervisor.addresses[5001]

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "busy" in r.getMessage()]

    with connect(address) as holder:
        assert echoes(holder, b"holding the only worker")
        gevent.sleep(0.6)
        assert warnings() == [], "warned with nobody waiting"
        with connect(address) as waiter:
            waiter.sendall(b"waiting")
            wait_until(warnings, what="the pool-full warning")
            gevent.sleep(0.6)
            assert len(warnings()) == 1, warnings()
            holder.close()
            assert recv_exactly(waiter, 7) == b"waiting"
    message = warnings()[0]
    assert "vsock port 5001" in message and "1 worker" in message, message
    assert "--num_workers" in message and "--idle-timeout" in message, message

