"""The ``vsock-proxy`` command line: flags, env vars, settings file, RUST_LOG, one-line errors, exit codes.

Most tests here parse in-process (``parse_arguments``) or run a subprocess that
exits before it would listen.  The few that start the real proxy (options among
the positionals, RUST_LOG) only let it bind and listen on vsock, learn that it is
ready from its sd_notify READY=1 on a Unix socket, and stop it with SIGTERM;
nothing connects to it.  The listener itself is tested in test_listen.py.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.helpers import assert_one_line_error, cli_env, vsock_available
from vsockproxy import __version__
from vsockproxy.cli import level_from_rust_log, parse_arguments

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_inherited_rust_log(monkeypatch):
    """RUST_LOG in the developer's shell must not change what the in-process parses give."""
    monkeypatch.delenv("RUST_LOG", raising=False)


def proxy_env(**extra: str) -> dict[str, str]:
    """cli_env() without an inherited RUST_LOG, plus ``extra``."""
    env = cli_env(**extra)
    if "RUST_LOG" not in extra:
        env.pop("RUST_LOG", None)
    return env

ENV_VARS = [
    "VSOCK_PROXY_IPV4", "VSOCK_PROXY_IPV6", "VSOCK_PROXY_NUM_WORKERS", "VSOCK_PROXY_CONFIG",
    "VSOCK_PROXY_CID", "VSOCK_PROXY_BACKLOG", "VSOCK_PROXY_LOG_LEVEL", "VSOCK_PROXY_SETTINGS",
]
# A high vsock port: should a test wrongly get as far as listening, it must not take a well-known one.
LOCAL_PORT = "47913"
POSITIONALS = [LOCAL_PORT, "127.0.0.1", "9000"]


# --------------------------------------------------------------------------- --help / --version

