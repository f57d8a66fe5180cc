"""Logging set-up: one line per record on stderr, whatever the record quotes.

Log messages and one-line errors quote strings from outside: REMOTE_ADDR, the
YAML file's addresses, the ``--config`` path, ``VSOCK_PROXY_METRICS_ADDRESS``.
A newline in one of them would start a line that looks like the proxy's own,
so every character that ends a line for some reader (C0 and C1 controls, DEL,
U+2028, U+2029) is written as Python's repr would write it.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def one_line(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u2028``): one line, however printed."""
    return _CONTROL.sub(_escape, text)


class OneLineFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose every record, traceback included, is exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


class JournalFormatter(OneLineFormatter):
    """``<priority>message``: journald parses the syslog priority and stamps the time itself."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """systemd's documented test: $JOURNAL_STREAM names the device and inode of stderr."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure_logging(level: str) -> None:
    """One line per record on stderr: timestamped, or with a syslog priority when it goes to journald.

    Records skip the caller, thread and process look-ups that the format never shows.
    """
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: no sys._getframe() walk per record
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
