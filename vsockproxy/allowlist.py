"""The allowlist's rules: which TCP endpoints the enclave may reach, and through which addresses.

A target ``(REMOTE_ADDR, REMOTE_PORT)`` is allowed when an entry with that
port either *names* it (same DNS name, ignoring case and one trailing dot;
same IP literal; a ``*.domain`` wildcard; a CIDR containing the literal) or,
failing that, *admits its addresses* (the entry resolves to, or its CIDR
contains, an address REMOTE_ADDR resolves to).  A target allowed only through
its addresses stays pinned to them: every connection re-resolves, and only
addresses an entry still admits are used.

Reading the file that lists the rules is config.py's job; this module only matches.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vsockproxy.hostnames import HostError, IPAddress, canonical_host, canonical_name, host_port, parse_ip
from vsockproxy.resolver import Endpoint, ResolveError, Resolver


class NotAllowed(Exception):
    """The allowlist does not allow the requested target."""


@dataclass(frozen=True)
class Rule:
    """One allowlist entry, parsed into exactly one of: a name, a wildcard suffix, a network."""

    spelling: str
    ports: frozenset[int]
    name: str | None = None
    suffix: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def names(self, host: str) -> bool:
        """Whether this entry allows ``host`` (canonical) by its spelling alone."""
        if self.network is not None:
            address = parse_ip(host)
            return address is not None and address in self.network
        if self.suffix is not None:
            return host.endswith("." + self.suffix)
        return host == self.name

    def admits(self, address: IPAddress, resolver: Resolver, port: int) -> bool:
        """Whether ``address`` is one this entry stands for; name entries are resolved."""
        if self.network is not None:
            return address in self.network
        if self.name is None:
            return False
        try:
            return any(endpoint.ip == address for endpoint in resolver.resolve(self.name, port))
        except ResolveError:
            return False

    def __str__(self) -> str:
        return host_port(self.spelling, ",".join(str(p) for p in sorted(self.ports)))


@dataclass(frozen=True)
class Target:
    """A target the allowlist allowed, with the entries that still bound its addresses."""

    host: str
    port: int
    allowed_by: Rule
    pinned_to: tuple[Rule, ...] | None = None

    def endpoints(self, resolver: Resolver) -> list[Endpoint]:
        """The addresses to try now: resolved afresh (or from cache) and, if pinned, filtered."""
        endpoints = resolver.resolve(self.host, self.port)
        if self.pinned_to is None:
            return endpoints
        allowed = [e for e in endpoints if any(r.admits(e.ip, resolver, self.port) for r in self.pinned_to)]
        if not allowed:
            found = ", ".join(str(e.ip) for e in endpoints)
            raise ResolveError(f"{self.host} now resolves to {found}, which no allowlist entry admits")
        return allowed

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True)
class Allowlist:
    """The parsed entries of one allowlist file."""

    rules: tuple[Rule, ...]
    source: str

    def authorize(self, host: str, port: int, resolver: Resolver, by_address: bool = True) -> Target:
        """The allowed Target for ``host:port``, or NotAllowed saying why not.

        ``by_address=False`` refuses a name that no entry names without looking it up:
        a request from an enclave must not make the parent send DNS queries for names
        of its choosing (a channel out of the enclave).
        """
        try:
            canonical = canonical_host(host)
        except HostError as exc:
            raise NotAllowed(f"remote address {exc}") from None
        if parse_ip(canonical) is not None:
            try:
                resolver.resolve(canonical, port)  # no DNS: checks the -4/-6 choice
            except ResolveError as exc:
                raise NotAllowed(str(exc)) from None
        candidates = [rule for rule in self.rules if port in rule.ports]
        if not candidates:
            raise NotAllowed(f"{host_port(canonical, port)} is not allowed: {self.source} has no entry for port {port}")
        for rule in candidates:
            if rule.names(canonical):
                return Target(canonical, port, rule)
        if not by_address:
            raise NotAllowed(f"{host_port(canonical, port)} is not in the allowlist {self.source}")
        try:
            endpoints = resolver.resolve(canonical, port)
        except ResolveError as exc:
            raise NotAllowed(f"{exc}; no entry in {self.source} names {host_port(canonical, port)}") from None
        admitting = tuple(
            rule for rule in candidates if any(rule.admits(e.ip, resolver, port) for e in endpoints)
        )
        if not admitting:
            raise NotAllowed(f"{host_port(canonical, port)} is not in the allowlist {self.source}")
        return Target(canonical, port, admitting[0], admitting)


def rule_for(address: str, ports: frozenset[int]) -> Rule:
    """The rule an entry's ``address`` spells; raises HostError or ValueError for a bad one."""
    if address.startswith("*."):
        return Rule(address, ports, suffix=canonical_name(address[2:]))
    if "/" in address:
        return Rule(address, ports, network=ipaddress.ip_network(address, strict=True))
    literal = parse_ip(address)
    if literal is not None:
        return Rule(address, ports, network=ipaddress.ip_network(literal))
    return Rule(address, ports, name=canonical_name(address))