def test_help_lists_every_flag_and_env_var(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    for flag in ("-4", "--ipv4", "-6", "--ipv6", "-w", "--num_workers", "--config", "--cid", "--backlog",
                 "--log-level", "-V", "--version", "-h", "--help", "LOCAL_PORT", "REMOTE_ADDR", "REMOTE_PORT"):
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", text), flag
    for name in ENV_VARS:
        assert name in text, name
    assert "/etc/nitro_enclaves/vsock-proxy.yaml" in text


def test_every_option_has_an_env_var_shown_in_help(run_cli):
    from vsockproxy.cli import build_parser

    parser = build_parser()
    help_text = run_cli("--help").stdout
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version", "check"):
            continue
        env_var = getattr(action, "env_var", None)
        assert env_var and env_var.startswith("VSOCK_PROXY_"), action.option_strings
        assert env_var in help_text, env_var


def test_short_help_flag(run_cli):
    result = run_cli("-h")
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(run_cli, flag):
    result = run_cli(flag)
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout + result.stderr


# --------------------------------------------------------------------------- usage errors: exit 2, one line

def test_ipv4_and_ipv6_together(run_cli):
    assert_one_line_error(run_cli("-4", "-6", *POSITIONALS), 2, "-4", "-6")


BAD_VALUES = [
    (["0", "127.0.0.1", "9000"], "LOCAL_PORT"),
    (["-1", "127.0.0.1", "9000"], ""),
    (["4294967295", "127.0.0.1", "9000"], "LOCAL_PORT"),
    (["eighty", "127.0.0.1", "9000"], "LOCAL_PORT"),
    ([LOCAL_PORT, "127.0.0.1", "0"], "REMOTE_PORT"),
    ([LOCAL_PORT, "127.0.0.1", "65536"], "REMOTE_PORT"),
    ([LOCAL_PORT, "127.0.0.1", "443x"], "REMOTE_PORT"),
    ([LOCAL_PORT, "127.0.0.1", "4.43"], "REMOTE_PORT"),
    ([LOCAL_PORT, "127.0.0.1", ""], "REMOTE_PORT"),
    (["-w", "0", *POSITIONALS], "num_workers"),
    (["-w", "many", *POSITIONALS], "num_workers"),
    (["--num_workers=-3", *POSITIONALS], "num_workers"),
    (["--backlog", "0", *POSITIONALS], "backlog"),
    (["--cid", "three", *POSITIONALS], "cid"),
    (["--cid", "-1", *POSITIONALS], "cid"),
    (["--log-level", "chatty", *POSITIONALS], "log-level"),
    (["-4", "-6", *POSITIONALS], "-6"),
    (["--bogus", *POSITIONALS], "--bogus"),
    (["-x", *POSITIONALS], "-x"),
    ([*POSITIONALS, "extra"], "extra"),
    ([LOCAL_PORT], "REMOTE_ADDR"),
    ([LOCAL_PORT, "127.0.0.1"], "REMOTE_PORT"),
]


@pytest.mark.parametrize("args, needle", BAD_VALUES)
def test_bad_values_are_usage_errors(capsys, args, needle):
    """In-process, every bad value: SystemExit(2) and exactly one stderr line naming the problem."""
    with pytest.raises(SystemExit) as excinfo:
        parse_arguments(args)
    assert excinfo.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsock-proxy: error: "), captured.err
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("args, needle", [
    ([LOCAL_PORT, "127.0.0.1", "65536"], "REMOTE_PORT"),
    (["eighty", "127.0.0.1", "9000"], "LOCAL_PORT"),
    (["-w", "0", *POSITIONALS], "num_workers"),
    (["--bogus", *POSITIONALS], "--bogus"),
    ([LOCAL_PORT, "127.0.0.1"], "REMOTE_PORT"),
])
def test_bad_values_exit_2_with_one_line(run_cli, args, needle):
    """The real command: exit status 2, one line, no traceback."""
    line = assert_one_line_error(run_cli(*args), 2)
    assert needle.lower() in line.lower(), line


@pytest.mark.parametrize("env, needle", [
    ({"VSOCK_PROXY_NUM_WORKERS": "0"}, "num_workers"),
    ({"VSOCK_PROXY_IPV4": "1", "VSOCK_PROXY_IPV6": "1"}, "-6"),
    ({"VSOCK_PROXY_IPV4": "maybe"}, "VSOCK_PROXY_IPV4"),
    ({"VSOCK_PROXY_BACKLOG": "lots"}, "backlog"),
])
def test_bad_env_values_exit_2_with_one_line(run_cli, env, needle):
    line = assert_one_line_error(run_cli(*POSITIONALS, env=cli_env(**env)), 2)
    assert needle.lower() in line.lower(), line


def test_missing_settings_file(run_cli, tmp_path):
    missing = str(tmp_path / "absent.conf")
    assert_one_line_error(run_cli("--settings", missing, *POSITIONALS), 2, missing)


def test_unknown_key_in_settings_file(run_cli, tmp_path):
    settings = tmp_path / "proxy.conf"
    settings.write_text("bogus = 1\n")
    assert_one_line_error(run_cli("--settings", str(settings), *POSITIONALS), 2, "bogus")


# --------------------------------------------------------------------------- configuration errors: exit 1

def test_allowlist_rejected_target(run_cli, write_config):
    config = write_config([("127.0.0.1", 9000)])
    assert_one_line_error(run_cli(LOCAL_PORT, "127.0.0.2", "9000", "--config", config), 1, "127.0.0.2")


def test_allowlist_rejected_port(run_cli, write_config):
    config = write_config([("127.0.0.1", 9000)])
    line = assert_one_line_error(run_cli(LOCAL_PORT, "127.0.0.1", "9001", "--config", config), 1, "9001", config)
    assert "127.0.0.1" in line


@pytest.mark.parametrize("remote", ["2130706433", "127.1", "0177.0.0.1"])
def test_loose_remote_spelling_rejected(run_cli, write_config, remote):
    config = write_config([("127.0.0.1", 9000)])
    assert_one_line_error(run_cli(LOCAL_PORT, remote, "9000", "--config", config), 1, remote)


def test_ipv4_only_rejects_ipv6_literal_target(run_cli, write_config):
    config = write_config([('"::1"', 9000)])
    assert_one_line_error(run_cli("-4", LOCAL_PORT, "::1", "9000", "--config", config, timeout=5), 1, "::1")


def test_default_config_path_is_used(run_cli, tmp_path):
    """Without --config the default /etc path is read; here it is absent or does not allow the target."""
    result = run_cli(LOCAL_PORT, "127.0.0.254", "1", env=cli_env())
    line = assert_one_line_error(result, 1)
    assert "/etc/nitro_enclaves/vsock-proxy.yaml" in line or "127.0.0.254" in line


@pytest.mark.parametrize("kind", ["missing", "directory", "not-yaml", "python-tag", "no-allowlist",
                                  "not-a-list", "bad-port"])
def test_config_file_errors_exit_1_naming_the_file(run_cli, tmp_path, write_config, kind):
    if kind == "missing":
        config = str(tmp_path / "absent.yaml")
    elif kind == "directory":
        config = str(tmp_path)
    else:
        config = write_config({
            "not-yaml": "allowlist: [\n",
            "python-tag": "allowlist: !!python/object/apply:os.getcwd []\n",
            "no-allowlist": "entries: []\n",
            "not-a-list": "allowlist: 127.0.0.1\n",
            "bad-port": "allowlist:\n- {address: 127.0.0.1, port: '9000'}\n",
        }[kind])
    assert_one_line_error(run_cli(*POSITIONALS, "--config", config), 1, config)


def test_config_from_env(run_cli, write_config):
    config = write_config([("127.0.0.1", 9000)])
    result = run_cli(LOCAL_PORT, "127.0.0.3", "9000", env=cli_env(VSOCK_PROXY_CONFIG=config))
    assert_one_line_error(result, 1, config)


def test_cli_config_beats_env_config(run_cli, write_config, tmp_path):
    good = write_config([("127.0.0.1", 9000)])
    result = run_cli(LOCAL_PORT, "127.0.0.3", "9000", "--config", good,
                     env=cli_env(VSOCK_PROXY_CONFIG=str(tmp_path / "absent.yaml")))
    assert_one_line_error(result, 1, good, "127.0.0.3")


def test_listen_on_a_foreign_cid_fails_with_one_line(run_cli, write_config):
    """Binding (never connecting) a CID that is not this machine's fails cleanly with exit 1."""
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        pytest.skip("no AF_VSOCK on this kernel")
    config = write_config([("127.0.0.1", 9000)])
    result = run_cli("--cid", "123456", "43210", "127.0.0.1", "9000", "--config", config)
    assert_one_line_error(result, 1, "123456")


# --------------------------------------------------------------------------- precedence: CLI > env > settings > default

@pytest.fixture
def settings_file(tmp_path):
    path = tmp_path / "proxy.conf"
    path.write_text("num_workers = 5\nbacklog = 555\nlog-level = warning\ncid = 7\nconfig = /from/settings.yaml\n")
    return str(path)


def test_defaults():
    settings = parse_arguments(POSITIONALS)
    assert (settings.local_port, settings.remote_addr, settings.remote_port) == (int(LOCAL_PORT), "127.0.0.1", 9000)
    assert settings.num_workers is None  # each service's mode decides: 4 for this fixed one (test_pooled_clients.py)
    assert settings.ipv4 is False and settings.ipv6 is False
    assert settings.config == "/etc/nitro_enclaves/vsock-proxy.yaml"
    assert settings.cid == socket.VMADDR_CID_ANY
    assert settings.backlog >= 1024
    assert settings.log_level == "info"


def test_long_and_short_flags():
    settings = parse_arguments(["-4", "-w", "9", "--config", "/x.yaml", "--cid", "3", "--backlog", "2048",
                               "--log-level", "DEBUG", *POSITIONALS])
    assert settings.ipv4 and not settings.ipv6
    assert (settings.num_workers, settings.config, settings.cid, settings.backlog, settings.log_level) == \
        (9, "/x.yaml", 3, 2048, "debug")
    settings = parse_arguments(["--ipv6", "--num_workers", "2", "--cid", "any", *POSITIONALS])
    assert settings.ipv6 and settings.num_workers == 2 and settings.cid == socket.VMADDR_CID_ANY


def test_settings_file_beats_defaults(settings_file):
    settings = parse_arguments(["--settings", settings_file, *POSITIONALS])
    assert (settings.num_workers, settings.backlog, settings.log_level, settings.cid, settings.config) == \
        (5, 555, "warning", 7, "/from/settings.yaml")


def test_settings_file_from_env(monkeypatch, settings_file):
    monkeypatch.setenv("VSOCK_PROXY_SETTINGS", settings_file)
    assert parse_arguments(POSITIONALS).num_workers == 5


def test_env_beats_settings_file(monkeypatch, settings_file):
    monkeypatch.setenv("VSOCK_PROXY_NUM_WORKERS", "6")
    monkeypatch.setenv("VSOCK_PROXY_LOG_LEVEL", "error")
    monkeypatch.setenv("VSOCK_PROXY_CONFIG", "/from/env.yaml")
    settings = parse_arguments(["--settings", settings_file, *POSITIONALS])
    assert (settings.num_workers, settings.log_level, settings.config) == (6, "error", "/from/env.yaml")
    assert settings.backlog == 555  # not in env: the settings file still counts


def test_cli_beats_env_and_settings_file(monkeypatch, settings_file):
    monkeypatch.setenv("VSOCK_PROXY_NUM_WORKERS", "6")
    monkeypatch.setenv("VSOCK_PROXY_CID", "8")
    settings = parse_arguments(["--settings", settings_file, "-w", "7", "--cid", "9", *POSITIONALS])
    assert (settings.num_workers, settings.cid, settings.backlog) == (7, 9, 555)


def test_env_beats_default(monkeypatch):
    monkeypatch.setenv("VSOCK_PROXY_NUM_WORKERS", "3")
    monkeypatch.setenv("VSOCK_PROXY_BACKLOG", "2048")
    monkeypatch.setenv("VSOCK_PROXY_IPV6", "true")
    settings = parse_arguments(POSITIONALS)
    assert (settings.num_workers, settings.backlog, settings.ipv6) == (3, 2048, True)


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("yes", True),
                                             ("false", False), ("0", False), ("no", False)])
