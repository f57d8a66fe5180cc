"""The allowlist's rules: which TCP endpoints the enclave may reach, and through which addresses.

A target ``(REMOTE_ADDR, REMOTE_PORT)`` is allowed when an entry with that
port either *names* it (same DNS name, ignoring case and one trailing dot;
same IP literal; a ``*.domain`` wildcard; a CIDR containing the literal) or,
failing that, *admits its addresses* (the entry resolves to, or its CIDR
contains, an address REMOTE_ADDR resolves to).  A target allowed only through
its addresses stays pinned to them: every connection re-resolves, and only
addresses an entry still admits are used.

Then every address a connection would try is screened, each time it is about to try them
(cached answers included, so a later DNS answer cannot slip past an earlier check): an
address of a ``deny:`` entry is never used, whatever admitted the target, and a target that
a ``*.domain`` wildcard admitted may not use an internal address (internal.py) unless that
entry says ``allow_internal: true``.  Exact names and IP or CIDR entries mean what they say,
as upstream.  A target with no address left is refused.

Reading the file that lists the rules is config.py's job; this module only matches.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

from vsockproxy.hostnames import HostError, IPAddress, canonical_host, canonical_name, host_port, parse_ip
from vsockproxy.internal import embedded_ipv4, internal
from vsockproxy.resolver import Endpoint, ResolveError, Resolver

# Which rule refused a target: metrics labels (a fixed few, never request text) and log words.
NOT_LISTED = "not-allowed"            # no entry allows it
DENIED = "denied"                     # a deny: entry matches its name or address
INTERNAL_ADDRESS = "internal-address"  # a wildcard admitted it, and it resolves to the parent's own addresses
#: How many refused addresses a message lists before it only counts the rest.
LISTED_ADDRESSES = 4


class NotAllowed(Exception):
    """The allowlist does not allow the requested target: ``rule`` says which rule refused it."""

    def __init__(self, message: str, rule: str = NOT_LISTED, allowed_by: str = "") -> None:
        super().__init__(message)
        self.rule = rule
        self.allowed_by = allowed_by  # the entry that admitted the target before a deny or internal rule refused it


@dataclass(frozen=True)
class Rule:
    """One allowlist entry, parsed into exactly one of: a name, a wildcard suffix, a network."""

    spelling: str
    ports: frozenset[int]
    name: str | None = None
    suffix: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    allow_internal: bool = False  # a wildcard's names may resolve to internal addresses

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

    def contains(self, address: IPAddress) -> bool:
        """Whether this network entry holds ``address``, or the IPv4 address an IPv6 spelling of it carries."""
        if self.network is None:
            return False
        embedded = embedded_ipv4(address)
        return address in self.network or (embedded is not None and embedded[1] in self.network)

    def __str__(self) -> str:
        return host_port(self.spelling, ",".join(str(p) for p in sorted(self.ports)))


class AddressRefusal(NamedTuple):
    """Why one resolved address may not be used: the rule (a metrics label) and the reason, for the log."""

    rule: str
    reason: str


@dataclass(frozen=True)
class Target:
    """A target the allowlist allowed, with the entries that still bound its addresses, and the deny list."""

    host: str
    port: int
    allowed_by: Rule
    pinned_to: tuple[Rule, ...] | None = None
    deny: tuple[Rule, ...] = ()

    @property
    def checks_internal(self) -> bool:
        """A wildcard admitted it: the names under it may be anyone's, so their answers are checked."""
        return self.allowed_by.suffix is not None and not self.allowed_by.allow_internal

    @property
    def screens_addresses(self) -> bool:
        """Whether any of its addresses could be refused (else looking them up early tells nothing)."""
        return self.checks_internal or any(rule.network is not None for rule in self.deny)

    def refusal(self, address: IPAddress) -> AddressRefusal | None:
        """Why ``address`` may not be used for this target, or None if it may."""
        for rule in self.deny:
            if rule.contains(address):
                return AddressRefusal(DENIED, f"deny entry {rule.spelling}")
        if self.checks_internal:
            found = internal(address)
            if found is not None:
                return AddressRefusal(INTERNAL_ADDRESS, f"internal address in {found}, and the wildcard entry "
                                                        f"{self.allowed_by} does not say allow_internal")
        return None

    def screen(self, resolver: Resolver) -> list[tuple[Endpoint, AddressRefusal | None]]:
        """The addresses the target has now, each with the reason it would be refused (None: it may be tried)."""
        return [(endpoint, self.refusal(endpoint.ip)) for endpoint in self._admitted(resolver)]

    def endpoints(self, resolver: Resolver) -> list[Endpoint]:
        """The addresses to try now: resolved afresh (or from cache), filtered if pinned, then screened.

        Raises ResolveError when there is no address, NotAllowed when every one is refused.
        """
        screened = self.screen(resolver)
        allowed = [endpoint for endpoint, refusal in screened if refusal is None]
        if allowed:
            return allowed
        refused = [f"{endpoint.ip} ({refusal.reason})" for endpoint, refusal in screened if refusal is not None]
        if len(refused) > LISTED_ADDRESSES:
            refused[LISTED_ADDRESSES:] = [f"{len(refused) - LISTED_ADDRESSES} more"]
        raise NotAllowed(f"{self} resolves only to refused addresses: {'; '.join(refused)}",
                         screened[0][1].rule, str(self.allowed_by))

    def _admitted(self, resolver: Resolver) -> list[Endpoint]:
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
    deny: tuple[Rule, ...] = ()  # the file's deny: entries (their ports unused)

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
                self._refuse_if_denied(canonical, port, str(rule))
                return Target(canonical, port, rule, deny=self.deny)
        if not by_address:
            raise NotAllowed(f"{host_port(canonical, port)} is not in the allowlist {self.source}")
        self._refuse_if_denied(canonical, port, "")  # before any look-up
        try:
            endpoints = resolver.resolve(canonical, port)
        except ResolveError as exc:
            raise NotAllowed(f"{exc}; no entry in {self.source} names {host_port(canonical, port)}") from None
        admitting = tuple(
            rule for rule in candidates if any(rule.admits(e.ip, resolver, port) for e in endpoints)
        )
        if not admitting:
            raise NotAllowed(f"{host_port(canonical, port)} is not in the allowlist {self.source}")
        return Target(canonical, port, admitting[0], admitting, self.deny)

    def _refuse_if_denied(self, host: str, port: int, allowed_by: str) -> None:
        """NotAllowed if a deny: entry names ``host`` (canonical), or holds it when it is an address."""
        address = parse_ip(host)
        for rule in self.deny:
            if rule.contains(address) if address is not None else rule.names(host):
                raise NotAllowed(f"{host_port(host, port)} is refused by the deny entry {rule.spelling} "
                                 f"of {self.source}", DENIED, allowed_by)


def rule_for(address: str, ports: frozenset[int], allow_internal: bool = False) -> Rule:
    """The rule an entry's ``address`` spells; raises HostError or ValueError for a bad one.

    ``allow_internal`` means something for a wildcard only (config.py refuses it on other entries).
    """
    if address.startswith("*."):
        return Rule(address, ports, suffix=canonical_name(address[2:]), allow_internal=allow_internal)
    if "/" in address:
        return Rule(address, ports, network=ipaddress.ip_network(address, strict=True))
    literal = parse_ip(address)
    if literal is not None:
        return Rule(address, ports, network=ipaddress.ip_network(literal))
    return Rule(address, ports, name=canonical_name(address))
