"""The allowlist: which TCP endpoints the enclave may reach, read from upstream's YAML file.

A file looks like upstream's::

    allowlist:
    - {address: kms.us-east-1.amazonaws.com, port: 443}

A target ``(REMOTE_ADDR, REMOTE_PORT)`` is allowed when an entry with that
port either *names* it (same DNS name, ignoring case and one trailing dot;
same IP literal; a ``*.domain`` wildcard; a CIDR containing the literal) or,
failing that, *admits its addresses* (the entry resolves to, or its CIDR
contains, an address REMOTE_ADDR resolves to).  A target allowed only through
its addresses stays pinned to them: every connection re-resolves, and only
addresses an entry still admits are used.

The same file may also list ``services:`` (several listeners in one process);
each service's target must pass the allowlist like a command-line target.

Reading a file is bounded (its size, nesting, number of values, entries and
services), so that no file costs more than about a second of CPU.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import yaml

from vsockproxy.hostnames import HostError, IPAddress, canonical_host, canonical_name, parse_ip, short_repr
from vsockproxy.resolver import Endpoint, ResolveError, Resolver

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
    """The allowlist file cannot be used; the message names the file and the fault."""


class NotAllowed(Exception):
    """The allowlist does not allow the requested target."""


@dataclass(frozen=True)
class Rule:
    """One allowlist entry, parsed into exactly one of: a name, a wildcard suffix, a network."""

    spelling: str
    ports: frozenset[int]
    name: str | None = None
    suffix: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def names(self, host: str) -> bool:
        """Whether this entry allows ``host`` (canonical) by its spelling alone."""
        if self.network is not None:
            address = parse_ip(host)
            return address is not None and address in self.network
        if self.suffix is not None:
            return host.endswith("." + self.suffix)
        return host == self.name

    def admits(self, address: IPAddress, resolver: Resolver, port: int) -> bool:
        """Whether ``address`` is one this entry stands for; name entries are resolved."""
        if self.network is not None:
            return address in self.network
        if self.name is None:
            return False
        try:
            return any(endpoint.ip == address for endpoint in resolver.resolve(self.name, port))
        except ResolveError:
            return False

    def __str__(self) -> str:
        return _host_port(self.spelling, ",".join(str(p) for p in sorted(self.ports)))


@dataclass(frozen=True)
class Target:
    """A target the allowlist allowed, with the entries that still bound its addresses."""

    host: str
    port: int
    allowed_by: Rule
    pinned_to: tuple[Rule, ...] | None = None

    def endpoints(self, resolver: Resolver) -> list[Endpoint]:
        """The addresses to try now: resolved afresh (or from cache) and, if pinned, filtered."""
        endpoints = resolver.resolve(self.host, self.port)
        if self.pinned_to is None:
            return endpoints
        allowed = [e for e in endpoints if any(r.admits(e.ip, resolver, self.port) for r in self.pinned_to)]
        if not allowed:
            found = ", ".join(str(e.ip) for e in endpoints)
            raise ResolveError(f"{self.host} now resolves to {found}, which no allowlist entry admits")
        return allowed

    def __str__(self) -> str:
        return _host_port(self.host, self.port)


@dataclass(frozen=True)
class Allowlist:
    """The parsed entries of one allowlist file."""

    rules: tuple[Rule, ...]
    source: str

    def authorize(self, host: str, port: int, resolver: Resolver) -> Target:
        """The allowed Target for ``host:port``, or NotAllowed saying why not."""
        try:
            canonical = canonical_host(host)
        except HostError as exc:
            raise NotAllowed(f"remote address {exc}") from None
        if parse_ip(canonical) is not None:
            try:
                resolver.resolve(canonical, port)  # no DNS: checks the -4/-6 choice
            except ResolveError as exc:
                raise NotAllowed(str(exc)) from None
        candidates = [rule for rule in self.rules if port in rule.ports]
        if not candidates:
            raise NotAllowed(f"{_host_port(canonical, port)} is not allowed: {self.source} has no entry for port {port}")
        for rule in candidates:
            if rule.names(canonical):
                return Target(canonical, port, rule)
        try:
            endpoints = resolver.resolve(canonical, port)
        except ResolveError as exc:
            raise NotAllowed(f"{exc}; no entry in {self.source} names {_host_port(canonical, port)}") from None
        admitting = tuple(
            rule for rule in candidates if any(rule.admits(e.ip, resolver, port) for e in endpoints)
        )
        if not admitting:
            raise NotAllowed(f"{_host_port(canonical, port)} is not in the allowlist {self.source}")
        return Target(canonical, port, admitting[0], admitting)


@dataclass(frozen=True)
class ServiceSpec:
    """One listener from the ``services:`` list; None fields take the command line's value."""

    listen_port: int
    address: str
    port: int
    num_workers: int | None = None
    ipv4: bool = False
    ipv6: bool = False
    connect_timeout: float | None = None
    idle_timeout: float | None = None

    def __str__(self) -> str:
        return f"vsock port {self.listen_port} -> {_host_port(self.address, self.port)}"