def test_boolean_env_values(monkeypatch, value, expected):
    monkeypatch.setenv("VSOCK_PROXY_IPV4", value)
    assert parse_arguments(POSITIONALS).ipv4 is expected


def test_family_flag_on_cli_overrides_the_other_family_from_env(monkeypatch):
    monkeypatch.setenv("VSOCK_PROXY_IPV4", "1")
    settings = parse_arguments(["-6", *POSITIONALS])
    assert settings.ipv6 and not settings.ipv4


def test_parse_errors_are_system_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as excinfo:
        parse_arguments(["-w", "0", *POSITIONALS])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "num_workers" in err and "Traceback" not in err


def test_metrics_address_in_use_is_one_line_and_frees_the_vsock_port(run_cli, write_config):
    config = write_config([("127.0.0.1", 9000)])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        metrics = f"127.0.0.1:{busy.getsockname()[1]}"
        port = random.randint(20000, 60000)
        result = run_cli(str(port), "127.0.0.1", "9000", "--config", config, "--metrics-address", metrics)
    assert_one_line_error(result, 1, "cannot serve metrics on", "Address already in use")
    probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        probe.bind((socket.VMADDR_CID_ANY, port))  # bind only: the listener was closed again
    finally:
        probe.close()


# --------------------------------------------------------------------------- logging under systemd

