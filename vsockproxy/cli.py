"""The ``vsock-proxy`` command: upstream's CLI, plus env-var and settings-file overrides.

Every option may come from the command line, a ``VSOCK_PROXY_*`` environment
variable or a ``--settings`` file, in that order of precedence.  As with
upstream's parser, options may stand anywhere among the three positionals, and
``RUST_LOG`` sets the log level when nothing else does.  Every failure before
serving is one line on stderr and a non-zero exit: 2 for usage errors, 1 for
configuration, allowlist and listener errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import sys
from functools import partial
from typing import Callable, NoReturn, Sequence

import configargparse
import gevent

from vsockproxy import __version__
from vsockproxy.allowlist import NotAllowed
from vsockproxy.check import run_check
from vsockproxy.config import (CONNECT_TIMEOUT, DEFAULT_PATH, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, NUM_WORKERS, PROCESSES,
                               TCP_PORT, VSOCK_PORT, ConfigError, Defaults, Options, Seconds, ServiceEntry, WholeNumber,
                               parse_bind_address)
from vsockproxy.listen import VMADDR_CID_ANY, ListenError, vsock_listener
from vsockproxy.logs import configure_logging, one_line
from vsockproxy.supervisor import StartupError, Supervisor
from vsockproxy.workers import Workers

PROG = "vsock-proxy"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Makes a listening socket for a vsock port; the CLI binds --cid and --backlog.  Tests and
#: benchmarks pass one that listens on TCP instead: the rest of the product runs unchanged.
ListenerFactory = Callable[..., socket.socket]
#: env_logger's level names (RUST_LOG), as this proxy's levels; "off" is as quiet as it gets here.
RUST_LEVELS = {"off": "error", "error": "error", "warn": "warning", "info": "info", "debug": "debug",
               "trace": "debug"}
RUST_TARGET = "vsock_proxy"  # upstream's crate: RUST_LOG=vsock_proxy=debug addresses it
#: Options that are no settings: a settings file cannot hold them (--settings would be read too late).
NOT_SETTINGS = ("settings", "check", "help", "version")


class SettingsFileParser(configargparse.DefaultConfigFileParser):
    """``option = value`` lines; each setting once, however it is spelled (else which one wins?)."""

    def get_syntax_description(self) -> str:
        return ("Settings file syntax: one 'option = value' line per setting, the option's long name without "
                "'--', with '-' or '_' alike (num_workers = 16, connect-timeout = 5, ipv4 = true), each "
                "at most once; '#' starts a comment; all options but settings, check, help and version.")

    def parse(self, stream) -> dict:
        lines = _NamedLines(stream)
        lines.name = getattr(stream, "name", "settings file")
        items = super().parse(lines)  # first, so that a malformed line is reported as such
        seen: dict[str, str] = {}
        for line in lines:
            for key in super().parse([line]):
                setting = key.lstrip("-").replace("-", "_")
                if setting in NOT_SETTINGS:
                    raise configargparse.ConfigFileParserException(f"{lines.name}: {key} is no setting")
                if setting in seen:
                    first = seen[setting]
                    same = f"{key} is given twice" if first == key else f"{first} and {key} are the same setting"
                    raise configargparse.ConfigFileParserException(f"{lines.name}: {same}")
                seen[setting] = key
        return items


class _NamedLines(list):
    """A file's lines that still answer to the file's name, as configargparse's messages expect."""

    name: str


class OneLineParser(configargparse.ArgumentParser):
    """argparse prints usage plus the error; operators and scripts want just the error."""

    def __init__(self, *args, **kwargs) -> None:
        self.positionals: list[argparse.Action] = []    # first: argparse's __init__ adds --help
        self.value_options: list[argparse.Action] = []  # options that take one value
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """Remember the positionals and the one-value options, which parse_arguments checks again.

        The -4/-6 group adds its flags through the group, and flags take no value.
        """
        action = super().add_argument(*args, **kwargs)
        if not action.option_strings:
            self.positionals.append(action)
        elif action.nargs is None:
            self.value_options.append(action)
        return action

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {one_line(message)} (see {PROG} --help)\n")

    def get_possible_config_keys(self, action: argparse.Action) -> list[str]:
        """Settings-file keys: ``num_workers`` and ``num-workers`` alike."""
        keys = super().get_possible_config_keys(action)
        bare = [key for key in keys if not key.startswith("-")]
        return keys + [other for key in bare for other in (key.replace("_", "-"), key.replace("-", "_"))
                       if other not in keys]


