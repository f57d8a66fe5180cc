"""The configuration: the YAML file and the options, checked and turned into frozen service descriptions.

The file has upstream's format, plus optional ``services:`` (several listeners in one process)::

    allowlist:
    - {address: kms.us-east-1.amazonaws.com, port: 443}
    services:
    - {listen_port: 8000, address: kms.us-east-1.amazonaws.com, port: 443, num_workers: 8}

The command line (with its environment variables and settings file, parsed by cli.py) gives
the defaults that services of the file take, and may add one service of its own.  Both
sources are checked by the same validators, so a value means the same wherever it is written.
Reading a file is bounded (its size, nesting, number of values, entries and services), so
that no file costs more than about a second of CPU.  Nothing here imports gevent: the file
is also read in a child process (loader.py).
"""

from __future__ import annotations

import math
import os
import re
import socket
import stat
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from vsockproxy.allowlist import Allowlist, Rule, rule_for
from vsockproxy.hostnames import HostError, host_port, short_repr

DEFAULT_PATH = "/etc/nitro_enclaves/vsock-proxy.yaml"
MAX_VSOCK_PORT = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_PORT_ANY

# Bounds on the work one file can cause, so that a bad file costs a reload at most a second or so of
# (native) CPU.  An allowlist needs 4 levels of nesting and about 6 YAML values per entry.
MAX_FILE_BYTES = 256 * 1024  # upstream's KMS list is 5 KiB; this fits ~11,000 entries `- {address: a, port: 1}`
MAX_DEPTH = 32               # lists and mappings inside each other
MAX_NODES = 100_000          # YAML values (scalars, lists, mappings, aliases); a full file of entries has 55,000
MAX_ENTRIES = 20_000         # more than fit in MAX_FILE_BYTES without aliases
MAX_SERVICES = 1_000         # each one is a listener, a worker pool and an authorize() pass

# libyaml (in PyYAML's wheels) parses about ten times faster than the pure-Python reader, and it is
# what upstream's serde_yaml is ported from.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file (or option) and the fault."""


# --------------------------------------------------------------------------- one set of validators

@dataclass(frozen=True)
class WholeNumber:
    """A whole number from ``low`` to ``high``: a port, a CID, a count."""

    low: int
    high: int

    def check(self, value: int, what: str) -> int:
        """``value``, or ValueError naming ``what``."""
        if not self.low <= value <= self.high:
            raise ValueError(f"{what} must be from {self.low} to {self.high}, got {value}")
        return value

    def parse(self, text: str, what: str) -> int:
        """The number ``text`` spells in decimal (an option's value), checked."""
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a whole number, got {short_repr(text)}") from None
        return self.check(value, what)


