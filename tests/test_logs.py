"""Log lines cannot be forged: every record, and every one-line error, is one line whatever it quotes.

Strings from outside (REMOTE_ADDR, a service address from the YAML file, the --config path,
VSOCK_PROXY_METRICS_ADDRESS) reach log messages and error lines.  Here each carries newlines
and carriage returns, and every stderr line must still be a log line or the one error line.

SAFETY: the running-proxy test listens on AF_VSOCK (bind and listen only, never a connect).
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.helpers import assert_one_line_error, cli_env
from vsockproxy.logs import one_line

pytestmark = pytest.mark.timeout(60)

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")
ERROR_LINE = re.compile(r"vsock-proxy: error: \S")
#: A newline, a carriage return, and a line that would pass for the proxy's own if they went through raw.
FORGERY = "\r\n2030-01-01 00:00:00,000 INFO FORGED\nFORGED\r"
ESCAPED_FORGERY = r"\r\n2030-01-01 00:00:00,000 INFO FORGED\nFORGED\r"
#: A high vsock port, for the tests that stop before listening (should one listen, it takes no well-known port).
LOCAL_PORT = "47914"


def assert_every_line_is_ours(stderr: str) -> list[str]:
    """Each line is a log line or a one-line error, and none is the forged one; returns the lines."""
    lines = stderr.splitlines()  # splits on \r, \x0b, \x1c, \x85, \u2028 ... as well as \n
    for line in lines:
        assert LOG_LINE.match(line) or ERROR_LINE.match(line), f"forged or broken line {line!r} in {stderr!r}"
        assert not line.startswith("2030-"), f"forged line {line!r}"
    return lines


# --------------------------------------------------------------------------- the escaping function

LINE_BREAKING = [chr(code) for code in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]]


@pytest.mark.parametrize("char", LINE_BREAKING, ids=[f"U+{ord(c):04X}" for c in LINE_BREAKING])
def test_one_line_escapes_every_control_character(char):
    escaped = one_line(f"a{char}b")
    assert len(escaped.splitlines()) == 1
    assert not any(c in escaped for c in LINE_BREAKING), escaped
    assert escaped.startswith("a\\") and escaped.endswith("b"), escaped


def test_one_line_spells_escapes_like_python():
    assert one_line("\n\r\t\x00\x1b\x7f\x85\u2028\u2029") == r"\n\r\t\x00\x1b\x7f\x85\u2028\u2029"


def test_one_line_leaves_printable_text_alone():
    text = "kms.us-east-1.amazonaws.com:443 'quoted' \"double\" back\\slash café → 例え 🙂 [fd00::1]:443"
    assert one_line(text) == text


# --------------------------------------------------------------------------- the log formatter

LOG_RECORDS = """
import logging, sys
from vsockproxy import cli
cli.configure_logging("info")
log = logging.getLogger("vsockproxy")
log.info("plain")
log.warning("address %s rejected", sys.argv[1])
log.error("line\\u2028separator\\u2029paragraph\\x1b[31m red \\x85 next")
try:
    raise ValueError("multi\\nline")
except ValueError:
    log.exception("with a traceback %r", "x")
