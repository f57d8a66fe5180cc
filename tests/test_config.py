"""vsockproxy.config: services decided from the file and the options, with one set of validators.

The file format itself (every refusal, the bounds) is tested in test_allowlist.py, test_loader.py,
test_fuzz.py and test_bypass.py; here: what the two sources mean together.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest

from tests.helpers import assert_one_line_error
from vsockproxy.cli import options_from, parse_arguments
from vsockproxy.config import (CONNECT_TIMEOUT, NUM_WORKERS, TCP_PORT, VSOCK_PORT, ConfigError, Defaults, Options,
                               ServiceEntry, configure, parse_document)

pytestmark = pytest.mark.timeout(30)

ALLOW = [{"address": "127.0.0.1", "port": 9000}]


def file_with(*services: dict):
    return parse_document({"allowlist": ALLOW, "services": list(services)}, "f.yaml")


def test_a_service_takes_the_command_lines_defaults_for_what_it_leaves_out():
    file = file_with({"listen_port": 8000, "address": "127.0.0.1", "port": 9000},
                     {"listen_port": 8001, "address": "127.0.0.1", "port": 9000, "num_workers": 7, "ipv6": True,
                      "connect_timeout": 2, "idle_timeout": 0})
    options = Options(defaults=Defaults(num_workers=3, family=socket.AF_INET, connect_timeout=5.0, idle_timeout=60.0))
    first, second = configure(file, options).services
    assert (first.num_workers, first.family, first.connect_timeout, first.idle_timeout) == (3, socket.AF_INET, 5.0, 60.0)
    # An explicit 0 idle timeout (never) is kept, not replaced by the default.
    assert (second.num_workers, second.family, second.connect_timeout, second.idle_timeout) == \
        (7, socket.AF_INET6, 2.0, 0.0)


def test_the_command_line_service_comes_first_and_may_not_share_a_port_with_the_file():
    file = file_with({"listen_port": 8001, "address": "127.0.0.1", "port": 9000})
    options = Options(config_path="f.yaml", command_line_service=ServiceEntry(8000, "127.0.0.1", 9000))
    assert [service.listen_port for service in configure(file, options).services] == [8000, 8001]
    clash = dataclasses.replace(options, command_line_service=ServiceEntry(8001, "127.0.0.1", 9000))
    with pytest.raises(ConfigError, match="vsock port 8001 is both on the command line and in f.yaml"):
        configure(file, clash)


def test_nothing_to_serve_names_both_ways_to_fix_it():
    with pytest.raises(ConfigError, match="nothing to serve: give LOCAL_PORT REMOTE_ADDR REMOTE_PORT or list services in"):
        configure(file_with(), Options(config_path="f.yaml"))


def test_services_are_frozen():
    service = configure(file_with({"listen_port": 8000, "address": "127.0.0.1", "port": 9000}), Options()).services[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.port = 1


def test_options_from_the_command_line():
    options = options_from(parse_arguments(["-6", "-w", "9", "--idle-timeout", "30", "--dns-ttl", "0",
                                            "--config", "c.yaml", "8000", "example.com", "443"]))
    assert options.config_path == "c.yaml" and options.dns_ttl == 0.0
    assert options.defaults == Defaults(num_workers=9, family=socket.AF_INET6, connect_timeout=10.0, idle_timeout=30.0)
    assert options.command_line_service == ServiceEntry(8000, "example.com", 443)
    assert options_from(parse_arguments([])).command_line_service is None


@pytest.mark.parametrize("valid, value, message", [
    (TCP_PORT, 0, "port must be from 1 to 65535, got 0"),
    (TCP_PORT, 65536, "port must be from 1 to 65535, got 65536"),
    (VSOCK_PORT, 0, "port must be from 1 to 4294967294, got 0"),
    (NUM_WORKERS, 0, "port must be from 1 to 1000000, got 0"),
])
def test_one_validator_one_message(valid, value, message):
    with pytest.raises(ValueError, match=message):
        valid.check(value, "port")


@pytest.mark.parametrize("file_value, option, option_value", [
    ({"port": 0}, "REMOTE_PORT", "0"),
    ({"listen_port": 0}, "LOCAL_PORT", "0"),
    ({"num_workers": 0}, "num_workers", "0"),
    ({"connect_timeout": 0}, "connect-timeout", "0"),
])
def test_the_file_and_the_command_line_refuse_alike(run_cli, write_config, file_value, option, option_value):
    """The same out-of-range value gets the same words from the YAML file and from the command line."""
    entry = {"listen_port": 8000, "address": "127.0.0.1", "port": 9000, **file_value}
    with pytest.raises(ConfigError) as from_file:
        file_with(entry)
    file_words = str(from_file.value).split(": ", 2)[-1].split(" ", 1)[1]   # after "f.yaml: service 1: KEY"
    positional = {"LOCAL_PORT": ["0", "127.0.0.1", "9000"], "REMOTE_PORT": ["8000", "127.0.0.1", "0"]}
    argv = positional.get(option, [f"--{option}", option_value])
    line = assert_one_line_error(run_cli(*argv, "--config", write_config([("127.0.0.1", 9000)])), 2)
    assert file_words in line, (file_words, line)


def test_connect_timeout_must_be_more_than_zero_in_both():
    with pytest.raises(ValueError, match="must be more than 0 seconds, got 0"):
        CONNECT_TIMEOUT.check(0, "connect-timeout")
    with pytest.raises(ValueError, match="must be a number of seconds, got 'soon'"):
        CONNECT_TIMEOUT.parse("soon", "connect-timeout")


# --------------------------------------------------------------------------- request-routed modes (issue 13)

def test_each_mode_takes_the_target_keys_it_needs_and_no_others():
    file = file_with({"listen_port": 8080, "mode": "http-connect"},
                     {"listen_port": 1080, "mode": "socks5", "verify_sni": True},
                     {"listen_port": 8443, "mode": "sni", "port": 443, "handshake_timeout": 2.5},
                     {"listen_port": 8000, "mode": "fixed", "address": "127.0.0.1", "port": 9000})
    options = Options(defaults=Defaults(handshake_timeout=7.0))
    connect, socks, sni, fixed = configure(file, options).services
    assert (connect.mode, connect.address, connect.port, connect.verify_sni, connect.handshake_timeout) == \
        ("http-connect", None, None, False, 7.0)
    assert (socks.mode, socks.verify_sni) == ("socks5", True)
    assert (sni.mode, sni.address, sni.port, sni.handshake_timeout) == ("sni", None, 443, 2.5)
    assert (fixed.mode, fixed.address, fixed.port) == ("fixed", "127.0.0.1", 9000)
    assert [str(s) for s in (connect, sni, fixed)] == ["vsock port 8080 (http-connect)", "vsock port 8443 (sni, port 443)",
                                                       "vsock port 8000 -> 127.0.0.1:9000"]


@pytest.mark.parametrize("entry, message", [
    ({"mode": "socks4"}, "service 1: mode must be one of fixed, http-connect, socks5, sni, found str 'socks4'"),
    ({"mode": "http-connect", "address": "a.example"}, "service 1: mode http-connect takes no 'address'"),
    ({"mode": "socks5", "port": 443}, "service 1: mode socks5 takes no 'port'"),
    ({"mode": "sni"}, "service 1: missing 'port'"),
    ({"mode": "sni", "port": 443, "address": "a.example"}, "service 1: mode sni takes no 'address'"),
    ({"mode": "fixed", "address": "127.0.0.1"}, "service 1: missing 'port'"),
    ({"mode": "fixed", "address": "127.0.0.1", "port": None}, "service 1: missing 'port'"),
    ({"mode": "sni", "port": 443, "verify_sni": True}, "verify_sni applies to modes http-connect and socks5 only"),
    ({"mode": "socks5", "verify_sni": "yes"}, "verify_sni must be true or false, found str 'yes'"),
    ({"mode": "socks5", "handshake_timeout": 0}, "handshake_timeout must be more than 0 seconds, got 0"),
])
def test_mode_mistakes_are_one_clear_line(entry, message):
    with pytest.raises(ConfigError) as refused:
        file_with({"listen_port": 8080, **entry})
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_handshake_timeout_comes_from_the_command_line_and_the_environment(run_cli, write_config, monkeypatch):
    assert options_from(parse_arguments(["--handshake-timeout", "3"])).defaults.handshake_timeout == 3.0
    monkeypatch.setenv("VSOCK_PROXY_HANDSHAKE_TIMEOUT", "4.5")
    assert options_from(parse_arguments([])).defaults.handshake_timeout == 4.5
    line = assert_one_line_error(run_cli("--handshake-timeout", "0", "--config", write_config([("127.0.0.1", 9000)]),
                                         "8000", "127.0.0.1", "9000"), 2)
    assert "handshake-timeout must be more than 0 seconds, got 0" in line