@dataclass(frozen=True)
class Seconds:
    """A finite duration; zero may mean "never" (``zero_ok``) or be refused."""

    zero_ok: bool

    @property
    def wording(self) -> str:
        return "0 or more" if self.zero_ok else "more than 0"

    def check(self, value: float, what: str) -> float:
        if not math.isfinite(value) or value < 0 or (value == 0 and not self.zero_ok):
            raise ValueError(f"{what} must be {self.wording} seconds, got {value:g}")
        return float(value)

    def parse(self, text: str, what: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a number of seconds, got {short_repr(text)}") from None
        return self.check(value, what)


VSOCK_PORT = WholeNumber(1, MAX_VSOCK_PORT)
TCP_PORT = WholeNumber(1, 65535)
NUM_WORKERS = WholeNumber(1, 1_000_000)
#: An enclave's vsock CID: 0 is the hypervisor's and 0xFFFFFFFF means "any"; 1 is the local CID (vsock_loopback).
CID = WholeNumber(1, 0xFFFFFFFE)
PROCESSES = WholeNumber(1, 1024)
CONNECT_TIMEOUT = Seconds(zero_ok=False)
IDLE_TIMEOUT = Seconds(zero_ok=True)
HANDSHAKE_TIMEOUT = Seconds(zero_ok=False)

#: How a service finds its target: ``fixed`` from its own address and port (upstream's only way),
#: the others from each connection's first bytes (see handshake.py), checked against the allowlist.
FIXED = "fixed"
ROUTED_MODES = ("http-connect", "socks5", "sni")
MODES = (FIXED, *ROUTED_MODES)

#: Workers (connections relayed at once) of a service whose entry and command line name none.  A fixed
#: route keeps upstream's 4.  A request-routed port is shared by every client of the enclave, and SDKs
#: keep pools of open connections (boto3 10, the AWS SDK for Java 50), so 4 would let one client's pool
#: hold the port while everyone else waits in the backlog.
DEFAULT_NUM_WORKERS = {FIXED: 4, **{mode: 64 for mode in ROUTED_MODES}}

#: boto3's default ``max_pool_connections``: a service with fewer workers than this can be held
#: whole by one pooled client, which ``--check`` warns about.
SDK_POOL_CONNECTIONS = 10


def parse_bind_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into a bind address; raises ValueError."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host or any(c in host for c in "[]"):
        raise ValueError(f"expected HOST:PORT, got {short_repr(text)}")
    return host, int(port)


# --------------------------------------------------------------------------- what the sources say

@dataclass(frozen=True)
class ServiceEntry:
    """One service as the file (or the command line) gives it; None takes the command line's default."""

    listen_port: int
    address: str | None        # None in the request-routed modes
    port: int | None           # None in modes http-connect and socks5
    num_workers: int | None = None
    family: int | None = None  # AF_INET for ``ipv4: true``, AF_INET6 for ``ipv6: true``
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    mode: str = FIXED
    verify_sni: bool = False
    handshake_timeout: float | None = None
    from_cids: frozenset[int] | None = None  # None: any enclave

    def __str__(self) -> str:
        return _describe(self.listen_port, self.mode, self.address, self.port)


@dataclass(frozen=True)
class FileConfig:
    """Everything the YAML file says: the allowlist and any services."""

    allowlist: Allowlist
    services: tuple[ServiceEntry, ...] = ()


@dataclass(frozen=True)
class Defaults:
    """What a service takes from the command line unless its own entry says otherwise."""

    num_workers: int | None = None  # None: DEFAULT_NUM_WORKERS of the service's mode
    family: int = socket.AF_UNSPEC
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class Options:
    """Everything but the file: the command line, its environment variables and settings file, checked."""

    config_path: str = DEFAULT_PATH
    command_line_service: ServiceEntry | None = None
    defaults: Defaults = Defaults()
    dns_ttl: float = 30.0
    shutdown_grace: float = 30.0
    metrics_address: str | None = None
    processes: int = 1  # the command line's default is "auto", one per CPU the process may run on


# --------------------------------------------------------------------------- what runs

@dataclass(frozen=True)
class Service:
    """One service as it runs: every setting decided."""

    listen_port: int
    address: str | None
    port: int | None
    num_workers: int
    family: int
    connect_timeout: float
    idle_timeout: float
    mode: str = FIXED
    verify_sni: bool = False
    handshake_timeout: float = 10.0
    from_cids: frozenset[int] | None = None  # None: any enclave

    def __str__(self) -> str:
        return _describe(self.listen_port, self.mode, self.address, self.port)


def _describe(listen_port: int, mode: str, address: str | None, port: int | None) -> str:
    if mode == FIXED:
        return f"vsock port {listen_port} -> {host_port(address, port)}"
    return f"vsock port {listen_port} ({mode}{'' if port is None else f', port {port}'})"


@dataclass(frozen=True)
class Config:
    """The allowlist, and every service with its settings decided."""

    allowlist: Allowlist
    services: tuple[Service, ...]


def configure(file: FileConfig, options: Options) -> Config:
    """The services of the file and of the command line, with the command line's defaults; raises ConfigError."""
    entries = list(file.services)
    command_line = options.command_line_service
    if command_line is not None:
        if any(entry.listen_port == command_line.listen_port for entry in entries):
            raise ConfigError(f"vsock port {command_line.listen_port} is both on the command line "
                              f"and in {options.config_path}")
        entries.insert(0, command_line)
    if not entries:
        raise ConfigError(f"nothing to serve: give LOCAL_PORT REMOTE_ADDR REMOTE_PORT "
                          f"or list services in {options.config_path}")
    return Config(file.allowlist, tuple(_decide(entry, options.defaults) for entry in entries))


def _decide(entry: ServiceEntry, defaults: Defaults) -> Service:
    def either(value, default):
        return default if value is None else value

    return Service(entry.listen_port, entry.address, entry.port,
                   num_workers=either(entry.num_workers, either(defaults.num_workers,
                                                                DEFAULT_NUM_WORKERS[entry.mode])),
                   family=either(entry.family, defaults.family),
                   connect_timeout=either(entry.connect_timeout, defaults.connect_timeout),
                   idle_timeout=either(entry.idle_timeout, defaults.idle_timeout),
                   mode=entry.mode, verify_sni=entry.verify_sni,
                   handshake_timeout=either(entry.handshake_timeout, defaults.handshake_timeout),
                   from_cids=entry.from_cids)


def _family(ipv4: bool, ipv6: bool) -> int | None:
    return socket.AF_INET if ipv4 else socket.AF_INET6 if ipv6 else None


# --------------------------------------------------------------------------- reading the file

def load_file(path: str) -> FileConfig:
    """Read and check the YAML file at ``path``; raises ConfigError."""
    try:
        # O_NONBLOCK: a FIFO without a writer must not hang start-up or a reload.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file")
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return parse_document(parse_yaml(data, path), path)


def parse_yaml(data: bytes | str, source: str) -> Any:
    """``yaml.safe_load`` within the bounds, after refusing what YAML readers disagree on; one-line ConfigErrors."""
    try:
        _refuse_oversized(data, source)
        loader = _LOADER(data)
        try:
            root = loader.get_single_node()
            _refuse_ambiguities(root, source)
            return None if root is None else loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        if exc.problem == "exceeded maximum nesting depth" and exc.problem_mark:
            # libyaml's own limit (1000), met while it scans ahead of the events on one long line
            raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep at line "
                              f"{exc.problem_mark.line + 1}") from None
        where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" \
            if exc.problem_mark else ""
        problem = " ".join(str(exc.problem or exc.context).split())
        raise ConfigError(f"{source}: not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # PyYAML's constructors raise these for values such as `!!int abc` or 5,000-digit numbers.
        raise ConfigError(f"{source}: not valid YAML: bad value: {short_repr(str(exc))}") from None


def _refuse_oversized(data: bytes | str, source: str) -> None:
    """Refuse deep nesting and too many values, from the event stream, before anything recursive runs.

    Composing is recursive (in C with libyaml, where running out of stack is a crash, not an
    exception), so the depth must be known first; the events come from an iterative parser.
    """
    depth = nodes = 0
    for event in yaml.parse(data, Loader=_LOADER):
        if isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.NodeEvent):  # a scalar, an alias, or the start of a list or mapping
            nodes += 1
            if nodes > MAX_NODES:
                raise ConfigError(f"{source}: more than {MAX_NODES} YAML values (an allowlist entry has about 6)")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep at line "
                                      f"{event.start_mark.line + 1}")