LOG_THREE_LEVELS = ("from vsockproxy import cli; import logging; cli.configure_logging('info'); "
                    "log = logging.getLogger('vsockproxy'); log.debug('d'); log.info('i'); log.warning('w')")


@pytest.mark.parametrize("same_inode", [True, False])
def test_log_lines_carry_a_syslog_priority_only_when_stderr_is_the_journal(tmp_path, same_inode):
    """journald stamps the time itself and parses ``<N>`` priorities; a terminal or a file gets timestamps."""
    stderr_path = tmp_path / "stderr"
    other = tmp_path / "other"
    stderr_path.touch()
    other.touch()
    info = os.stat(stderr_path if same_inode else other)
    with open(stderr_path, "wb") as stderr:
        done = subprocess.run([sys.executable, "-c", LOG_THREE_LEVELS], stderr=stderr, timeout=20,
                              env=cli_env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}"))
    assert done.returncode == 0
    lines = stderr_path.read_text().splitlines()
    if same_inode:
        assert lines == ["<6>i", "<4>w"]
    else:
        assert [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line) for line in lines] == ["INFO i", "WARNING w"]


@pytest.mark.parametrize("env, expected", [(None, False), ("1", True), ("0", False)])
def test_greenlet_tree_tracking_is_off_unless_asked_for(env, expected):
    code = ("from vsockproxy import cli; import gevent; cli.skip_greenlet_tree_tracking(); "
            "print(gevent.config.track_greenlet_tree, gevent.spawn(lambda: None).spawning_stack is not None)")
    extra = {} if env is None else {"GEVENT_TRACK_GREENLET_TREE": env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                          env=cli_env(**extra))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(expected), str(expected)]