"""


@pytest.mark.parametrize("journal", [False, True], ids=["timestamped", "journal"])
def test_each_log_record_is_exactly_one_line(tmp_path, journal):
    """Arguments, message and traceback alike: one record, one line, for a terminal and for journald.

    Fails on the original code: the newlines in the argument and the traceback start new lines.
    """
    stderr_path = tmp_path / "stderr"
    stderr_path.touch()
    env = cli_env()
    if journal:
        info = stderr_path.stat()
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    with open(stderr_path, "wb") as stderr:
        done = subprocess.run([sys.executable, "-c", LOG_RECORDS, f"10.0.0.1{FORGERY}"], stderr=stderr,
                              stdin=subprocess.DEVNULL, timeout=20, env=env)
    assert done.returncode == 0
    text = stderr_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) == 4, text
    if journal:
        assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<3>"], text
        assert lines[1] == f"<4>address 10.0.0.1{ESCAPED_FORGERY} rejected"
    else:
        assert_every_line_is_ours(text)
        assert lines[1].endswith(f" WARNING address 10.0.0.1{ESCAPED_FORGERY} rejected")
    assert r"line\u2028separator\u2029paragraph\x1b[31m red \x85 next" in lines[2]
    assert "with a traceback 'x'\\nTraceback (most recent call last):\\n" in lines[3]
    assert lines[3].endswith("ValueError: multi\\nline")


# --------------------------------------------------------------------------- strings from outside, end to end

def test_config_path_with_newlines_gives_one_error_line(run_cli, tmp_path):
    missing = tmp_path / f"allow{FORGERY}list.yaml"
    result = run_cli(LOCAL_PORT, "127.0.0.1", "443", "--config", str(missing))
    line = assert_one_line_error(result, 1, "no such file")
    assert ESCAPED_FORGERY in line


def test_remote_addr_with_newlines_gives_one_error_line(run_cli, tmp_path):
    config = tmp_path / "allowlist.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 443}\n")
    result = run_cli(LOCAL_PORT, f"127.0.0.1{FORGERY}", "443", "--config", str(config))
    assert_one_line_error(result, 1, f"vsock port {LOCAL_PORT}")


def test_service_address_with_newlines_gives_one_error_line(run_cli, tmp_path):
    config = tmp_path / "allowlist.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 443}\nservices:\n"
                      f"- {{listen_port: {LOCAL_PORT}, address: {yaml_string('127.0.0.1' + FORGERY)}, port: 443}}\n")
    result = run_cli("--config", str(config))
    line = assert_one_line_error(result, 1, f"vsock port {LOCAL_PORT}")
    assert ESCAPED_FORGERY in line


def test_metrics_address_with_newlines_gives_one_error_line(run_cli, tmp_path):
    config = tmp_path / "allowlist.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 443}\n")
    env = cli_env(VSOCK_PROXY_METRICS_ADDRESS=f"127.0.0.1{FORGERY}:9100")
    result = run_cli("--config", str(config), str(free_vsock_port()), "127.0.0.1", "443", env=env)
    line = assert_one_line_error(result, 1, "cannot serve metrics on")
    assert ESCAPED_FORGERY in line


def yaml_string(text: str) -> str:
    """``text`` as a YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return json.dumps(text)


def free_vsock_port() -> int:
    """A random high vsock port nothing is bound to right now (bind only: never a connect)."""
    for _ in range(20):
        port = random.randint(20000, 60000)
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((socket.VMADDR_CID_ANY, port))
            except OSError:
                continue
        return port
    raise AssertionError("no free vsock port in 20 tries")


def test_reloads_quoting_newlines_from_the_file_and_its_path_log_one_line_each(spawn, tmp_path):
    """A reload rejected for a bad service address or bad YAML logs one line, path and address escaped.

    Fails on the original code: the rejection splits into several lines, one of them the forged one.
    """
    config = tmp_path / f"allow{FORGERY}list.yaml"
    port = free_vsock_port()
    allowlist = "allowlist:\n- {address: 127.0.0.1, port: 443}\n"
    config.write_text(allowlist + f"services:\n- {{listen_port: {port}, address: 127.0.0.1, port: 443}}\n")
    proxy = spawn([sys.executable, "-m", "vsockproxy", "--config", str(config)])
    proxy.wait_for(f"listening on vsock port {port}", timeout=30)

    config.write_text(allowlist + f"services:\n- {{listen_port: {port}, address: "
                                  f"{yaml_string('127.0.0.1' + FORGERY)}, port: 443}}\n")
    proxy.signal(signal.SIGHUP)
    bad_address = proxy.wait_for("reload rejected", timeout=10)
    config.write_text("allowlist: [\n")
    proxy.signal(signal.SIGHUP)
    bad_yaml = proxy.wait_for("reload rejected", timeout=10, count=2)
    proxy.signal(signal.SIGTERM)
    assert proxy.finish(timeout=30) == 0, proxy.text()

    assert f"127.0.0.1{ESCAPED_FORGERY}" in bad_address, bad_address
    assert f"allow{ESCAPED_FORGERY}list.yaml: not valid YAML" in bad_yaml, bad_yaml
    lines = assert_every_line_is_ours(proxy.text())
    assert len([line for line in lines if "reload rejected" in line]) == 2, proxy.text()