@dataclass(frozen=True)
class ProxyConfig:
    """Everything the YAML file says: the allowlist and any services."""

    allowlist: Allowlist
    services: tuple[ServiceSpec, ...] = ()


def load_config(path: str) -> ProxyConfig:
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
    return parse_config(parse_yaml(data, path), path)


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


def parse_config(document: Any, source: str) -> ProxyConfig:
    """Check a loaded YAML document against the file format; raises ConfigError."""
    if document is None:
        raise ConfigError(f"{source}: file is empty; expected an 'allowlist' list")
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping with an 'allowlist' key, found {_kind(document)}")
    unknown = [key for key in document if key not in ("allowlist", "services")]
    if unknown:
        raise ConfigError(f"{source}: unknown key {short_repr(unknown[0])}; expected 'allowlist' and optionally 'services'")
    entries = document.get("allowlist")
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'allowlist' must be a list of {{address, port}} entries, "
                          f"found {_kind(entries)}")
    if len(entries) > MAX_ENTRIES:
        raise ConfigError(f"{source}: {len(entries)} allowlist entries, more than the {MAX_ENTRIES} allowed")
    port_lists: dict[int, frozenset[int]] = {}
    allowlist = Allowlist(tuple(_parse_rule(entry, f"{source}: allowlist entry {index}", port_lists)
                                for index, entry in enumerate(entries, 1)), source)
    services = document.get("services", [])
    if not isinstance(services, list):
        raise ConfigError(f"{source}: 'services' must be a list, found {_kind(services)}")
    if len(services) > MAX_SERVICES:
        raise ConfigError(f"{source}: {len(services)} services, more than the {MAX_SERVICES} allowed")
    specs = tuple(_parse_service(entry, f"{source}: service {index}") for index, entry in enumerate(services, 1))
    seen: dict[int, int] = {}
    for index, spec in enumerate(specs, 1):
        if spec.listen_port in seen:
            raise ConfigError(f"{source}: services {seen[spec.listen_port]} and {index} "
                              f"both listen on vsock port {spec.listen_port}")
        seen[spec.listen_port] = index
    return ProxyConfig(allowlist, specs)


_SERVICE_KEYS = ("listen_port", "address", "port", "num_workers", "ipv4", "ipv6", "connect_timeout",
                 "idle_timeout")