# --------------------------------------------------------------------------- options anywhere, as upstream (clap)

@pytest.mark.parametrize("args", [
    [LOCAL_PORT, "--config", "/f.yaml", "127.0.0.1", "9000"],
    [LOCAL_PORT, "127.0.0.1", "-w", "8", "9000", "--config", "/f.yaml"],
    [LOCAL_PORT, "-w8", "127.0.0.1", "--config=/f.yaml", "9000"],
    ["-4", LOCAL_PORT, "127.0.0.1", "--dns-ttl", "5", "9000", "--config", "/f.yaml"],
])
def test_options_may_stand_among_the_positionals(args):
    settings = parse_arguments(args)
    assert (settings.local_port, settings.remote_addr, settings.remote_port) == (int(LOCAL_PORT), "127.0.0.1", 9000)
    assert settings.config == "/f.yaml"


def test_options_among_the_positionals_keep_their_values():
    settings = parse_arguments([LOCAL_PORT, "-w", "8", "127.0.0.1", "--connect-timeout", "3", "9000", "-6"])
    assert (settings.num_workers, settings.connect_timeout, settings.ipv6) == (8, 3.0, True)


def test_env_settings_still_apply_with_options_among_the_positionals(monkeypatch):
    monkeypatch.setenv("VSOCK_PROXY_NUM_WORKERS", "3")
    monkeypatch.setenv("VSOCK_PROXY_BACKLOG", "99")
    settings = parse_arguments([LOCAL_PORT, "--backlog", "77", "127.0.0.1", "9000"])
    assert (settings.remote_port, settings.num_workers, settings.backlog) == (9000, 3, 77)


@pytest.mark.parametrize("args, needle", [
    ([LOCAL_PORT, "-w", "8", "127.0.0.1", "65536"], "REMOTE_PORT"),
    ([LOCAL_PORT, "-w", "8", "127.0.0.1", "nine"], "REMOTE_PORT"),
    ([LOCAL_PORT, "-w", "8", "127.0.0.1"], "REMOTE_PORT"),
    ([LOCAL_PORT, "-w", "8", "127.0.0.1", "9000", "extra"], "unrecognized arguments: extra (see"),
    ([LOCAL_PORT, "--bogus", "127.0.0.1", "9000"], "unrecognized arguments: --bogus (see"),
])
def test_positionals_after_an_option_are_checked_like_the_others(capsys, args, needle):
    with pytest.raises(SystemExit) as excinfo:
        parse_arguments(args)
    assert excinfo.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsock-proxy: error: "), lines
    assert needle in lines[0], lines[0]


needs_vsock = pytest.mark.skipif(not vsock_available(), reason="no AF_VSOCK on this kernel")


@pytest.fixture
def notify_socket():
    """A systemd-style notify socket: the proxy sends READY=1 there once it listens (bind only, no vsock connect)."""
    directory = tempfile.mkdtemp(prefix="vsp-", dir="/tmp")  # short: sun_path is 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    yield sock, path
    sock.close()
    shutil.rmtree(directory)


