"""Helpers shared by the host suites, the e2e suite and their conftest files.

Nothing here ever connect()s an AF_VSOCK socket: the data-path tests hand the
product a TCP or Unix listener and talk to real TCP targets on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from vsockproxy import config  # noqa: E402
from vsockproxy.metrics import Metrics  # noqa: E402
from vsockproxy.server import Route, VsockProxyServer  # noqa: E402

#: The real ``vsock-proxy`` start-up, with its listeners on TCP: scripts/bench_lib/run_vsockproxy.py.
STAND_IN_RUNNER = REPO / "scripts" / "bench_lib" / "run_vsockproxy.py"


def load_allowlist(path: str):
    """The Allowlist read from the YAML file at ``path`` (raises ConfigError)."""
    return config.load_file(path).allowlist


def parse_allowlist(document, source: str):
    """The Allowlist in an already-loaded YAML document (raises ConfigError)."""
    return config.parse_document(document, source).allowlist


def route_to(target, resolver, *, connect_timeout: float = 2.0, idle_timeout: float = 0.0) -> Route:
    """The route a supervisor builds for an authorized ``target``."""
    return Route(str(target), lambda: target.endpoints(resolver), connect_timeout, idle_timeout)


def new_server(target, resolver, *, listener, num_workers: int = 4, connect_timeout: float = 2.0,
               idle_timeout: float = 0.0) -> VsockProxyServer:
    """A VsockProxyServer forwarding to ``target`` from an injected ``listener``."""
    route = route_to(target, resolver, connect_timeout=connect_timeout, idle_timeout=idle_timeout)
    return VsockProxyServer(listener, route, num_workers=num_workers, metrics=Metrics().service("test"))


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a ``python -m vsockproxy`` subprocess: repo importable, no stray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSOCK_PROXY_") and k != "RUST_LOG"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "250"  # argparse would otherwise wrap long words at hyphens
    env.update(extra)
    return env


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The process failed with ``code`` and exactly one stderr line, no traceback, containing each needle."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("vsock-proxy: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class LoggedProcess:
    """A subprocess whose stderr lines are collected by a reader thread, so tests can wait for one."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump_stderr, daemon=True)
        self._reader.start()

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, needle: str, timeout: float = 10, count: int = 1) -> str:
        """The ``count``-th stderr line (new or already seen) containing ``needle``; fails after ``timeout``."""
        matches = [line for line in self.lines if needle in line]
        deadline = time.monotonic() + timeout
        while len(matches) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not logged {count} time(s) within {timeout}s; "
                                     f"stderr: {self.text()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"process exited ({self.proc.poll()}) before logging {needle!r}; "
                                     f"stderr: {self.text()}")
            self.lines.append(line)
            if needle in line:
                matches.append(line)
        return matches[count - 1]

    def drain(self) -> list[str]:
        """Every stderr line so far (collects what the reader thread has queued)."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.lines
            if line is None:
                self._queue.put(None)
                return self.lines
            self.lines.append(line)

    def finish(self, timeout: float = 10) -> int:
        """Wait for exit, then collect the rest of stderr."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self.drain()
        return code

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def text(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            self._reader.join(timeout=5)
            self.proc.stderr.close()


def addrinfo(addresses: Iterable[str], port: int, family: int) -> list[tuple]:
    """What getaddrinfo returns for ``addresses`` (TCP), filtered by family like the real one."""
    result = []
    for address in addresses:
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        if family not in (socket.AF_UNSPEC, fam):
            continue
        sockaddr = (address, port, 0, 0) if fam == socket.AF_INET6 else (address, port)
        result.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
    if not result:
        raise socket.gaierror(socket.EAI_NODATA, "No address associated with hostname")
    return result


class FakeDNS:
    """A ``getaddrinfo`` stand-in: a dict of name -> addresses, a call log, optional delay and failures."""

    def __init__(self, records: dict[str, Iterable[str]] | None = None, delay: float = 0.0) -> None:
        self.records = {k: list(v) for k, v in (records or {}).items()}
        self.delay = delay
        self.calls: list[tuple] = []
        self.fail_next: dict[str, int] = {}

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.calls.append((host, port, family, type, proto))
        if self.delay:
            gevent.sleep(self.delay)
        if self.fail_next.get(host, 0) > 0:
            self.fail_next[host] -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return addrinfo(self.records[host], port, family)

    def count(self, host: str) -> int:
        return sum(1 for call in self.calls if call[0] == host)


def inet_aton_reads(text: str) -> bool:
    """Whether glibc's getaddrinfo would read ``text`` as an IPv4 number, without DNS."""
    try:
        socket.inet_aton(text)
    except (OSError, ValueError):
        return False
    return text.strip() == text


class GlibcLikeDNS:
    """A ``getaddrinfo`` stand-in: a table of names, glibc's numeric parsing, and a log of every question."""

    def __init__(self, records: dict[str, list[str]] | None = None) -> None:
        self.records = {name: list(addresses) for name, addresses in (records or {}).items()}
        self.asked: list[str] = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.asked.append(host)
        addresses = self.records.get(host)
        if addresses is None and inet_aton_reads(host):  # no DNS: 0x7f000001, 0177.1, 2130706433 ...
            addresses = [socket.inet_ntoa(socket.inet_aton(host))]
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return addrinfo(addresses, port, family)


def no_dns(*args, **kwargs):
    raise AssertionError(f"unexpected DNS look-up {args!r}")


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Poll ``predicate`` cooperatively (the hub keeps serving) until truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        gevent.sleep(0.01)


class TcpTarget:
    """A real TCP server on 127.0.0.1 that runs ``handler(sock)`` in a greenlet per connection."""

    def __init__(self, handler: Callable, port: int = 0, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.server = StreamServer((host, port), self._handle, backlog=1024)  # bursts from the proxy fit
        self.server.start()
        self.port = self.server.server_port

    def _handle(self, sock, _address) -> None:
        self.accepted += 1
        sock.settimeout(20)
        try:
            self.handler(sock)
        except Exception as exc:  # recorded so a test can fail on it, never printed by gevent
            self.errors.append(exc)

    def stop(self) -> None:
        self.server.stop(timeout=1)


def tracked(make: Callable, stop: Callable):
    """Body of a factory fixture: hands out ``make(...)`` and calls ``stop`` on each at teardown."""
    made = []

    def start(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    yield start
    for thing in made:
        stop(thing)


def unused_tcp_port(host: str = "127.0.0.1") -> int:
    """A port on which nothing listens right now (bound and released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class Proxy:
    """A started VsockProxyServer on an injected TCP or Unix listener, and how to reach it."""

    def __init__(self, server: VsockProxyServer, listener: socket.socket, address, family: int) -> None:
        self.server = server
        self.listener = listener
        self.address = address
        self.family = family

    def connect(self, timeout: float = 10):
        """A gevent client socket connected to the proxy: the 'enclave' side."""
        client = gevent.socket.socket(self.family, socket.SOCK_STREAM)
        client.settimeout(timeout)
        client.connect(self.address)
        return client


def echo(sock) -> None:
    """A target handler: send back everything until EOF, then half-close."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def recv_all(sock, limit: int = 1 << 30) -> bytes:
    """Read until EOF."""
    chunks = []
    total = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        assert total <= limit, "peer sent more than expected"


def recv_exactly(sock, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class TcpListeners:
    """A Supervisor's listener factory for tests: each vsock port listens on TCP 127.0.0.1, any port."""

    def __init__(self) -> None:
        self.addresses: dict[int, tuple[str, int]] = {}
        self.sockets: dict[int, socket.socket] = {}

    def __call__(self, port: int) -> socket.socket:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        listener.setblocking(False)
        self.addresses[port], self.sockets[port] = listener.getsockname(), listener
        return listener


def supervisor_for(arguments: list[str], listen: Callable[[int], socket.socket]):
    """A Supervisor of this process for ``vsock-proxy ARGUMENTS``, listening through ``listen``."""
    from vsockproxy.cli import options_from, parse_arguments
    from vsockproxy.supervisor import Supervisor

    return Supervisor(options_from(parse_arguments(arguments)), listen)


def free_vsock_port() -> int:
    """A vsock port nothing listens on now (bound and released; bind never leaves the machine)."""
    for _ in range(100):
        port = random.randint(20000, 60000)
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            probe.bind((socket.VMADDR_CID_ANY, port))
            return port
        except OSError:
            continue
        finally:
            probe.close()
    raise RuntimeError("no free vsock port found")


def vsock_available() -> bool:
    """Whether this kernel can make AF_VSOCK sockets (to bind and listen; never to connect here)."""
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        return True
    except (AttributeError, OSError):
        return False


#: Socket timeout of ThreadedTarget's connections: generous, for the TCG-emulated VM.
THREAD_IO_TIMEOUT = 60.0


class ThreadedTarget:
    """A real TCP server (one thread per connection) running ``handler(sock)``."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(self.family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.peers: list[tuple] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            self.peers.append(peer)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(THREAD_IO_TIMEOUT)
        try:
            self.handler(sock)
        except Exception as exc:  # kept for the test to inspect
            self.errors.append(exc)
        finally:
            sock.close()

    def stop(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


def sha256_of_stream(sock: socket.socket) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    buffer = bytearray(1 << 20)
    while True:
        count = sock.recv_into(buffer)
        if not count:
            return digest.hexdigest(), total
        digest.update(memoryview(buffer)[:count])
        total += count


# --------------------------------------------------------------------------- --processes N

def children_of(pid: int) -> set[int]:
    """The PIDs whose parent is ``pid`` now (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def scrape(address: tuple[str, int], timeout: float = 30) -> dict[str, float]:
    """The samples of a Prometheus text page, keyed by ``name{labels}`` as printed."""
    with socket.create_connection(address, timeout=timeout) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        response = recv_all(client)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that ``seed`` alone decides: what a streaming() target sends, for the client to check."""
    return random.Random(seed).randbytes(size)


def streaming(chunk: int = 1 << 16, pause: float = 0.01) -> Callable[[socket.socket], None]:
    """A target handler: read a request ``SEED SIZE\\n``, send pattern(SEED, SIZE) in chunks with pauses, close.

    The pauses keep connections open long enough for a test to act while bytes flow.
    """
    def handler(sock: socket.socket) -> None:
        request = b""
        while not request.endswith(b"\n"):
            data = sock.recv(64)
            if not data:
                return
            request += data
        seed, size = (int(field) for field in request.split())
        data = memoryview(pattern(seed, size))
        for start in range(0, size, chunk):
            sock.sendall(data[start:start + chunk])
            time.sleep(pause)
    return handler


def fetch_pattern(sock: socket.socket, seed: int, size: int) -> str:
    """Ask a streaming target for pattern(seed, size): 'intact', 'cut' (short, from a closed peer) or 'corrupt'."""
    try:
        sock.sendall(f"{seed} {size}\n".encode())
        digest, total = sha256_of_stream(sock)
    except OSError:
        return "cut"
    if total < size:
        return "cut"
    return "intact" if (digest, total) == (hashlib.sha256(pattern(seed, size)).hexdigest(), size) else "corrupt"

# --------------------------------------------------------------------------- TLS and HTTP for the routed modes

def client_hello(server_name: str | None) -> bytes:
    """The first flight of a TLS client for ``server_name`` (None: no SNI extension), as Python's ssl sends it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_name is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:  # the client has sent its ClientHello and waits for the server's answer
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and hello[5:6] == b"\x01", hello[:6]  # handshake record, ClientHello
    return hello


def self_signed_certificate(directory: Path, name: str = "localhost", timeout: float = 60) -> tuple[Path, Path]:
    """A certificate and key for DNS:``name``, as ``openssl req -x509`` makes them."""
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(certificate)],
                   check=True, capture_output=True, timeout=timeout)
    return certificate, key


def http_response_head(sock) -> bytes:
    """The bytes up to and including the blank line that ends a response's header section."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head
