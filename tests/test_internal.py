"""vsockproxy.internal: the parent's own addresses, in every spelling IPv6 has for them (issue 19, rule 1).

The table names each range with an address inside, its edges and its neighbours; the
property tests (hypothesis, derandomized as tests/fuzzing.py sets it) check the classifier
against an oracle built from ``ipaddress``'s own properties, over IPv4 addresses and each of
their IPv6 spellings: IPv4-mapped, IPv4-compatible, NAT64 and 6to4.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import fuzz_settings, run_counted as run_counted_cases
from vsockproxy.internal import embedded_ipv4, internal

pytestmark = pytest.mark.timeout(120)

FUZZ_CASES = {
    "ipv4_and_its_spellings": 3000,   # an IPv4 address, biased to the ranges' edges, in all five spellings
    "ipv6": 2000,                     # IPv6 addresses, biased to the internal and embedding prefixes
}
CASES_RUN: dict[str, int] = {}


def run_counted(name: str, inner) -> None:
    run_counted_cases(name, inner, FUZZ_CASES, CASES_RUN)


ip = ipaddress.ip_address

# (address, the range named, what it is)
INTERNAL = [
    ("127.0.0.1", "127.0.0.0/8", "loopback"),
    ("127.255.255.255", "127.0.0.0/8", "loopback"),
    ("169.254.169.254", "169.254.0.0/16", "metadata service"),    # the instance metadata service
    ("169.254.169.253", "169.254.0.0/16", "Amazon DNS"),          # the Amazon DNS server
    ("169.254.169.123", "169.254.0.0/16", "time service"),        # the Amazon Time Sync Service
    ("169.254.0.0", "169.254.0.0/16", "link-local"),
    ("0.0.0.0", "0.0.0.0/8", "unspecified"),
    ("0.255.255.255", "0.0.0.0/8", "unspecified"),
    ("224.0.0.1", "224.0.0.0/4", "multicast"),
    ("239.255.255.255", "224.0.0.0/4", "multicast"),
    ("255.255.255.255", "255.255.255.255/32", "broadcast"),
    ("::1", "::1/128", "loopback"),
    ("::", "::/128", "unspecified"),
    ("fe80::1", "fe80::/10", "link-local"),
    ("febf:ffff::1", "fe80::/10", "link-local"),
    ("fd00:ec2::254", "fd00:ec2::254/128", "metadata service"),
    ("ff02::1", "ff00::/8", "multicast"),
    ("ff05::1:3", "ff00::/8", "multicast"),
]

# Neither internal nor embedding an internal address: private ranges are the VPC's, not the parent's.
NOT_INTERNAL = ["10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1",
                "100.127.255.255", "1.0.0.0", "126.255.255.255", "128.0.0.0", "169.253.255.255", "169.255.0.0",
                "223.255.255.255", "240.0.0.0", "255.255.255.254", "192.0.2.1", "8.8.8.8",
                "fc00::1", "fd00::1", "fd00:ec2::253", "fd00:ec2::255", "fd00:ec2::1:254", "fe7f:ffff::1", "fec0::1",
                "2001:db8::1", "::2:0:0", "::fffe:7f00:1", "64:ff9b::a00:1", "2002:a00:1::1",
                "::ffff:10.0.0.1", "::10.0.0.1"]


def spellings(address: ipaddress.IPv4Address) -> dict[str, ipaddress.IPv6Address]:
    """The IPv6 addresses that carry ``address``, by the name of the spelling."""
    value = int(address)
    return {
        "IPv4-mapped": ipaddress.IPv6Address((0xFFFF << 32) | value),
        "IPv4-compatible": ipaddress.IPv6Address(value),
        "NAT64": ipaddress.IPv6Address((0x64FF9B << 96) | value),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 0x1),
    }


@pytest.mark.parametrize("address, network, kind", INTERNAL, ids=[row[0] for row in INTERNAL])
def test_each_internal_range_is_named(address, network, kind):
    found = internal(ip(address))
    assert found is not None and str(found.network) == network and kind in found.kind, found
    assert found.embedded_in == ""
    assert str(found).startswith(network), str(found)


@pytest.mark.parametrize("address", NOT_INTERNAL)
def test_private_public_and_neighbouring_addresses_are_not_internal(address):
    assert internal(ip(address)) is None


V4_INTERNAL = [row for row in INTERNAL if ":" not in row[0] and row[0] not in ("0.0.0.0", "0.0.0.1")]


@pytest.mark.parametrize("spelling", ["IPv4-mapped", "IPv4-compatible", "NAT64", "6to4"])
@pytest.mark.parametrize("address, network, kind", V4_INTERNAL, ids=[row[0] for row in V4_INTERNAL])
def test_every_ipv6_spelling_of_an_internal_ipv4_address_is_internal(spelling, address, network, kind):
    v6 = spellings(ip(address))[spelling]
    found = internal(v6)
    assert found is not None, v6
    assert (str(found.network), found.embedded_in) == (network, spelling), (v6, found)
    assert str(found) == f"{spelling} spelling of an address in {network} ({found.kind})"


@pytest.mark.parametrize("text, spelling, inside", [
    ("::ffff:127.0.0.1", "IPv4-mapped", "127.0.0.1"),
    ("::FFFF:A9FE:A9FE", "IPv4-mapped", "169.254.169.254"),
    ("0:0:0:0:0:ffff:7f00:1", "IPv4-mapped", "127.0.0.1"),
    ("::127.0.0.1", "IPv4-compatible", "127.0.0.1"),
    ("::169.254.169.254", "IPv4-compatible", "169.254.169.254"),
    ("64:ff9b::127.0.0.1", "NAT64", "127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64", "169.254.169.254"),
    ("2002:7f00:1::", "6to4", "127.0.0.1"),
    ("2002:a9fe:a9fe:1234:5678::9", "6to4", "169.254.169.254"),
])
def test_written_spellings_embed_the_ipv4_address_they_show(text, spelling, inside):
    assert embedded_ipv4(ip(text)) == (spelling, ip(inside))
    assert internal(ip(text)).embedded_in == spelling


@pytest.mark.parametrize("text", ["::", "::1", "127.0.0.1", "2001:db8::1", "fe80::1"])
def test_ipv6_own_addresses_and_ipv4_embed_nothing(text):
    assert embedded_ipv4(ip(text)) is None


# --------------------------------------------------------------------------- properties

def oracle4(address: ipaddress.IPv4Address) -> bool:
    """Internal, by ipaddress's own properties (an implementation apart from internal.py's table)."""
    return (address.is_loopback or address.is_link_local or address.is_multicast
            or int(address) >> 24 == 0 or int(address) == 0xFFFFFFFF)


def oracle6(address: ipaddress.IPv6Address) -> bool:
    value = int(address)
    if address.is_loopback or address.is_unspecified or address.is_link_local or address.is_multicast:
        return True
    if address == ip("fd00:ec2::254"):
        return True
    carried = [address.ipv4_mapped, address.sixtofour]
    if value >> 32 == 0x64FF9B << 64 or value >> 32 == 0:  # NAT64, IPv4-compatible
        carried.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    return any(v4 is not None and oracle4(v4) for v4 in carried)


EDGES4 = [0, 0x00FFFFFF, 0x01000000, 0x7EFFFFFF, 0x7F000000, 0x7FFFFFFF, 0x80000000, 0xA9FDFFFF, 0xA9FE0000,
          0xA9FEA9FE, 0xA9FEFFFF, 0xA9FF0000, 0xDFFFFFFF, 0xE0000000, 0xEFFFFFFF, 0xF0000000, 0xFFFFFFFE,
          0xFFFFFFFF, 0x0A000001, 0xAC100001, 0xC0A80001, 0x64400001]
ipv4_values = st.one_of(
    st.sampled_from(EDGES4),
    st.sampled_from(EDGES4).flatmap(lambda edge: st.integers(max(0, edge - 3), min(0xFFFFFFFF, edge + 3))),
    st.sampled_from([0x00, 0x7F, 0xA9, 0xE0, 0xEF, 0xFF]).flatmap(
        lambda first: st.integers(first << 24, (first << 24) | 0xFFFFFF)),
    st.integers(0, 0xFFFFFFFF),
)


def test_fuzz_every_spelling_of_an_ipv4_address_is_judged_as_the_address():
    @fuzz_settings(FUZZ_CASES["ipv4_and_its_spellings"])
    @given(ipv4_values)
    def inner(value):
        CASES_RUN["ipv4_and_its_spellings"] += 1
        address = ipaddress.IPv4Address(value)
        expected = oracle4(address)
        found = internal(address)
        assert (found is not None) == expected, (address, found)
        for name, v6 in spellings(address).items():
            if int(v6) <= 1:  # :: and ::1 are IPv6's own unspecified and loopback addresses
                assert internal(v6) is not None and internal(v6).embedded_in == ""
                continue
            carried = internal(v6)
            assert embedded_ipv4(v6) == (name, address), (v6, embedded_ipv4(v6))
            assert (carried is not None) == expected, (name, v6, carried)
            if expected:
                assert (carried.network, carried.embedded_in) == (found.network, name)

    run_counted("ipv4_and_its_spellings", inner)


PREFIXES6 = [(0, 96), (0xFFFF << 32, 96), (0x64FF9B << 96, 96), (0x2002 << 112, 16), (0xFE80 << 112, 10),
             (0xFF00 << 112, 8), (0xFD00_0EC2 << 96, 32), (0xFC00 << 112, 7), (0x64FF9B0001 << 80, 48),
             (0x2001_0DB8 << 96, 32), (0, 0)]


@st.composite
def ipv6_values(draw) -> int:
    prefix, length = draw(st.sampled_from(PREFIXES6))
    host_bits = 128 - length
    low = draw(st.one_of(st.integers(0, (1 << host_bits) - 1),
                         st.sampled_from(EDGES4).map(lambda v4: v4 & ((1 << host_bits) - 1)),
                         st.sampled_from(EDGES4).map(lambda v4: (v4 << 80) & ((1 << host_bits) - 1))))
    return prefix | low


def test_fuzz_ipv6_addresses_agree_with_the_oracle():
    @fuzz_settings(FUZZ_CASES["ipv6"])
    @given(ipv6_values())
    def inner(value):
        CASES_RUN["ipv6"] += 1
        address = ipaddress.IPv6Address(value)
        assert (internal(address) is not None) == oracle6(address), (address, internal(address))

    run_counted("ipv6", inner)