def start_until_ready(spawn, notify_socket, args, env):
    """Start ``vsock-proxy ARGS`` (``{port}`` is a free random vsock port) and wait for READY=1; returns the process.

    SAFETY: the proxy only binds and listens on vsock; nothing here connects to it.
    """
    sock, path = notify_socket
    for _ in range(10):
        port = str(random.randint(20000, 60000))
        proxy = spawn([sys.executable, "-m", "vsockproxy", *(arg.replace("{port}", port) for arg in args)],
                      env={**env, "NOTIFY_SOCKET": path})
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            return proxy, port
        except socket.timeout:
            proxy.kill()
            if "already in use" in proxy.text() or "already in use" in "\n".join(proxy.drain()):
                continue  # lost a race for the port: pick another
            raise AssertionError(f"no READY=1 within 20 s; stderr: {proxy.text()}") from None
    raise AssertionError("no free vsock port found in 10 tries")


@needs_vsock
@pytest.mark.parametrize("args", [
    ["{port}", "--config", "@CONFIG@", "127.0.0.1", "9"],
    ["{port}", "127.0.0.1", "-w", "8", "9", "--config", "@CONFIG@"],
])
def test_interleaved_command_line_starts_and_stops(spawn, notify_socket, write_config, args):
    config = write_config([("127.0.0.1", 9)])
    proxy, port = start_until_ready(spawn, notify_socket, [arg.replace("@CONFIG@", config) for arg in args],
                                    proxy_env())
    proxy.signal(signal.SIGTERM)
    assert proxy.finish(timeout=10) == 0, proxy.text()
    listening = [line for line in proxy.lines if "listening on vsock port" in line]
    assert len(listening) == 1 and f"port {port}, forwarding to 127.0.0.1:9" in listening[0], proxy.text()
    assert ("8 worker(s)" if "-w" in args else "4 worker(s)") in listening[0]


# --------------------------------------------------------------------------- RUST_LOG, as upstream reads it

@pytest.mark.parametrize("value, level", [
    ("error", "error"), ("warn", "warning"), ("info", "info"), ("debug", "debug"), ("trace", "debug"),
    ("WARN", "warning"), ("off", "error"), ("", "info"), (" info ", "info"),
    ("vsock_proxy=debug", "debug"), ("vsock_proxy=warn", "warning"), ("warn,foo=debug", "warning"),
    ("foo=debug", "info"), ("hyper", "info"), ("info,vsock_proxy=error", "error"),
    ("vsock_proxy=error,info", "error"), ("vsock_proxy", "debug"), ("vsock_proxy::proxy=debug", "debug"),
    ("vsock_proxy=warn,vsock_proxy::proxy=debug", "debug"), ("error/some regex", "error"),
])
def test_rust_log_sets_the_level(monkeypatch, value, level):
    assert level_from_rust_log(value) == (level, None)
    monkeypatch.setenv("RUST_LOG", value)
    settings = parse_arguments(POSITIONALS)
    assert (settings.log_level, settings.log_level_warning) == (level, None)


@pytest.mark.parametrize("value", ["vsock_proxy=loud", "=debug", "info,foo=bar", "a=b=c", "warning=1"])
def test_unreadable_rust_log_is_a_warning_and_info(monkeypatch, value):
    monkeypatch.setenv("RUST_LOG", value)
    settings = parse_arguments(POSITIONALS)
    assert settings.log_level == "info"
    assert "RUST_LOG" in settings.log_level_warning and repr(value) in settings.log_level_warning


def test_log_level_option_env_and_settings_beat_rust_log(monkeypatch, tmp_path):
    monkeypatch.setenv("RUST_LOG", "error")
    assert parse_arguments(POSITIONALS).log_level == "error"
    assert parse_arguments(["--log-level", "debug", *POSITIONALS]).log_level == "debug"
    settings_file = tmp_path / "proxy.conf"
    settings_file.write_text("log-level = warning\n")
    assert parse_arguments(["--settings", str(settings_file), *POSITIONALS]).log_level == "warning"
    monkeypatch.setenv("VSOCK_PROXY_LOG_LEVEL", "info")
    assert parse_arguments(POSITIONALS).log_level == "info"