def _parse_service(entry: Any, where: str) -> ServiceSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with listen_port, address and port, found {_kind(entry)}")
    unknown = [key for key in entry if key not in _SERVICE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {short_repr(unknown[0])}; expected {', '.join(_SERVICE_KEYS)}")
    for key in ("listen_port", "address", "port"):
        if key not in entry:
            raise ConfigError(f"{where}: missing '{key}'")
    if not isinstance(entry["address"], str):
        raise ConfigError(f"{where}: address must be a string, found {_kind(entry['address'])}")
    for key in ("ipv4", "ipv6"):
        if not isinstance(entry.get(key, False), bool):
            raise ConfigError(f"{where}: {key} must be true or false, found {_kind(entry[key])}")
    if entry.get("ipv4") and entry.get("ipv6"):
        raise ConfigError(f"{where}: ipv4 and ipv6 cannot both be true")
    return ServiceSpec(
        listen_port=_integer(entry["listen_port"], 1, MAX_VSOCK_PORT, f"{where}: listen_port"),
        address=entry["address"],
        port=_integer(entry["port"], 1, 65535, f"{where}: port"),
        num_workers=_optional(entry, "num_workers", lambda v, w: _integer(v, 1, 1_000_000, w), where),
        ipv4=entry.get("ipv4", False),
        ipv6=entry.get("ipv6", False),
        connect_timeout=_optional(entry, "connect_timeout", lambda v, w: _seconds(v, w, zero_ok=False), where),
        idle_timeout=_optional(entry, "idle_timeout", lambda v, w: _seconds(v, w, zero_ok=True), where),
    )


def _optional(entry: dict, key: str, parse, where: str):
    return parse(entry[key], f"{where}: {key}") if entry.get(key) is not None else None


def _integer(value: Any, low: int, high: int, where: str) -> int:
    if type(value) is not int:
        raise ConfigError(f"{where} must be an integer from {low} to {high}, found {_kind(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where} {value} is out of range {low}-{high}")
    return value


def _seconds(value: Any, where: str, zero_ok: bool) -> float:
    if type(value) not in (int, float) or value != value or value in (float("inf"), float("-inf")) \
            or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{where} must be a number of seconds {'>= 0' if zero_ok else '> 0'}, "
                          f"found {_kind(value)}")
    return float(value)


def _parse_rule(entry: Any, where: str, port_lists: dict[int, frozenset[int]]) -> Rule:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with 'address' and 'port', found {_kind(entry)}")
    unknown = [key for key in entry if key not in ("address", "port")]
    if unknown:
        raise ConfigError(f"{where}: unknown key {short_repr(unknown[0])}; expected 'address' and 'port'")
    for key in ("address", "port"):
        if key not in entry:
            raise ConfigError(f"{where}: missing '{key}'")
    ports = _parse_ports(entry["port"], where, port_lists)
    address = entry["address"]
    if not isinstance(address, str):
        raise ConfigError(f"{where}: address must be a string, found {_kind(address)}")
    try:
        return _rule_for_address(address, ports)
    except (HostError, ValueError) as exc:
        raise ConfigError(f"{where}: bad address: {exc}") from None


def _rule_for_address(address: str, ports: frozenset[int]) -> Rule:
    if address.startswith("*."):
        return Rule(address, ports, suffix=canonical_name(address[2:]))
    if "/" in address:
        return Rule(address, ports, network=ipaddress.ip_network(address, strict=True))
    literal = parse_ip(address)
    if literal is not None:
        return Rule(address, ports, network=ipaddress.ip_network(literal))
    return Rule(address, ports, name=canonical_name(address))


def _parse_ports(value: Any, where: str, port_lists: dict[int, frozenset[int]]) -> frozenset[int]:
    """The entry's ports; a list that YAML aliases share (``port: *web``) is checked only once.

    Otherwise a list of thousands of ports, aliased by thousands of entries, would cost their product.
    """
    if not isinstance(value, list):
        return frozenset([_integer(value, 1, 65535, f"{where}: port")])
    ports = port_lists.get(id(value))
    if ports is None:
        if not value:
            raise ConfigError(f"{where}: port list is empty")
        ports = port_lists[id(value)] = frozenset(_integer(port, 1, 65535, f"{where}: port") for port in value)
    return ports


def _host_port(host: str, port: object) -> str:
    """``host:port``, with IPv6 addresses in brackets so the port stays readable."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _kind(value: Any) -> str:
    """A short, safe description of a YAML value for error messages."""
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {short_repr(value)}"
