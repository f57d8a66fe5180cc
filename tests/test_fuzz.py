"""Bad input, fuzzed (issue 6, section 1): the YAML allowlist/config loader and the CLI.

Every generated case must end in exactly one of:

* a valid ``FileConfig`` (or a settings ``Namespace``) whose every value is in its documented range and
  which allows no more than the file says; or
* one clear error: a ``ConfigError`` whose message is ONE line starting with the file's name, or, for the
  CLI, exit status 2 with exactly one stderr line ``vsock-proxy: error: ...`` (``--help``/``--version``:
  status 0, output on stdout).

Nothing else may escape (no traceback, no other exception type), nothing may hang (each case runs under
a wall-clock limit), and no YAML tag may execute code (a marker file that the payloads would create must
never appear).  Hypothesis runs derandomized (same cases every run, no example database) so CI is
reproducible; ``FUZZ_CASES`` is the number of generated cases per test, ``FUZZ_TOTAL`` their sum.

No network: every Resolver gets a fake ``getaddrinfo`` that answers from a table and, for anything else,
parses IPv4 numbers the way glibc does before any DNS (``inet_aton``), so a loose spelling that gets past
the checks is seen to reach an address exactly as it would on a real host.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import math
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import vsockproxy.cli as cli  # noqa: E402
from tests.fuzzing import fuzz_settings, run_counted as run_counted_cases  # noqa: E402
from tests.helpers import inet_aton_reads  # noqa: E402
from vsockproxy.allowlist import NotAllowed  # noqa: E402
from vsockproxy.config import (  # noqa: E402
    MAX_FILE_BYTES, MAX_VSOCK_PORT, ConfigError, FileConfig, load_file, parse_bind_address, parse_document, parse_yaml,
)
from vsockproxy.resolver import ResolveError, Resolver  # noqa: E402
from vsockproxy.listen import VMADDR_CID_ANY  # noqa: E402

# --------------------------------------------------------------------------- budget

FUZZ_CASES = {
    "yaml_random_bytes": 2500,       # arbitrary bytes, including non-UTF-8
    "yaml_random_text": 2000,        # arbitrary Unicode text
    "yaml_token_soup": 2500,         # YAML syntax, tags, anchors, keys and values glued at random
    "yaml_documents": 1200,          # random Python documents: wrong types, missing/unknown keys, ...
    "yaml_valid_allowlists": 1000,   # valid files; every authorize() checked against an oracle
    "yaml_files": 300,               # load_file(path) on tmp files
    "cli_argv_env": 2500,            # parse_arguments(argv) under random VSOCK_PROXY_* env and settings files
}
FUZZ_TOTAL = sum(FUZZ_CASES.values())
CASE_TIME_LIMIT = 10.0  # seconds; a case that takes longer is a hang

CASES_RUN: dict[str, int] = {}

MARKER = Path(tempfile.gettempdir()) / f"vsockproxy-fuzz-pwned-{os.getpid()}"
SOURCE = "fuzz.yaml"


def test_fuzz_budget_is_at_least_10000_cases():
    assert FUZZ_TOTAL >= 10_000, FUZZ_CASES
    print(f"fuzz budget: {FUZZ_TOTAL} generated cases per run: {FUZZ_CASES}")


def run_counted(name: str, inner) -> None:
    """Run the @given function ``inner``, check it ran its share of the budget and that no payload ran code."""
    run_counted_cases(name, inner, FUZZ_CASES, CASES_RUN)
    assert not MARKER.exists(), "a YAML payload executed code"


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Raise CaseTimeout in the main thread after ``seconds``.

    Nests: an outer limit (ours, or pytest-timeout's SIGALRM timer) that would fire first still fires
    first, through its own handler, and is re-armed with its remaining time afterwards.
    """
    started = time.monotonic()
    old_handler = signal.getsignal(signal.SIGALRM)
    old_delay, old_interval = signal.getitimer(signal.ITIMER_REAL)
    outer_first = 0 < old_delay <= seconds

    def on_alarm(signum, frame):
        if outer_first and callable(old_handler):
            old_handler(signum, frame)
        raise CaseTimeout(f"{what} took longer than {seconds}s (a hang)")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, old_delay if outer_first else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - started), 0.001), old_interval)


# --------------------------------------------------------------------------- independent oracles

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_NUMBER_LABEL = re.compile(r"[0-9]+\Z")