def _option(valid: WholeNumber | Seconds, what: str) -> Callable[[str], object]:
    """An argparse type from one of config.py's validators, so options and the file agree."""
    def parse(text: str):
        try:
            return valid.parse(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _cid(text: str) -> int:
    if text.lower() == "any":
        return VMADDR_CID_ANY
    return _option(WholeNumber(0, VMADDR_CID_ANY), "CID")(text)


def _processes(text: str) -> int:
    """A number of processes, or ``auto``: one per CPU this process may run on."""
    if text.strip().lower() == "auto":
        return min(len(os.sched_getaffinity(0)), PROCESSES.high)
    try:
        return PROCESSES.parse(text, "processes")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or auto)") from None


def _bind_address(text: str) -> str:
    try:
        parse_bind_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> OneLineParser:
    """The full option set; also what ``--help`` documents."""
    parser = OneLineParser(
        prog=PROG,
        description="Forward vsock connections from an enclave to allowlisted TCP endpoints. "
                    "LOCAL_PORT REMOTE_ADDR REMOTE_PORT may be left out when the --config file lists services.",
        config_file_parser_class=SettingsFileParser,
        add_env_var_help=True,
        add_config_file_help=True,
    )
    parser.add_argument("local_port", nargs="?", metavar="LOCAL_PORT",
                        type=_option(VSOCK_PORT, "LOCAL_PORT"),
                        help="vsock port to listen on for connections from the enclave")
    parser.add_argument("remote_addr", nargs="?", metavar="REMOTE_ADDR",
                        help="IP address or DNS name to forward to; must be allowed by --config")
    parser.add_argument("remote_port", nargs="?", metavar="REMOTE_PORT",
                        type=_option(TCP_PORT, "REMOTE_PORT"), help="TCP port to forward to")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4", action="store_true", env_var="VSOCK_PROXY_IPV4",
                        help="use IPv4 addresses only")
    family.add_argument("-6", "--ipv6", action="store_true", env_var="VSOCK_PROXY_IPV6",
                        help="use IPv6 addresses only")
    parser.add_argument("-w", "--num_workers", metavar="N",
                        type=_option(NUM_WORKERS, "num_workers"), default=Defaults.num_workers,
                        env_var="VSOCK_PROXY_NUM_WORKERS",
                        help="connections served at once, per service; more wait in the listen backlog (default: 4 for "
                             "a fixed target, 64 for modes http-connect, socks5 and sni)")
    parser.add_argument("--processes", metavar="N", type=_processes, default="auto", env_var="VSOCK_PROXY_PROCESSES",
                        help="processes that relay connections, each with its share of every service's workers; "
                             "'auto' is one per CPU this process may run on, 1 relays in this process alone "
                             "(default: auto)")
    parser.add_argument("--config", metavar="FILE", default=DEFAULT_PATH, env_var="VSOCK_PROXY_CONFIG",
                        help=f"YAML allowlist of reachable endpoints (default: {DEFAULT_PATH})")
    parser.add_argument("--settings", metavar="FILE", is_config_file=True, env_var="VSOCK_PROXY_SETTINGS",
                        help="file of option = value lines, read before env and command line")
    parser.add_argument("--cid", metavar="CID", type=_cid, default=VMADDR_CID_ANY, env_var="VSOCK_PROXY_CID",
                        help="local CID to listen on, or 'any' (default: any)")
    parser.add_argument("--backlog", metavar="N", type=_option(WholeNumber(1, 1 << 20), "backlog"), default=4096,
                        env_var="VSOCK_PROXY_BACKLOG",
                        help="listen backlog; vsock refuses connects past it at once "
                             "(default: 4096, capped by net.core.somaxconn)")
    parser.add_argument("--connect-timeout", metavar="SECONDS", type=_option(CONNECT_TIMEOUT, "connect-timeout"),
                        default=Defaults.connect_timeout, env_var="VSOCK_PROXY_CONNECT_TIMEOUT",
                        help="time allowed for each TCP connect attempt (default: 10)")
    parser.add_argument("--dns-ttl", metavar="SECONDS", type=_option(Seconds(zero_ok=True), "dns-ttl"), default=Options.dns_ttl,
                        env_var="VSOCK_PROXY_DNS_TTL",
                        help="the longest a DNS answer is reused: its record's TTL if shorter (at least 1 s); "
                             "0 resolves on every connection (default: 30)")
    parser.add_argument("--shutdown-grace", metavar="SECONDS", type=_option(Seconds(zero_ok=True), "shutdown-grace"),
                        default=Options.shutdown_grace,
                        env_var="VSOCK_PROXY_SHUTDOWN_GRACE",
                        help="on SIGTERM/SIGINT, how long open connections may finish (default: 30)")
    parser.add_argument("--idle-timeout", metavar="SECONDS", type=_option(IDLE_TIMEOUT, "idle-timeout"), default=Defaults.idle_timeout,
                        env_var="VSOCK_PROXY_IDLE_TIMEOUT",
                        help="close a connection after this long with no bytes either way; 0 = never (default: 0)")
    parser.add_argument("--handshake-timeout", metavar="SECONDS",
                        type=_option(HANDSHAKE_TIMEOUT, "handshake-timeout"), default=Defaults.handshake_timeout,
                        env_var="VSOCK_PROXY_HANDSHAKE_TIMEOUT",
                        help="services in modes http-connect, socks5 and sni: the time a connection has to "
                             "send its request (default: 10)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", type=_bind_address, env_var="VSOCK_PROXY_METRICS_ADDRESS",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower, env_var="VSOCK_PROXY_LOG_LEVEL",
                        help="log verbosity (default: what RUST_LOG asks of vsock_proxy, as upstream: "
                             "error, warn, info, debug or trace; else info)")
    parser.add_argument("--check", action="store_true",
                        help="check the --config file and the arguments as start-up would, then resolve and "
                             "connect to each service's target once; print one line per service and exit "
                             "0 if all pass, 1 if not (listens on nothing)")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the options; exits 2 with one line on any usage error.

    ``arguments.log_level`` is always a level; ``arguments.log_level_warning`` says
    why RUST_LOG could not be read, if it could not.
    """
    parser = build_parser()
    arguments, leftovers = parser.parse_known_args(argv)
    _take_late_positionals(parser, arguments, leftovers)
    for action in parser.value_options:
        # argparse drops a value of exactly "--" (--backlog=--, or VSOCK_PROXY_BACKLOG=--) and stores an empty list
        if getattr(arguments, action.dest, None) == []:
            parser.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
    missing = [name.upper() for name in ("local_port", "remote_addr", "remote_port")
               if getattr(arguments, name) is None]
    if missing and arguments.local_port is not None:
        parser.error(f"missing {' '.join(missing)}")
    arguments.log_level_warning = None
    if arguments.log_level is None:
        arguments.log_level, arguments.log_level_warning = level_from_rust_log(os.environ.get("RUST_LOG", ""))
    return arguments


def options_from(arguments: argparse.Namespace) -> Options:
    """The parsed arguments as config.py's Options: everything the supervisor needs but the file."""
    family = socket.AF_INET if arguments.ipv4 else socket.AF_INET6 if arguments.ipv6 else socket.AF_UNSPEC
    command_line_service = None
    if arguments.local_port is not None:
        command_line_service = ServiceEntry(arguments.local_port, arguments.remote_addr, arguments.remote_port)
    return Options(
        config_path=arguments.config,
        command_line_service=command_line_service,
        defaults=Defaults(arguments.num_workers, family, arguments.connect_timeout, arguments.idle_timeout,
                          arguments.handshake_timeout),
        dns_ttl=arguments.dns_ttl,
        shutdown_grace=arguments.shutdown_grace,
        metrics_address=arguments.metrics_address,
        processes=arguments.processes,
    )