@needs_vsock
@pytest.mark.parametrize("rust_log, info_lines, warnings", [
    ("error", False, 0),
    ("warn", False, 0),
    ("vsock_proxy=loud", True, 1),
])
def test_rust_log_governs_what_the_proxy_prints(spawn, notify_socket, write_config, rust_log, info_lines, warnings):
    config = write_config([("127.0.0.1", 9)])
    proxy, _ = start_until_ready(spawn, notify_socket, ["{port}", "127.0.0.1", "9", "--config", config],
                                 proxy_env(RUST_LOG=rust_log))
    proxy.signal(signal.SIGTERM)
    assert proxy.finish(timeout=10) == 0, proxy.text()
    assert any(" INFO " in line for line in proxy.lines) is info_lines, proxy.text()
    warning_lines = [line for line in proxy.lines if " WARNING " in line]
    assert len(warning_lines) == warnings, proxy.text()
    if warnings:
        assert "RUST_LOG='vsock_proxy=loud'" in warning_lines[0] and "logging at info" in warning_lines[0]


# --------------------------------------------------------------------------- settings file spellings, --help

def test_settings_keys_take_either_spelling(tmp_path):
    settings_file = tmp_path / "proxy.conf"
    settings_file.write_text("num-workers = 5\nconnect_timeout = 3\nlog_level = debug\ndns-ttl = 7\n"
                             "shutdown_grace = 2\nidle_timeout = 9\nmetrics_address = 127.0.0.1:9100\n")
    settings = parse_arguments(["--settings", str(settings_file), *POSITIONALS])
    assert (settings.num_workers, settings.connect_timeout, settings.log_level, settings.dns_ttl,
            settings.shutdown_grace, settings.idle_timeout, settings.metrics_address) == \
        (5, 3.0, "debug", 7.0, 2.0, 9.0, "127.0.0.1:9100")


@pytest.mark.parametrize("text, needle", [
    ("num_workers = 5\nnum-workers = 6\n", "num_workers and num-workers"),
    ("connect-timeout = 5\nconnect-timeout = 6\n", "connect-timeout is given twice"),
])
def test_a_setting_given_twice_is_refused(run_cli, tmp_path, text, needle):
    settings_file = tmp_path / "proxy.conf"
    settings_file.write_text(text)
    assert_one_line_error(run_cli("--settings", str(settings_file), *POSITIONALS), 2, needle, str(settings_file))


@pytest.mark.parametrize("line", ["settings = /other.conf", "check = true", "help = true", "--version = 1"])
def test_options_that_are_no_settings_are_refused_in_a_settings_file(run_cli, tmp_path, line):
    """--settings there would never be read, --check would turn the service into a one-shot check."""
    settings_file = tmp_path / "proxy.conf"
    settings_file.write_text(f"num_workers = 2\n{line}\n")
    key = line.split(" =")[0]
    assert_one_line_error(run_cli("--settings", str(settings_file), *POSITIONALS), 2,
                          f"{settings_file}: {key} is no setting")


def test_help_has_no_dead_link_and_tells_the_settings_syntax(run_cli):
    text = run_cli("--help").stdout
    assert re.findall(r"\w+://\S+", text) == ["http://HOST:PORT/metrics"]
    flat = " ".join(text.split())
    assert "num_workers = 16, connect-timeout = 5" in flat and "'-' or '_'" in flat
    assert "RUST_LOG" in flat and "--check" in flat
    assert "command-line values override environment variables which override config file values" in flat


@pytest.mark.parametrize("argv, env, option", [
    (["--backlog=--", "8000", "127.0.0.1", "9"], {}, "--backlog"),
    (["8000", "127.0.0.1", "9"], {"VSOCK_PROXY_BACKLOG": "--"}, "--backlog"),
    (["8000", "127.0.0.1", "9"], {"VSOCK_PROXY_HANDSHAKE_TIMEOUT": "--"}, "--handshake-timeout"),
])
def test_a_value_of_two_dashes_is_a_usage_error_not_an_empty_list(run_cli, argv, env, option):
    """Before Python 3.13, argparse drops a value of exactly ``--`` and stores []; found by the CLI fuzz.

    3.13's argparse hands the value to the option's own check instead: either way, one line and exit 2.
    """
    result = run_cli(*argv, env=cli_env(**env))
    line = assert_one_line_error(result, 2)
    assert f"argument {option}: " in line and ("expected one argument" in line or "got '--'" in line)