def try_ip(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_unambiguous_name(name: str) -> bool:
    """A lower-case ASCII DNS name without a trailing dot that no resolver reads as a number."""
    if not isinstance(name, str) or not name or not name.isascii() or len(name) > 253:
        return False
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    return not _NUMBER_LABEL.match(labels[-1]) and not inet_aton_reads(name)


def expected_canonical(host: str) -> str | None:
    """The one spelling ``host`` may be accepted under, or None if it may not be accepted."""
    address = try_ip(host)
    if address is not None:
        return str(address)
    if not host.isascii():
        return None
    name = host.lower()
    return name[:-1] if name.endswith(".") else name


def written_ports(value):
    return value if isinstance(value, list) else [value]


def entry_names(address: str, host: str) -> bool:
    """Whether the written entry ``address`` names the canonical ``host`` (README: exact, wildcard, network)."""
    if address.startswith("*."):
        suffix = address[2:].lower()
        suffix = suffix[:-1] if suffix.endswith(".") else suffix
        return host.endswith("." + suffix)
    ip = try_ip(host)
    if "/" in address:
        return ip is not None and ip in ipaddress.ip_network(address)
    literal = try_ip(address)
    if literal is not None:
        return ip is not None and ip in ipaddress.ip_network(literal)
    name = address.lower()
    return host == (name[:-1] if name.endswith(".") else name)


def entry_canonical_name(address: str) -> str | None:
    if address.startswith("*.") or "/" in address or try_ip(address) is not None:
        return None
    name = address.lower()
    return name[:-1] if name.endswith(".") else name


def assert_one_line_error(message: str, source: str) -> None:
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    assert message.startswith(f"{source}: "), f"error does not start with the source name: {message!r}"
    assert len(message) > len(source) + 2, message


def check_document_outcome(load, source: str, limit: float = CASE_TIME_LIMIT):
    """Run ``load()``: it returns (document, FileConfig) or raises a one-line ConfigError; else the test fails."""
    try:
        with time_limit(limit, "loading a document"):
            document, config = load()
    except ConfigError as exc:
        assert_one_line_error(str(exc), source)
        return None
    assert isinstance(config, FileConfig)
    check_config_matches_document(config, document)
    return config


def check_config_matches_document(config: FileConfig, document) -> None:
    """A config is exactly what the document says: same entries, same ports, unambiguous spellings."""
    assert isinstance(document, dict), document
    entries = document["allowlist"]
    rules = config.allowlist.rules
    assert len(rules) == len(entries)
    for rule, entry in zip(rules, entries):
        ports = written_ports(entry["port"])
        assert ports and all(type(p) is int and 1 <= p <= 65535 for p in ports), ports
        assert rule.ports == frozenset(ports), (rule.ports, ports)
        address = entry["address"]
        assert rule.spelling == address
        kinds = [rule.name is not None, rule.suffix is not None, rule.network is not None]
        assert kinds.count(True) == 1, rule
        if rule.name is not None:
            assert rule.name == entry_canonical_name(address), (rule.name, address)
            assert is_unambiguous_name(rule.name), f"ambiguous name accepted as an entry: {address!r}"
        elif rule.suffix is not None:
            assert address.startswith("*.")
            assert is_unambiguous_name(rule.suffix), f"ambiguous wildcard accepted: {address!r}"
            assert rule.suffix == entry_canonical_name(address[2:])
        else:
            expected = ipaddress.ip_network(address) if "/" in address \
                else ipaddress.ip_network(ipaddress.ip_address(address))
            assert rule.network == expected, (rule.network, address)
    services = document.get("services", []) or []
    assert len(config.services) == len(services)
    for spec, entry in zip(config.services, services):
        assert type(spec.listen_port) is int and 1 <= spec.listen_port <= MAX_VSOCK_PORT
        assert spec.listen_port == entry["listen_port"]
        assert type(spec.port) is int and 1 <= spec.port <= 65535 and spec.port == entry["port"]
        assert spec.address == entry["address"] and isinstance(spec.address, str)
        assert spec.family in (None, socket.AF_INET, socket.AF_INET6)
        assert spec.num_workers is None or (type(spec.num_workers) is int and 1 <= spec.num_workers <= 1_000_000)
        for value in (spec.connect_timeout, spec.idle_timeout):
            assert value is None or (isinstance(value, float) and math.isfinite(value) and value >= 0)
        assert spec.connect_timeout is None or spec.connect_timeout > 0
    assert len({s.listen_port for s in config.services}) == len(config.services)


def load_bytes_or_text(data):
    document = parse_yaml(data, SOURCE)
    return document, parse_document(document, SOURCE)


# --------------------------------------------------------------------------- fake DNS

class GlibcLikeDNS:
    """``getaddrinfo`` over a table; unknown hosts are read as IPv4 numbers like glibc, else NXDOMAIN."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.asked: list[str] = []

    def addresses(self, host: str, family: int) -> list[str]:
        found = self.records.get(host)
        if found is None and inet_aton_reads(host):
            found = [socket.inet_ntoa(socket.inet_aton(host))]
        wanted = {socket.AF_UNSPEC: (4, 6), socket.AF_INET: (4,), socket.AF_INET6: (6,)}[family]
        return [a for a in (found or []) if ipaddress.ip_address(a).version in wanted]

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.asked.append(host)
        found = self.addresses(host, family)
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in found]


# --------------------------------------------------------------------------- strategies: YAML

TAG_PAYLOADS = [
    f"!!python/object/apply:os.system ['touch {MARKER}']",
    f"!!python/object/apply:subprocess.call [[touch, {MARKER}]]",
    f"!!python/object/new:os.system ['touch {MARKER}']",
    f"!!python/object/apply:builtins.exec [\"open('{MARKER}', 'w')\"]",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object:builtins.object {}",
    "!!python/tuple [1, 2]",
    "!!python/bytes YWJj",
    f"!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {MARKER}']",
    "!custom x",
    "!foo%0Abar x",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!pairs [a: 1]",
    "!!timestamp 2001-12-14",
    "!!int '443'",
    "!!float 443",
    "!!str 443",
    "!!bool yes",
    "!!null ''",
    "!!merge <<",
]

YAML_TOKENS = [
    "allowlist:", "services:", "address:", "port:", "listen_port:", "num_workers:", "ipv4:", "ipv6:",
    "connect_timeout:", "idle_timeout:", "unknown:", "\n", "\n", "\n", "\n  ", "\n    ", " ", " ", "- ", "- ",
    "{", "}", "[", "]", ", ", ": ", "? ", "&a ", "&b ", "*a", "*b", "<<: ", "<<: *a", "'", '"', "|", ">", "#",
    "---\n", "...\n", "%YAML 1.1\n---\n", "%YAML 1.2\n---\n", "%TAG !p! tag:yaml.org,2002:python/\n---\n",
    "!p!object/apply:os.system ['touch MARKER']".replace("MARKER", str(MARKER)),
    "kms.us-east-1.amazonaws.com", "KMS.US-EAST-1.AMAZONAWS.COM.", "'*.example.com'", "*.example.com",
    "10.0.0.0/8", "'::1'", "::1", "127.0.0.1", "127.1", "0x7f000001", "2130706433", "'1234'", "fe80::1%lo",
    "443", "8443", "0", "-1", "65535", "65536", "4294967294", "4294967295", "99999999999999999999", "0x1bb",
    "0443", "7:23", "4_43", "+443", "443.0", "4.43e+2", ".inf", ".nan", "true", "no", "~", "null", "''",
    "[443, 8443]", "[]", "{}", "\t", "\x00", "\x85", "\ufeff", "\u2028", "caf\u00e9", "\U0001F600", "\\",
    "{address: kms.example, port: 443}", "{address: 127.0.0.1, port: [443, 8443]}",
    "{listen_port: 5000, address: kms.example, port: 443}", "\n- {address: a.example, port: 1}",
] + TAG_PAYLOADS

ENTRY_KEYS = st.sampled_from(["address", "port", "Address", "PORT", "addr", "ports", "", "listen_port", None, 1,
                              True, 3.5])
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, 1, 443, 65535, 65536, -1, MAX_VSOCK_PORT, MAX_VSOCK_PORT + 1, 2 ** 63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["443", "0x1bb", "kms.example", "*.example.com", "10.0.0.0/8", "::1", "127.1", "1234",
                     "0x7f000001", "", "*.", "a..b", "KMS.EXAMPLE.", "fe80::1%lo", "::ffff:127.0.0.1"]),
    st.binary(max_size=10),
    st.dates(),
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.text(max_size=10), st.integers(), st.none(),
                                                         st.booleans()), children, max_size=4)),
    max_leaves=12,
)
PORT_VALUES = st.one_of(st.integers(1, 65535), st.lists(st.integers(1, 65535), min_size=1, max_size=3), ANY_VALUE)
ADDRESS_VALUES = st.one_of(
    st.sampled_from(["kms.example", "KMS.Example.", "*.example.com", "10.0.0.0/8", "fd00::/8", "127.0.0.1", "::1",
                     "127.1", "0x7f000001", "1234", "kms.example..", ".kms.example", "k\u03bfms.example",
                     "10.0.0.1/8", "fe80::1%lo", "*.0x7f", "a" * 300]),
    ANY_VALUE,
)
ENTRY = st.one_of(
    st.fixed_dictionaries({"address": ADDRESS_VALUES, "port": PORT_VALUES}),
    st.fixed_dictionaries({}, optional={"address": ADDRESS_VALUES, "port": PORT_VALUES, "extra": ANY_VALUE}),
    st.dictionaries(ENTRY_KEYS, ANY_VALUE, max_size=4),
    ANY_VALUE,
)
SERVICE = st.one_of(
    st.fixed_dictionaries(
        {"listen_port": st.one_of(st.integers(1, 10), SCALARS), "address": ADDRESS_VALUES, "port": PORT_VALUES},
        optional={"num_workers": SCALARS, "ipv4": SCALARS, "ipv6": SCALARS, "connect_timeout": SCALARS,
                  "idle_timeout": SCALARS, "bogus": SCALARS}),
    ANY_VALUE,
)
DOCUMENTS = st.one_of(
    st.fixed_dictionaries({"allowlist": st.lists(ENTRY, max_size=5)},
                          optional={"services": st.one_of(st.lists(SERVICE, max_size=3), ANY_VALUE)}),
    st.fixed_dictionaries({}, optional={"allowlist": st.one_of(st.lists(ENTRY, max_size=3), ANY_VALUE),
                                        "services": ANY_VALUE, "other": ANY_VALUE}),
    ANY_VALUE,
)


# --------------------------------------------------------------------------- fuzz: YAML loader

def test_fuzz_yaml_random_bytes():
    @fuzz_settings(FUZZ_CASES["yaml_random_bytes"])
    @given(st.binary(max_size=2000))
    @example(b"\xff\xfe\x00\x00")
    @example(b"allowlist: [\x80\x81]")
    @example(b"\xef\xbb\xbfallowlist: []")
    @example(b"")
    def inner(data):
        check_document_outcome(lambda: load_bytes_or_text(data), SOURCE)
        CASES_RUN["yaml_random_bytes"] += 1

    run_counted("yaml_random_bytes", inner)


def test_fuzz_yaml_random_text():
    @fuzz_settings(FUZZ_CASES["yaml_random_text"])
    @given(st.text(max_size=500))
    @example("\t")
    @example("\ud800")
    def inner(text):
        check_document_outcome(lambda: load_bytes_or_text(text), SOURCE)
        CASES_RUN["yaml_random_text"] += 1

    run_counted("yaml_random_text", inner)


def test_fuzz_yaml_token_soup():
    @fuzz_settings(FUZZ_CASES["yaml_token_soup"])
    @given(st.lists(st.one_of(st.sampled_from(YAML_TOKENS), st.text(max_size=5)), max_size=60), st.booleans())
    @example(["allowlist:", "\n", "- ", TAG_PAYLOADS[0]], False)
    @example(["allowlist:", " ", "&a ", "[", "*a", "]"], True)
    def inner(tokens, as_bytes):
        text = "".join(tokens)
        data = text.encode("utf-8", "surrogatepass") if as_bytes else text
        check_document_outcome(lambda: load_bytes_or_text(data), SOURCE)
        assert not MARKER.exists(), f"a YAML tag executed code: {text!r}"
        CASES_RUN["yaml_token_soup"] += 1

    run_counted("yaml_token_soup", inner)


def test_fuzz_yaml_documents():
    """Random documents, checked as loaded objects and after a safe_dump/safe_load round trip."""
    @fuzz_settings(FUZZ_CASES["yaml_documents"])
    @given(DOCUMENTS)
    @example({"allowlist": [{"address": "kms.example", "port": True}]})
    @example({"allowlist": [{"address": "kms.example", "port": [443, 443.0]}]})
    @example({"allowlist": [{"address": "kms.example"}], "services": [{"listen_port": 1}]})
    def inner(document):
        check_document_outcome(lambda: (document, parse_document(document, SOURCE)), SOURCE)
        try:
            text = yaml.safe_dump(document, allow_unicode=bool(len(str(document)) % 2))
        except yaml.YAMLError:
            text = None
        if text is not None:
            check_document_outcome(lambda: load_bytes_or_text(text), SOURCE)
        CASES_RUN["yaml_documents"] += 1

    run_counted("yaml_documents", inner)


def test_fuzz_yaml_files():
    """load_file(path): the message starts with the path; some files are empty, some random, some valid."""
    with tempfile.TemporaryDirectory(prefix="vsp-fuzz-") as directory:
        counter = iter(range(10 ** 9))

        @fuzz_settings(FUZZ_CASES["yaml_files"])
        @given(st.one_of(st.binary(max_size=400),
                         st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map(lambda t: "".join(t).encode()),
                         DOCUMENTS.map(lambda d: yaml.safe_dump(d).encode())))
        def inner(data):
            path = os.path.join(directory, f"allowlist-{next(counter)}.yaml")
            with open(path, "wb") as stream:
                stream.write(data)
            check_document_outcome(lambda: (parse_yaml(data, path), load_file(path)), path)
            assert not MARKER.exists()
            CASES_RUN["yaml_files"] += 1

        run_counted("yaml_files", inner)


# --------------------------------------------------------------------------- fuzz: valid files vs authorize()

NAME_LABELS = ["kms", "api", "a", "b", "x-y", "_svc", "xn--bcher-kva", "127", "0x1", "us-east-1", "amazonaws",
               "example", "internal", "evil", "co", "0"]
TOP_LABELS = ["com", "net", "example", "internal", "local", "io"]
IPV4_POOL = ["127.0.0.1", "10.0.0.1", "10.1.2.3", "192.0.2.1", "203.0.113.66", "0.0.0.0"]
IPV6_POOL = ["::1", "fd12::1", "2001:db8::1", "::ffff:127.0.0.1", "fe80::1", "::"]
CIDR_POOL = ["10.0.0.0/8", "10.1.2.0/24", "127.0.0.0/8", "192.0.2.0/31", "fd00::/8", "2001:db8::/32",
             "::ffff:0:0/96"]
PORT_POOL = [22, 80, 443, 8443, 1, 65535]

NAMES = st.builds(lambda labels, top: ".".join(labels + [top]),
                  st.lists(st.sampled_from(NAME_LABELS), max_size=3), st.sampled_from(TOP_LABELS))


def non_canonical_ipv4(address: str) -> list[str]:
    a, b, c, d = (int(x) for x in address.split("."))
    number = (a << 24) | (b << 16) | (c << 8) | d
    return [str(number), f"0x{number:x}", f"0{number:o}", f"{a}.{(b << 16) | (c << 8) | d}",
            f"{a}.{b}.{(c << 8) | d}", f"0{a:o}.{b}.{c}.{d}", f"0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}",
            f"{a}.{b}.{c}.0x{d:x}", f"{a}.{b}.{c}.0{d}"]


def spell_case(rng: random.Random, text: str) -> str:
    mode = rng.choice(["as-is", "upper", "mixed"])
    if mode == "upper":
        return text.upper()
    if mode == "mixed":
        return "".join(ch.upper() if rng.random() < 0.5 else ch for ch in text)
    return text


@st.composite
def allowlist_entries(draw, rng: random.Random):
    kind = draw(st.sampled_from(["name", "name", "wildcard", "ipv4", "ipv6", "cidr"]))
    if kind in ("name", "wildcard"):
        address = spell_case(rng, draw(NAMES)) + rng.choice(["", "", "."])
        if kind == "wildcard":
            address = "*." + address
    elif kind == "ipv4":
        address = draw(st.sampled_from(IPV4_POOL))
    elif kind == "ipv6":
        address = draw(st.sampled_from(IPV6_POOL))
        address = rng.choice([address, ipaddress.ip_address(address).exploded, address.upper()])
    else:
        address = draw(st.sampled_from(CIDR_POOL))
    port_choice = st.one_of(st.sampled_from(PORT_POOL), st.integers(1, 65535))
    ports = draw(st.one_of(port_choice, st.lists(port_choice, min_size=1, max_size=3)))
    return address, ports


def render_port(rng: random.Random, port: int) -> str:
    return rng.choice([str(port), f"0x{port:x}", f"+{port}"])


def yaml_quote(rng: random.Random, address: str) -> str:
    style = rng.choice(["single", "double", "plain"])
    if style == "plain" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", address):
        return address
    if style == "double":
        return '"' + address.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "'" + address.replace("'", "''") + "'"


def render_allowlist(rng: random.Random, entries, services) -> str:
    style = rng.choice(["flow", "block", "safe_dump"])
    if style == "safe_dump":
        document = {"allowlist": [{"address": a, "port": p} for a, p in entries]}
        if services:
            document["services"] = services
        return yaml.safe_dump(document, default_flow_style=rng.choice([None, True, False]))
    lines = ["allowlist:"]
    for address, ports in entries:
        if isinstance(ports, list):
            rendered = "[" + ", ".join(render_port(rng, p) for p in ports) + "]"
        else:
            rendered = render_port(rng, ports)
        if style == "flow":
            lines.append(f"- {{address: {yaml_quote(rng, address)}, port: {rendered}}}")
        else:
            lines.append(f"- address: {yaml_quote(rng, address)}")
            lines.append(f"  port: {rendered}")
    if services:
        lines.append("services:")
        for service in services:
            lines.append("- " + ", ".join(f"{k}: {yaml_quote(rng, v) if isinstance(v, str) else v}"
                                          for k, v in service.items()).join("{}"))
    return "\n".join(lines) + "\n"


def perturb(draw, host: str) -> str:
    return draw(st.sampled_from([
        host, host.upper(), host + ".", host + "..", "." + host, host.replace("o", "\u03bf"),
        host.replace(".", "\uff0e"), host + "\x00", "evil" + host, host + ".evil.com", "a." + host, host[1:],
        host.replace(".", "%2e", 1), host + " ", "xn--" + host, host.replace("-", "_"), host.upper() + ".",
        host.lstrip("*."), "x." + host.lstrip("*."), "bad" + host.lstrip("*."), host.replace("*", "a"),
    ]))


@st.composite
def probe_hosts(draw, entries):
    spellings = [address for address, _ in entries]
    choice = draw(st.sampled_from(["entry", "entry", "perturbed", "name", "ip", "non-canonical", "scoped",
                                   "text"]))
    if choice == "entry":
        return draw(st.sampled_from(spellings))
    if choice == "perturbed":
        return perturb(draw, draw(st.sampled_from(spellings)))
    if choice == "name":
        return draw(NAMES)
    if choice == "ip":
        return draw(st.sampled_from(IPV4_POOL + IPV6_POOL + ["10.0.0.7", "10.1.2.200", "11.0.0.1", "fd12::99"]))
    if choice == "non-canonical":
        return draw(st.sampled_from(non_canonical_ipv4(draw(st.sampled_from(IPV4_POOL)))))
    if choice == "scoped":
        return draw(st.sampled_from(["::1%lo", "fe80::1%lo", "fe80::1%bogus0", "fe80::1%1", "fd12::1%x"]))
    return draw(st.text(max_size=20))


def check_authorize(allowlist, entries, dns: GlibcLikeDNS, host: str, port: int, family: int, ttl: float) -> None:
    """authorize(host, port) succeeds only when a written entry names it or shares a resolved address."""
    resolver = Resolver(family, ttl, getaddrinfo=dns)
    dns.asked.clear()
    entry_names_set = {entry_canonical_name(a) for a, _ in entries} - {None}
    canonical = expected_canonical(host)
    try:
        target = allowlist.authorize(host, port, resolver)
    except NotAllowed as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, f"multi-line NotAllowed: {message!r}"
        target = None
    for asked in dns.asked:
        assert asked == canonical or asked in entry_names_set, f"asked DNS about {asked!r} for {host!r}"
        assert is_unambiguous_name(asked), f"an ambiguous spelling reached getaddrinfo: {asked!r} (from {host!r})"
    if target is None:
        return
    assert target.port == port and port in target.allowed_by.ports
    assert canonical is not None and target.host == canonical, (host, target.host)
    assert try_ip(target.host) is not None or is_unambiguous_name(target.host), \
        f"ambiguous REMOTE_ADDR accepted: {host!r} as {target.host!r}"
    with_port = [(a, p) for a, p in entries if port in written_ports(p)]
    if target.pinned_to is None:
        assert any(entry_names(a, target.host) for a, _ in with_port), \
            f"{host!r}:{port} allowed by name, but no entry with that port names it: {entries}"
        return

    def admitted(ip) -> bool:
        for address, _ in with_port:
            if "/" in address or try_ip(address) is not None:
                network = ipaddress.ip_network(address) if "/" in address \
                    else ipaddress.ip_network(ipaddress.ip_address(address))
                if ip.version == network.version and ip in network:
                    return True
            elif not address.startswith("*."):
                if str(ip) in {str(ipaddress.ip_address(a))
                               for a in dns.addresses(entry_canonical_name(address), family)}:
                    return True
        return False

    literal = try_ip(target.host)
    resolved = [literal] if literal is not None \
        else [ipaddress.ip_address(a) for a in dns.addresses(target.host, family)]
    assert any(admitted(ip) for ip in resolved), \
        f"{host!r}:{port} allowed through addresses {resolved}, none admitted by {entries}"
    try:
        endpoints = target.endpoints(resolver)
    except ResolveError:
        return
    assert endpoints and all(admitted(e.ip) for e in endpoints), (host, endpoints, entries)


def test_fuzz_valid_allowlists_never_allow_more_than_written():
    @fuzz_settings(FUZZ_CASES["yaml_valid_allowlists"])
    @given(st.data())
    def inner(data):
        draw = data.draw
        rng = random.Random(draw(st.integers(0, 2 ** 32), label="cosmetic seed"))
        entries = draw(st.lists(allowlist_entries(rng), min_size=1, max_size=6))
        services = draw(st.lists(st.fixed_dictionaries({
            "address": st.sampled_from([a for a, _ in entries]), "port": st.integers(1, 65535)},
            optional={"num_workers": st.integers(1, 1000), "connect_timeout": st.sampled_from([0.5, 3, 10.0]),
                      "idle_timeout": st.sampled_from([0, 0.0, 60])}), max_size=3))
        for index, service in enumerate(services, 1):
            service["listen_port"] = 5000 + index
        text = render_allowlist(rng, entries, services)
        try:
            document = parse_yaml(text, SOURCE)
            config = parse_document(document, SOURCE)
        except ConfigError as exc:
            raise AssertionError(f"valid file refused: {exc}\n{text}") from None
        check_config_matches_document(config, document)
        names = sorted({entry_canonical_name(a) for a, _ in entries} - {None} | set(draw(st.lists(NAMES, max_size=4))))
        pool = IPV4_POOL + IPV6_POOL + ["10.0.0.7", "11.0.0.1"]
        records = {name: rng.sample(pool, rng.randint(1, 3)) for name in names if rng.random() < 0.6}
        dns = GlibcLikeDNS(records)
        family = draw(st.sampled_from([socket.AF_UNSPEC, socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6]))
        ttl = draw(st.sampled_from([0.0, 30.0]))
        all_ports = sorted({p for _, ps in entries for p in written_ports(ps)})
        for _ in range(draw(st.integers(1, 6))):
            host = draw(probe_hosts(entries))
            port = draw(st.one_of(st.sampled_from(all_ports), st.sampled_from(PORT_POOL)))
            with time_limit(CASE_TIME_LIMIT, "authorize"):
                check_authorize(config.allowlist, entries, dns, host, port, family, ttl)
        for address, ports in entries:  # completeness: an exact spelling of an entry is always allowed
            literal = try_ip(address)
            wanted = {socket.AF_UNSPEC: (4, 6), socket.AF_INET: (4,), socket.AF_INET6: (6,)}[family]
            if not address.startswith("*.") and "/" not in address and (literal is None or literal.version in wanted):
                port = written_ports(ports)[0]
                target = config.allowlist.authorize(address, port, Resolver(family, ttl, getaddrinfo=dns))
                assert target.pinned_to is None
        CASES_RUN["yaml_valid_allowlists"] += 1

    run_counted("yaml_valid_allowlists", inner)


# --------------------------------------------------------------------------- fixed adversarial inputs

DANGEROUS_DOCUMENTS = {
    "object-apply-os-system": f"!!python/object/apply:os.system ['touch {MARKER}']\n",
    "entry-object-apply": f"allowlist:\n- !!python/object/apply:os.system ['touch {MARKER}']\n",
    "address-object-apply": f"allowlist:\n- {{address: !!python/object/apply:os.system ['touch {MARKER}'], "
                            f"port: 443}}\n",
    "object-new": f"allowlist: !!python/object/new:os.system ['touch {MARKER}']\n",
    "subprocess": f"allowlist: !!python/object/apply:subprocess.check_call [[touch, {MARKER}]]\n",
    "exec": f"allowlist: !!python/object/apply:builtins.exec [\"open('{MARKER}', 'w')\"]\n",
    "name": "allowlist: !!python/name:os.system\n",
    "module": "allowlist: !!python/module:os\n",
    "object": "allowlist: !!python/object:argparse.Namespace {a: 1}\n",
    "tuple": "allowlist: !!python/tuple [1, 2]\n",
    "verbatim-tag": f"allowlist: !<tag:yaml.org,2002:python/object/apply:os.system> ['touch {MARKER}']\n",
    "tag-directive": f"%TAG !p! tag:yaml.org,2002:python/object/apply:\n---\nallowlist: !p!os.system "
                     f"['touch {MARKER}']\n",
    "merge-of-apply": f"base: &b !!python/object/apply:os.system ['touch {MARKER}']\nallowlist:\n- <<: *b\n",
    "escaped-newline-tag": "allowlist: !foo%0Abar x\n",
}


@pytest.mark.parametrize("text", DANGEROUS_DOCUMENTS.values(), ids=DANGEROUS_DOCUMENTS.keys())
def test_python_tags_are_refused_and_never_execute(text, tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "allowlist.yaml"
    path.write_text(text)
    for load, source in ((lambda: load_bytes_or_text(text.encode()), SOURCE),
                         (lambda: (parse_yaml(text, str(path)), load_file(str(path))), str(path))):
        assert check_document_outcome(load, source) is None, "a document with a python tag was accepted"
        assert not MARKER.exists(), "a YAML tag executed code"


NESTING = {
    "flow-sequences-10000": "[" * 10_000,
    "flow-mappings-10000": "{a: " * 10_000,
    "block-sequences-10000": "- " * 10_000,
    "block-mappings-2000": "".join(f"{' ' * i}a:\n" for i in range(2000)),
    "allowlist-nested-5000": "allowlist: " + "[" * 5_000 + "]" * 5_000,
    "port-nested-5000": "allowlist:\n- {address: kms.example, port: " + "[" * 5_000 + "443" + "]" * 5_000 + "}",
    "flow-sequences-100000": "[" * 100_000,
    "anchored-nesting-3000": "".join(f"&a{i} [" for i in range(3000)),
}


@pytest.mark.parametrize("text", NESTING.values(), ids=NESTING.keys())
def test_deeply_nested_documents_end_in_one_error_line(text):
    started = time.monotonic()
    assert check_document_outcome(lambda: load_bytes_or_text(text.encode()), SOURCE) is None
    assert time.monotonic() - started < 5.0


def alias_bomb(levels: int, template: str) -> str:
    """A billion-laughs document: each level is a list of nine aliases of the level below it."""
    parts = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return template.format(defs="[" + ", ".join(parts) + "]", top=f"*l{levels - 1}")


BOMB_TEMPLATES = {
    "entry": "allowlist: [{defs}]\n",
    "allowlist-mapping": "allowlist: {{k: {defs}}}\n",
    "address": "allowlist: [{{address: {defs}, port: 443}}]\n",
    "port": "allowlist: [{{address: kms.example, port: {defs}}}]\n",
    "port-list": "allowlist: [{{address: kms.example, port: [{defs}]}}]\n",
    "top-level": "{defs}\n",
    "services": "allowlist: []\nservices: [{defs}]\n",
    "service-field": "allowlist: []\nservices: [{{listen_port: {defs}, address: a.example, port: 1}}]\n",
    "unknown-key-value": "allowlist: []\nother: {defs}\n",
}


@pytest.mark.parametrize("template", BOMB_TEMPLATES.values(), ids=BOMB_TEMPLATES.keys())
def test_billion_laughs_finishes_fast(template):
    """7 levels of 9 aliases: ~300 bytes that stand for 4.8 million strings if anything walks the tree.

    Loading shares the aliased lists (milliseconds); the check must not expand them either (e.g. by
    repr() of a whole value in an error message).  Each further level costs 9 times more, so a walk that
    takes 0.3 s here takes minutes and gigabytes at 9-10 levels, in a file of 400 bytes.
    """
    text = alias_bomb(7, template)
    assert len(text) < 1000
    started = time.monotonic()
    check_document_outcome(lambda: load_bytes_or_text(text), SOURCE, limit=5.0)
    elapsed = time.monotonic() - started
    assert elapsed < 0.3, f"{elapsed:.2f}s for a 7-level alias bomb: the tree is being expanded"


@pytest.mark.parametrize("text", ["", " ", "\n\n", "# only a comment\n", "---\n", "...\n", "--- ~\n", "null\n",
                                  "%YAML 1.1\n---\n", "\ufeff", "\t\n"],
                         ids=["empty", "space", "newlines", "comment", "doc-start", "doc-end", "tilde", "null",
                              "directive-only", "bom-only", "tab"])
def test_empty_files_are_one_clear_error(text, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert_one_line_error(str(info.value), str(path))


def test_huge_string_address_is_refused_quickly(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("allowlist:\n- {address: " + "a" * (MAX_FILE_BYTES - 100) + ", port: 443}\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert_one_line_error(str(info.value), str(path))
    assert len(str(info.value)) < 1000, \
        f"the error line is {len(str(info.value))} characters: it should not echo a megabyte of input"
    assert time.monotonic() - started < 5.0


def test_file_over_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"allowlist: []\n" + b"#" * MAX_FILE_BYTES)
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert_one_line_error(str(info.value), str(path))


def test_large_valid_file_loads_and_matches(tmp_path):
    """~100 KB, 2,400 entries (pure-Python safe_load costs ~0.3 ms per entry: a 1 MB file takes ~10 s)."""
    lines = ["allowlist:"]
    index = 0
    while sum(len(line) + 1 for line in lines) < 100_000:
        lines.append(f"- {{address: host{index}.example, port: {1 + index % 65535}}}")
        index += 1
    path = tmp_path / "large.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    config = load_file(str(path))
    assert len(config.allowlist.rules) == index
    assert [sorted(rule.ports)[0] for rule in config.allowlist.rules] == [1 + i % 65535 for i in range(index)]
    assert time.monotonic() - started < 30.0


@pytest.mark.parametrize("data", [b"\xff", b"allowlist: caf\xe9\n", b"\xfe\xff\x00a", b"allowlist: [\xed\xa0\x80]",
                                  "allowlist: []".encode("utf-16")[:-1], b"\x00\x00\x00"],
                         ids=["ff", "latin1", "utf16-odd", "utf8-surrogate", "utf16-truncated", "nuls"])
def test_non_utf8_bytes_are_one_clear_error(data):
    assert check_document_outcome(lambda: load_bytes_or_text(data), SOURCE) is None


BAD_SCALARS = {
    "int-tag-word": "allowlist:\n- {address: kms.example, port: !!int abc}\n",
    "int-tag-empty": "allowlist:\n- {address: kms.example, port: !!int ''}\n",
    "int-tag-bad-hex": "allowlist:\n- {address: kms.example, port: !!int 0x}\n",
    "float-tag-word": "allowlist:\n- {address: kms.example, port: !!float abc}\n",
    "bool-tag-word": "allowlist:\n- {address: kms.example, port: !!bool maybe}\n",
    "timestamp-tag-word": "allowlist: !!timestamp nope\n",
    "timestamp-bad-month": "allowlist: !!timestamp 2001-13-45\n",
    "5000-digit-port": "allowlist:\n- {address: kms.example, port: " + "1" * 5000 + "}\n",
    "5000-digit-key": "allowlist: []\n" + "9" * 5000 + ": x\n",
}


@pytest.mark.parametrize("text", BAD_SCALARS.values(), ids=BAD_SCALARS.keys())
def test_unreadable_scalars_are_one_clear_error(text):
    """Tagged scalars that safe_load cannot construct (``!!int abc``) and integers past Python's 4,300-digit
    conversion limit raise ValueError/KeyError/AttributeError/IndexError inside PyYAML: still one error line."""
    assert check_document_outcome(lambda: load_bytes_or_text(text), SOURCE) is None


def test_unreadable_paths_are_one_clear_error(tmp_path):
    for path in (str(tmp_path / "missing.yaml"), str(tmp_path), str(tmp_path / "missing" / "x.yaml")):
        with pytest.raises(ConfigError) as info:
            load_file(path)
        assert_one_line_error(str(info.value), path)


# --------------------------------------------------------------------------- fuzz: CLI

PARSER = cli.build_parser()
OPTIONS = sorted({option for action in PARSER._actions for option in action.option_strings})
SETTINGS_FLAGS = sorted(option for action in PARSER._actions if action.dest == "settings"
                        for option in action.option_strings) or ["--settings"]
ENV_VARS = sorted({action.env_var for action in PARSER._actions if getattr(action, "env_var", None)})
BOGUS_ENV_VARS = ["VSOCK_PROXY_LOCAL_PORT", "VSOCK_PROXY_FOO", "VSOCK_PROXY_", "VSOCK_PROXY_HELP"]
SETTINGS_KEYS = sorted({option.lstrip("-") for option in OPTIONS if option.startswith("--")} | {"unknown", "help"})

PLACEHOLDERS = ["@SETTINGS_FILE@", "@MISSING@", "@DIRECTORY@", ""]
ENV_SAFE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
VALUE_WORDS = [
    "0", "1", "-1", "65535", "65536", "4294967294", "4294967295", "4294967296", "1000000", "1000001", "1048576",
    "1048577", "any", "ANY", "Any", "nan", "NaN", "inf", "-inf", "1e309", "1e-400", "-0", "0.0", "0x10", "010",
    "1_0", " 5 ", "\u0663", "\uff15", "\u00b2", "", " ", "true", "false", "yes", "no", "on", "off", "debug", "INFO",
    "Warning", "error", "critical", "\u0130NFO", "127.0.0.1:9100", "[::1]:9100", "[]:9100", "[:9100", ":9100",
    "localhost:0", "host:65536", "a:b", "[::1]", "--", "-", "-4", "-6", "-h", "--help", "-V", "--version",
    "kms.example", "x\ny", "a\rb",
] + PLACEHOLDERS
VALUES = st.one_of(st.sampled_from(VALUE_WORDS), st.integers(-(2 ** 40), 2 ** 40).map(str),
                   st.floats().map(repr), st.text(ENV_SAFE, max_size=16))


@st.composite
def argv_lists(draw):
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["option-value", "option=value", "flag", "positional", "positional", "token",
                                     "settings-file"]))
        if kind == "settings-file":
            argv += [draw(st.sampled_from(SETTINGS_FLAGS)), "@SETTINGS_FILE@"]
            continue
        option = draw(st.sampled_from(OPTIONS))
        value = draw(VALUES)
        if kind == "option-value":
            argv += [option, value]
        elif kind == "option=value" and option.startswith("--"):
            argv.append(f"{option}={value}")
        elif kind == "flag":
            argv.append(option)
        elif kind == "positional":
            argv.append(draw(VALUES))
        else:
            argv.append(draw(st.text(ENV_SAFE, max_size=12)))
    return argv


ENVIRONMENTS = st.dictionaries(st.sampled_from(ENV_VARS + BOGUS_ENV_VARS),
                               st.one_of(VALUES, st.sampled_from(PLACEHOLDERS)), max_size=4)
SETTINGS_FILES = st.lists(st.one_of(
    st.builds(lambda k, v, sep: f"{k}{sep}{v}", st.sampled_from(SETTINGS_KEYS), VALUES.filter(lambda v: "\n" not in v),
              st.sampled_from([" = ", "=", ": ", " "])),
    st.sampled_from(["[section]", "# comment", "; comment", "", "=", "ipv4", "ipv4 = true", "ipv6 = true",
                     "num_workers = [1, 2]", "log-level = debug", "config = /nonexistent.yaml"]),
    st.text(ENV_SAFE, max_size=20),
), max_size=4).map("\n".join)


@contextlib.contextmanager
def patched_environ(env: dict[str, str]):
    """Replace every VSOCK_PROXY_* variable with ``env`` for the duration; restore exactly afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("VSOCK_PROXY_") or k in env}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def check_settings(ns: argparse.Namespace) -> None:
    """Every value of a parsed Namespace is within its documented range."""
    assert ns.local_port is None or (type(ns.local_port) is int and 1 <= ns.local_port <= MAX_VSOCK_PORT)
    assert ns.remote_port is None or (type(ns.remote_port) is int and 1 <= ns.remote_port <= 65535)
    assert ns.remote_addr is None or isinstance(ns.remote_addr, str)
    if ns.local_port is not None:
        assert ns.remote_addr is not None and ns.remote_port is not None, ns
    else:
        assert ns.remote_addr is None and ns.remote_port is None, ns
    assert isinstance(ns.ipv4, bool) and isinstance(ns.ipv6, bool) and not (ns.ipv4 and ns.ipv6)
    # None: not given, so each service's mode decides (config.DEFAULT_NUM_WORKERS)
    assert ns.num_workers is None or (type(ns.num_workers) is int and 1 <= ns.num_workers <= 1_000_000)
    assert type(ns.cid) is int and 0 <= ns.cid <= VMADDR_CID_ANY
    assert type(ns.backlog) is int and 1 <= ns.backlog <= 1 << 20
    assert isinstance(ns.connect_timeout, float) and math.isfinite(ns.connect_timeout) and ns.connect_timeout > 0
    for name in ("dns_ttl", "shutdown_grace", "idle_timeout"):
        value = getattr(ns, name)
        assert isinstance(value, float) and math.isfinite(value) and value >= 0, (name, value)
    assert ns.log_level in cli.LOG_LEVELS
    assert isinstance(ns.config, str)
    if ns.metrics_address is not None:
        host, port = parse_bind_address(ns.metrics_address)
        assert host and 1 <= port <= 65535, f"--metrics-address {ns.metrics_address!r} binds to host {host!r}"


