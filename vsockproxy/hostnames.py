"""One strict spelling check for every host name or address the proxy accepts.

The allowlist is a security gate, so a host is taken only in a form that has
exactly one meaning: a canonical IP literal, or an ASCII DNS name.  Spellings
that resolvers interpret loosely (``2130706433``, ``0177.0.0.1``, ``127.1``,
bare numbers that search domains may expand, non-ASCII look-alikes) are refused
instead of being guessed at.
"""

from __future__ import annotations

import ipaddress
import re
import reprlib
import socket
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 40, 40

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")
_NUMERIC = re.compile(r"[0-9]+\Z")


class HostError(ValueError):
    """The text is neither a canonical IP address nor a valid DNS name."""


def short_repr(value: object) -> str:
    """``repr`` cut to a line's worth, however large or deeply aliased the value is."""
    return _SHORT.repr(value)


def parse_ip(text: str) -> IPAddress | None:
    """The address ``text`` spells in canonical form, or None if it is not an IP literal.

    IPv6 zone indexes (``fe80::1%eth0``) are not taken: they name an interface
    of this machine, which an allowlist cannot vouch for.
    """
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def canonical_name(text: str) -> str:
    """Lower-case ``text`` and drop one trailing dot, so equal DNS names compare equal.

    Raises HostError for anything that is not a plain ASCII host name.
    """
    if not isinstance(text, str) or not text:
        raise HostError("empty host name")
    if not text.isascii():
        raise HostError(f"{short_repr(text)} is not an ASCII DNS name (write IDNs in their xn-- form)")
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253:
        raise HostError(f"{short_repr(text)} is longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise HostError(f"{short_repr(text)} is not a valid DNS name")
    if _NUMERIC.match(labels[-1]) or _inet_aton_reads(name):
        raise HostError(f"{short_repr(text)} is neither a canonical IP address nor a DNS name")
    return name


def _inet_aton_reads(name: str) -> bool:
    """Whether the C library would read ``name`` as an IPv4 address (``0x7f000001``) without DNS."""
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True


def canonical_host(text: str) -> str:
    """The single spelling under which ``text`` is compared and resolved.

    IP literals come back compressed (``0:0::1`` becomes ``::1``); names come
    back as :func:`canonical_name` spells them.
    """
    address = parse_ip(text) if isinstance(text, str) else None
    if address is not None:
        return str(address)
    return canonical_name(text)


def host_port(host: str, port: object) -> str:
    """``host:port``, with IPv6 addresses in brackets so the port stays readable."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