def _take_late_positionals(parser: OneLineParser, settings: argparse.Namespace, leftovers: list[str]) -> None:
    """Give positionals that came after an option to LOCAL_PORT, REMOTE_ADDR, REMOTE_PORT, as clap would.

    argparse assigns all three optional positionals at the first run of
    positionals it meets, so in ``8000 --config F 127.0.0.1 9000`` the last two
    come back unparsed, in order, with any unknown options.
    """
    unknown = [arg for arg in leftovers if arg.startswith("-") and arg != "-"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    unfilled = [action for action in parser.positionals if getattr(settings, action.dest) is None]
    if len(leftovers) > len(unfilled):
        parser.error(f"unrecognized arguments: {' '.join(leftovers[len(unfilled):])}")
    for action, text in zip(unfilled, leftovers):
        try:
            setattr(settings, action.dest, action.type(text) if action.type else text)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {action.metavar}: {exc}")


def level_from_rust_log(spec: str) -> tuple[str, str | None]:
    """The level env_logger's ``RUST_LOG`` gives upstream's ``vsock_proxy``, and a warning if it is unreadable.

    ``info``, ``vsock_proxy=debug``, ``warn,hyper=debug``: the directive for
    vsock_proxy (or one of its modules; the most verbose) beats the global one;
    directives for other crates and ``/regex`` filters do not apply here.
    """
    directives = [part.strip() for part in spec.split("/", 1)[0].split(",") if part.strip()]
    global_level, own_levels, bad = None, [], []
    for directive in directives:
        target, sep, level = directive.partition("=")
        target, level = target.strip(), level.strip().lower()
        if not sep and target.lower() in RUST_LEVELS:
            global_level = RUST_LEVELS[target.lower()]
        elif not target or "=" in level or (sep and level not in RUST_LEVELS):
            bad.append(directive)
        elif target == RUST_TARGET or target.startswith(RUST_TARGET + "::"):
            own_levels.append(RUST_LEVELS[level] if sep else "debug")  # a bare target means trace
    if bad:
        return "info", f"RUST_LOG={spec!r} is not env_logger syntax ({', '.join(bad)}); logging at info"
    if own_levels:
        return min(own_levels, key=LOG_LEVELS.index), None
    return global_level or "info", None


def raise_fd_limit() -> None:
    """Each connection costs two sockets: use every fd the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass


def skip_greenlet_tree_tracking() -> None:
    """Greenlets skip recording who spawned them, unless $GEVENT_TRACK_GREENLET_TREE asks for it.

    That record (a ten-frame stack summary per greenlet) only serves gevent's
    debugging dumps; three greenlets per connection made it about 1.2 KiB of
    each connection's memory, and a stack walk in each spawn.
    """
    if "GEVENT_TRACK_GREENLET_TREE" not in os.environ:
        gevent.config.track_greenlet_tree = False


def main(argv: Sequence[str] | None = None, listener_factory: ListenerFactory = vsock_listener) -> int:
    """Run ``vsock-proxy``; returns the process exit status.

    ``listener_factory(port, cid=..., backlog=...)`` makes each service's listener.
    """
    arguments = parse_arguments(argv)
    configure_logging(arguments.log_level)
    if arguments.log_level_warning:
        logging.getLogger("vsockproxy").warning("%s", arguments.log_level_warning)
    if arguments.check:
        return run_check(options_from(arguments))
    raise_fd_limit()
    skip_greenlet_tree_tracking()
    listen = partial(listener_factory, cid=arguments.cid, backlog=arguments.backlog)
    options = options_from(arguments)
    try:
        if options.processes == 1:
            Supervisor(options, listen).serve()
        else:
            Workers(options, listen).serve()
    except (ConfigError, NotAllowed, ListenError, StartupError) as exc:
        print(f"{PROG}: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    return 0