def run_cli(argv: list[str], env: dict[str, str]):
    """parse_arguments(argv) under ``env``: ('ok', Namespace) or ('exit', code); with stdout and stderr text."""
    out, err = io.StringIO(), io.StringIO()
    with patched_environ(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = ("ok", cli.parse_arguments(argv))
        except SystemExit as exc:
            result = ("exit", exc.code)
    return result, out.getvalue(), err.getvalue()


def check_cli_outcome(argv, env) -> None:
    with time_limit(CASE_TIME_LIMIT, "parse_arguments"):
        (kind, value), stdout, stderr = run_cli(argv, env)
    if kind == "ok":
        assert stderr == "" and stdout == "", (stdout, stderr)
        check_settings(value)
    elif value == 0:
        assert stdout.strip() and stderr == "", (argv, stdout, stderr)
    else:
        assert value == 2, f"exit status {value!r} for {argv!r} {env!r}"
        assert stdout == "", stdout
        lines = stderr.split("\n")
        assert len(lines) == 2 and lines[1] == "" and lines[0].startswith("vsock-proxy: error: "), \
            f"not exactly one error line for argv={argv!r} env={env!r}: {stderr!r}"
        assert "Traceback" not in stderr


@pytest.mark.parametrize("argv", [["1", "a.example", "443", "x\ny"], ["--settings", "/nonexistent\nfile"],
                                  ["1", "a.example", "443", "\r"]], ids=["newline-arg", "newline-path", "cr-arg"])
def test_cli_error_about_a_multi_line_argument_is_one_line(argv):
    (kind, value), stdout, stderr = run_cli(argv, {})
    assert (kind, value) == ("exit", 2)
    assert stderr.count("\n") == 1 and "\r" not in stderr and stderr.startswith("vsock-proxy: error: "), repr(stderr)


@pytest.mark.parametrize("address", ["[]:9100", "[:9100", "]:9100", "[]]:9100"])
def test_cli_metrics_address_without_a_host_is_refused(address):
    """``[]:9100`` passes the non-empty check before the brackets are stripped: it would bind every interface."""
    (kind, value), stdout, stderr = run_cli(["--metrics-address", address], {})
    assert (kind, value) == ("exit", 2), f"--metrics-address {address!r} accepted"
    assert stderr.startswith("vsock-proxy: error: ") and stderr.count("\n") == 1


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--version"], ["-V"], ["-4h"]])
def test_cli_help_and_version_exit_0_on_stdout(argv):
    (kind, value), stdout, stderr = run_cli(argv, {})
    assert (kind, value) == ("exit", 0) and stdout.strip() and stderr == ""


def test_fuzz_cli_argv_and_env():
    with tempfile.TemporaryDirectory(prefix="vsp-cli-") as directory:
        old_cwd = os.getcwd()
        os.chdir(directory)  # relative paths in random argv never reach the repository's files
        try:
            paths = {"@SETTINGS_FILE@": os.path.join(directory, "settings.conf"),
                     "@MISSING@": os.path.join(directory, "missing.conf"), "@DIRECTORY@": directory}

            def fill(text: str) -> str:
                for placeholder, path in paths.items():
                    text = text.replace(placeholder, path)
                return text

            @fuzz_settings(FUZZ_CASES["cli_argv_env"])
            @given(argv_lists(), ENVIRONMENTS, SETTINGS_FILES)
            @example(["1", "a.example", "443", "x\ny"], {}, "")
            @example(["--settings", "@SETTINGS_FILE@"], {}, "num_workers = 0")
            @example([], {"VSOCK_PROXY_IPV4": "true", "VSOCK_PROXY_IPV6": "1"}, "")
            @example(["--metrics-address", "[]:9100"], {}, "")
            @example(["-4h"], {}, "")
            def inner(argv, env, settings_text):
                if any("@SETTINGS_FILE@" in text for text in [*argv, *env.values()]):
                    with open(paths["@SETTINGS_FILE@"], "w", encoding="utf-8") as stream:
                        stream.write(settings_text)
                check_cli_outcome([fill(arg) for arg in argv], {k: fill(v) for k, v in env.items()})
                CASES_RUN["cli_argv_env"] += 1

            run_counted("cli_argv_env", inner)
        finally:
            os.chdir(old_cwd)
