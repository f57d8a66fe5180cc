"""Loads the config file in a forked child process, so that a reload never stalls open connections.

Parsing and checking the YAML file is pure CPU work that holds the GIL (PyYAML releases it
nowhere), so neither the event loop nor a thread can do it without stopping every relay for
as long as it takes.  A child process runs the very ``load_file()`` that start-up runs,
sends back the pickled FileConfig or the ConfigError's message, and exits; the parent waits
on the pipe cooperatively.  A child that dies, or takes longer than the deadline (it is then
killed), becomes one ConfigError line like any other fault of the file.
"""

from __future__ import annotations

import os
import pickle
import signal
from typing import Iterable, NoReturn

import gevent
import gevent.os

from vsockproxy.config import ConfigError, FileConfig, load_file

#: How long the child may take.  The bounds in config.py keep a file to about a second of
#: native CPU; emulated machines (such as the TCG test VM) are some 30 times slower.
LOAD_DEADLINE = 120.0

#: Signals that the parent handles; the child takes the default action (so that it ends with a
#: `systemctl stop` that signals the whole control group, instead of running the parent's handlers).
_PARENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def load_file_in_child(path: str, deadline: float = LOAD_DEADLINE) -> FileConfig:
    """``load_file(path)``, run in a child process while this greenlet waits; raises ConfigError."""
    try:
        read_fd, write_fd = os.pipe()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot start the loader process: {exc.strerror or exc}") from None
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise ConfigError(f"{path}: cannot start the loader process: {exc.strerror or exc}") from None
    if pid == 0:
        _child(path, read_fd, write_fd)
    os.close(write_fd)
    reply = None
    try:
        gevent.os.make_nonblocking(read_fd)
        with gevent.Timeout(deadline, False):
            reply = _read_to_end(read_fd)
    finally:
        os.close(read_fd)
        status = reap(pid, kill=reply is None)
    if reply is None:
        raise ConfigError(f"{path}: loading took longer than {deadline:g}s; the loader process was stopped")
    try:
        result = pickle.loads(reply)
    except Exception:  # a reply cut short: the child died while writing it
        raise ConfigError(f"{path}: cannot load: the loader process {_describe(status)}") from None
    if isinstance(result, str):
        raise ConfigError(result)
    return result


def _child(path: str, read_fd: int, write_fd: int) -> NoReturn:
    """Load, write the reply, exit; never returns into the parent's event loop."""
    code = 1
    try:
        os.close(read_fd)
        close_inherited_fds([write_fd])
        for signum in _PARENT_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        try:
            result: FileConfig | str = load_file(path)
        except ConfigError as exc:
            result = str(exc)
        reply = memoryview(pickle.dumps(result, pickle.HIGHEST_PROTOCOL))
        while reply:
            reply = reply[os.write(write_fd, reply):]
        code = 0
    finally:
        os._exit(code)


def close_inherited_fds(keep: Iterable[int]) -> None:
    """Close the parent's descriptors in a forked child, all but ``keep`` (and 0-2): a connection the
    parent closes must end at once, not when the child exits.  Without /proc they stay open (until
    the child exits), nothing worse."""
    keep = set(keep)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own directory fd, already closed
                pass


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = gevent.os.nb_read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def reap(pid: int, kill: bool = False) -> int | None:
    """Collect the child's exit status without blocking the loop, killing it first if asked.

    None when there is no status to collect: SIGCHLD was ignored by whoever started the proxy
    (that is inherited), so the kernel reaped the child itself.
    """
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)  # not waited for yet, so the pid is still the child's
        except ProcessLookupError:  # gone already, reaped by the kernel
            pass
    delay = 0.001
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        gevent.sleep(delay)
        delay = min(delay * 2, 0.1)


def _describe(status: int | None) -> str:
    if status is None:
        return "ended without an answer"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"was killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)} without an answer"
