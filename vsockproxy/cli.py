"""The ``vsock-proxy`` command: upstream's CLI, plus env-var and settings-file overrides.

Every option may come from the command line, a ``VSOCK_PROXY_*`` environment
variable or a ``--settings`` file, in that order of precedence.  Every failure
before serving is one line on stderr and a non-zero exit: 2 for usage errors,
1 for configuration, allowlist and listener errors.
"""

from __future__ import annotations

import argparse
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
from vsockproxy.config import (CONNECT_TIMEOUT, DEFAULT_PATH, IDLE_TIMEOUT, NUM_WORKERS, TCP_PORT, VSOCK_PORT,
                               ConfigError, Defaults, Options, Seconds, ServiceEntry, WholeNumber,
                               parse_bind_address)
from vsockproxy.listen import VMADDR_CID_ANY, ListenError, vsock_listener
from vsockproxy.logs import configure_logging, one_line
from vsockproxy.supervisor import StartupError, Supervisor

PROG = "vsock-proxy"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Makes a listening socket for a vsock port; the CLI binds --cid and --backlog.  Tests and
#: benchmarks pass one that listens on TCP instead: the rest of the product runs unchanged.
ListenerFactory = Callable[..., socket.socket]


class OneLineParser(configargparse.ArgumentParser):
    """argparse prints usage plus the error; operators and scripts want just the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {one_line(message)} (see {PROG} --help)\n")


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
        config_file_parser_class=configargparse.DefaultConfigFileParser,
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
                        help="connections served at once; more wait in the listen backlog (default: 4)")
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
                        help="how long a DNS answer is reused; 0 resolves on every connection (default: 30)")
    parser.add_argument("--shutdown-grace", metavar="SECONDS", type=_option(Seconds(zero_ok=True), "shutdown-grace"),
                        default=Options.shutdown_grace,
                        env_var="VSOCK_PROXY_SHUTDOWN_GRACE",
                        help="on SIGTERM/SIGINT, how long open connections may finish (default: 30)")
    parser.add_argument("--idle-timeout", metavar="SECONDS", type=_option(IDLE_TIMEOUT, "idle-timeout"), default=Defaults.idle_timeout,
                        env_var="VSOCK_PROXY_IDLE_TIMEOUT",
                        help="close a connection after this long with no bytes either way; 0 = never (default: 0)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", type=_bind_address, env_var="VSOCK_PROXY_METRICS_ADDRESS",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", type=str.lower,
                        env_var="VSOCK_PROXY_LOG_LEVEL", help="log verbosity (default: info)")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the options; exits 2 with one line on any usage error."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    missing = [name.upper() for name in ("local_port", "remote_addr", "remote_port")
               if getattr(arguments, name) is None]
    if missing and arguments.local_port is not None:
        parser.error(f"missing {' '.join(missing)}")
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
        defaults=Defaults(arguments.num_workers, family, arguments.connect_timeout, arguments.idle_timeout),
        dns_ttl=arguments.dns_ttl,
        shutdown_grace=arguments.shutdown_grace,
        metrics_address=arguments.metrics_address,
    )


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
    raise_fd_limit()
    skip_greenlet_tree_tracking()
    listen = partial(listener_factory, cid=arguments.cid, backlog=arguments.backlog)
    try:
        Supervisor(options_from(arguments), listen).serve()
    except (ConfigError, NotAllowed, ListenError, StartupError) as exc:
        print(f"{PROG}: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    return 0