_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)|0x[0-9a-fA-F]+")


def _refuse_ambiguities(root: yaml.Node | None, source: str) -> None:
    """Refuse duplicate keys, merge keys and integers that YAML 1.1 (PyYAML) and 1.2 (upstream) read differently.

    ``port: 0443`` is 291 to YAML 1.1 but 443 to YAML 1.2; ``7:23`` and ``4_43``
    are 443 to one and strings to the other.  A gate must not mean two things.  Nor may the
    merge key ``<<``: a merge to PyYAML, a plain key to YAML 1.2; it also lets each of N entries
    copy a mapping of N keys, N squared work from a small file.
    """
    stack = [root] if root is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:  # aliases share nodes: check each once
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:int" and not _PLAIN_INT.fullmatch(node.value):
                raise ConfigError(f"{source}: ambiguous integer {short_repr(node.value)} at line "
                                  f"{node.start_mark.line + 1}: write it in plain decimal")
        elif isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.tag == "tag:yaml.org,2002:merge":
                        raise ConfigError(f"{source}: merge key '<<' at line {key.start_mark.line + 1}: "
                                          f"write the keys out")
                    if key.value in keys:
                        raise ConfigError(f"{source}: duplicate key {short_repr(key.value)} at line "
                                          f"{key.start_mark.line + 1}")
                    keys.add(key.value)
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def parse_document(document: Any, source: str) -> FileConfig:
    """Check a loaded YAML document against the file format; raises ConfigError."""
    if document is None:
        raise ConfigError(f"{source}: file is empty; expected an 'allowlist' list")
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping with an 'allowlist' key, found {_kind(document)}")
    unknown = [key for key in document if key not in ("allowlist", "deny", "services")]
    if unknown:
        raise ConfigError(f"{source}: unknown key {short_repr(unknown[0])}; expected 'allowlist' and optionally "
                          f"'deny' and 'services'")
    entries = document.get("allowlist")
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'allowlist' must be a list of {{address, port}} entries, "
                          f"found {_kind(entries)}")
    if len(entries) > MAX_ENTRIES:
        raise ConfigError(f"{source}: {len(entries)} allowlist entries, more than the {MAX_ENTRIES} allowed")
    port_lists: dict[int, frozenset[int]] = {}
    allowlist = Allowlist(tuple(_parse_rule(entry, f"{source}: allowlist entry {index}", port_lists)
                                for index, entry in enumerate(entries, 1)), source, _parse_deny(document, source))
    services = document.get("services", [])
    if not isinstance(services, list):
        raise ConfigError(f"{source}: 'services' must be a list, found {_kind(services)}")
    if len(services) > MAX_SERVICES:
        raise ConfigError(f"{source}: {len(services)} services, more than the {MAX_SERVICES} allowed")
    service_entries = tuple(_parse_service(entry, f"{source}: service {index}") for index, entry in enumerate(services, 1))
    seen: dict[int, int] = {}
    for index, entry in enumerate(service_entries, 1):
        if entry.listen_port in seen:
            raise ConfigError(f"{source}: services {seen[entry.listen_port]} and {index} "
                              f"both listen on vsock port {entry.listen_port}")
        seen[entry.listen_port] = index
    return FileConfig(allowlist, service_entries)


