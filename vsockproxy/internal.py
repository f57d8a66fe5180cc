"""Which addresses are the parent's own: loopback, link-local (the metadata service), and the like.

An enclave that may reach "any name under a domain" must not, through a DNS answer of that
domain, reach the parent itself: its loopback services, or the instance metadata service
(169.254.169.254, fd00:ec2::254) and with it the instance's IAM credentials.  IPv6 can spell
an IPv4 address in several ways (IPv4-mapped, IPv4-compatible, NAT64, 6to4), and each one is
judged by the IPv4 address inside it.  Private ranges (10/8, 172.16/12, 192.168/16,
100.64/10, fc00::/7) are not internal: VPC interface endpoints resolve AWS names into them.
Nothing here does I/O; it is a pure function of the address.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from vsockproxy.hostnames import IPAddress

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

#: (network, what it is), checked in this order; IPv4 ones also judge the IPv4 inside an IPv6 spelling.
INTERNAL_IPV4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local: the metadata service, Amazon DNS and time service"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
)
INTERNAL_IPV6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fd00:ec2::254/128"), "the metadata service"),
    (_V6("ff00::/8"), "multicast"),
)

#: IPv6 prefixes whose addresses carry an IPv4 address, and where: (network, name, shift of the IPv4 bits).
EMBEDDING: tuple[tuple[ipaddress.IPv6Network, str, int], ...] = (
    (_V6("::ffff:0:0/96"), "IPv4-mapped", 0),
    (_V6("::/96"), "IPv4-compatible", 0),
    (_V6("64:ff9b::/96"), "NAT64", 0),
    (_V6("2002::/16"), "6to4", 80),
)


class Internal(NamedTuple):
    """Why an address is internal: the range it is in, and what that range is."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    kind: str
    embedded_in: str = ""   # "IPv4-mapped", "NAT64"...: the IPv6 spelling that carried an IPv4 address

    def __str__(self) -> str:
        where = f"{self.embedded_in} spelling of an address in " if self.embedded_in else ""
        return f"{where}{self.network} ({self.kind})"


def embedded_ipv4(address: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address spells, with the name of the spelling; None for any other address.

    ``::`` and ``::1`` lie inside the IPv4-compatible prefix but are IPv6's own unspecified and
    loopback addresses, not 0.0.0.0 and 0.0.0.1.
    """
    if address.version != 6 or int(address) <= 1:
        return None
    for network, name, shift in EMBEDDING:
        if address in network:
            return name, ipaddress.IPv4Address((int(address) >> shift) & 0xFFFFFFFF)
    return None


def internal(address: IPAddress) -> Internal | None:
    """The internal range ``address`` is in (or the one its embedded IPv4 address is in), or None."""
    if address.version == 4:
        for network, kind in INTERNAL_IPV4:
            if address in network:
                return Internal(network, kind)
        return None
    for network6, kind in INTERNAL_IPV6:
        if address in network6:
            return Internal(network6, kind)
    embedded = embedded_ipv4(address)
    if embedded is not None:
        found = internal(embedded[1])
        if found is not None:
            return found._replace(embedded_in=embedded[0])
    return None