_SERVICE_KEYS = ("listen_port", "mode", "address", "port", "num_workers", "ipv4", "ipv6", "connect_timeout",
                 "idle_timeout", "handshake_timeout", "verify_sni", "from_cids")
#: Which of address and port each mode takes: True required, False refused.
_TARGET_KEYS = {FIXED: {"address": True, "port": True}, "http-connect": {"address": False, "port": False},
                "socks5": {"address": False, "port": False}, "sni": {"address": False, "port": True}}


def _parse_service(entry: Any, where: str) -> ServiceEntry:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with listen_port, address and port, found {_kind(entry)}")
    unknown = [key for key in entry if key not in _SERVICE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {short_repr(unknown[0])}; expected {', '.join(_SERVICE_KEYS)}")
    mode = entry.get("mode", FIXED)
    if mode not in MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}, found {_kind(mode)}")
    if "listen_port" not in entry:
        raise ConfigError(f"{where}: missing 'listen_port'")
    for key, required in _TARGET_KEYS[mode].items():
        if required and entry.get(key) is None:
            raise ConfigError(f"{where}: missing '{key}'")
        if not required and key in entry:
            raise ConfigError(f"{where}: mode {mode} takes no '{key}': "
                              f"{'each request names its target' if key == 'address' else 'each request names its port'}")
    if "address" in entry and not isinstance(entry["address"], str):
        raise ConfigError(f"{where}: address must be a string, found {_kind(entry['address'])}")
    if not isinstance(entry.get("verify_sni", False), bool):
        raise ConfigError(f"{where}: verify_sni must be true or false, found {_kind(entry['verify_sni'])}")
    if entry.get("verify_sni") and mode not in ("http-connect", "socks5"):
        raise ConfigError(f"{where}: verify_sni applies to modes http-connect and socks5 only")
    for key in ("ipv4", "ipv6"):
        if not isinstance(entry.get(key, False), bool):
            raise ConfigError(f"{where}: {key} must be true or false, found {_kind(entry[key])}")
    if entry.get("ipv4") and entry.get("ipv6"):
        raise ConfigError(f"{where}: ipv4 and ipv6 cannot both be true")

    def optional(key: str, check: Callable[[Any, str], Any]) -> Any:
        return None if entry.get(key) is None else check(entry[key], f"{where}: {key}")

    return ServiceEntry(
        listen_port=_yaml_integer(entry["listen_port"], VSOCK_PORT, f"{where}: listen_port"),
        address=entry.get("address"),
        port=optional("port", lambda v, w: _yaml_integer(v, TCP_PORT, w)),
        num_workers=optional("num_workers", lambda v, w: _yaml_integer(v, NUM_WORKERS, w)),
        family=_family(entry.get("ipv4", False), entry.get("ipv6", False)),
        connect_timeout=optional("connect_timeout", lambda v, w: _yaml_seconds(v, CONNECT_TIMEOUT, w)),
        idle_timeout=optional("idle_timeout", lambda v, w: _yaml_seconds(v, IDLE_TIMEOUT, w)),
        mode=mode,
        verify_sni=entry.get("verify_sni", False),
        handshake_timeout=optional("handshake_timeout", lambda v, w: _yaml_seconds(v, HANDSHAKE_TIMEOUT, w)),
        from_cids=_parse_cids(entry["from_cids"], f"{where}: from_cids") if "from_cids" in entry else None,
    )


def _parse_cids(value: Any, where: str) -> frozenset[int]:
    """A service's ``from_cids``: a non-empty list of distinct enclave CIDs."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of enclave CIDs, found {_kind(value)}")
    cids: set[int] = set()
    for item in value:
        cid = _yaml_integer(item, CID, f"{where}: CID")
        if cid in cids:
            raise ConfigError(f"{where} lists CID {cid} twice")
        cids.add(cid)
    return frozenset(cids)


def _yaml_integer(value: Any, valid: WholeNumber, where: str) -> int:
    """A YAML integer within ``valid``; strings, floats and booleans are refused, not converted."""
    if type(value) is not int:
        raise ConfigError(f"{where} must be an integer from {valid.low} to {valid.high}, found {_kind(value)}")
    try:
        return valid.check(value, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _yaml_seconds(value: Any, valid: Seconds, where: str) -> float:
    if type(value) not in (int, float):
        raise ConfigError(f"{where} must be {valid.wording} seconds, found {_kind(value)}")
    try:
        return valid.check(value, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _parse_rule(entry: Any, where: str, port_lists: dict[int, frozenset[int]]) -> Rule:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with 'address' and 'port', found {_kind(entry)}")
    unknown = [key for key in entry if key not in ("address", "port", "allow_internal")]
    if unknown:
        raise ConfigError(f"{where}: unknown key {short_repr(unknown[0])}; expected 'address', 'port' "
                          f"and optionally 'allow_internal'")
    for key in ("address", "port"):
        if key not in entry:
            raise ConfigError(f"{where}: missing '{key}'")
    ports = _parse_ports(entry["port"], where, port_lists)
    address = entry["address"]
    if not isinstance(address, str):
        raise ConfigError(f"{where}: address must be a string, found {_kind(address)}")
    allow_internal = entry.get("allow_internal", False)
    if not isinstance(allow_internal, bool):
        raise ConfigError(f"{where}: allow_internal must be true or false, found {_kind(allow_internal)}")
    if allow_internal and not address.startswith("*."):
        raise ConfigError(f"{where}: allow_internal applies to wildcard (*.) entries only: exact names and "
                          f"IP or CIDR entries may reach internal addresses anyway")
    try:
        return rule_for(address, ports, allow_internal)
    except (HostError, ValueError) as exc:
        raise ConfigError(f"{where}: bad address: {exc}") from None


def _parse_deny(document: dict, source: str) -> tuple[Rule, ...]:
    """The optional top-level ``deny:`` list: IPs, CIDRs, exact names and ``*.`` names, as strings."""
    entries = document.get("deny", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'deny' must be a list of addresses, CIDRs and names, found {_kind(entries)}")
    if len(entries) > MAX_ENTRIES:
        raise ConfigError(f"{source}: {len(entries)} deny entries, more than the {MAX_ENTRIES} allowed")
    rules = []
    for index, address in enumerate(entries, 1):
        if not isinstance(address, str):
            raise ConfigError(f"{source}: deny entry {index} must be a string (an address, a CIDR or a name), "
                              f"found {_kind(address)}")
        try:
            rules.append(rule_for(address, frozenset()))
        except (HostError, ValueError) as exc:
            raise ConfigError(f"{source}: deny entry {index}: bad address: {exc}") from None
    return tuple(rules)


def _parse_ports(value: Any, where: str, port_lists: dict[int, frozenset[int]]) -> frozenset[int]:
    """The entry's ports; a list that YAML aliases share (``port: *web``) is checked only once.

    Otherwise a list of thousands of ports, aliased by thousands of entries, would cost their product.
    """
    if not isinstance(value, list):
        return frozenset([_yaml_integer(value, TCP_PORT, f"{where}: port")])
    ports = port_lists.get(id(value))
    if ports is None:
        if not value:
            raise ConfigError(f"{where}: port list is empty")
        ports = port_lists[id(value)] = frozenset(_yaml_integer(port, TCP_PORT, f"{where}: port") for port in value)
    return ports


def _kind(value: Any) -> str:
    """A short, safe description of a YAML value for error messages."""
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {short_repr(value)}"
