"""vsockproxy.hostnames: one strict spelling for every host the allowlist compares."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from vsockproxy.hostnames import HostError, canonical_host, canonical_name, parse_ip


@pytest.mark.parametrize("text, canonical", [
    ("127.0.0.1", "127.0.0.1"),
    ("10.1.2.3", "10.1.2.3"),
    ("0.0.0.0", "0.0.0.0"),
    ("255.255.255.255", "255.255.255.255"),
    ("::1", "::1"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("0:0::1", "::1"),
    ("2001:DB8::0001", "2001:db8::1"),
    ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
])
def test_ip_literals_come_back_canonical(text, canonical):
    assert canonical_host(text) == canonical
    assert parse_ip(text) == ipaddress.ip_address(canonical)


@pytest.mark.parametrize("text, canonical", [
    ("kms.us-east-1.amazonaws.com", "kms.us-east-1.amazonaws.com"),
    ("KMS.US-East-1.AmazonAWS.com", "kms.us-east-1.amazonaws.com"),
    ("kms.us-east-1.amazonaws.com.", "kms.us-east-1.amazonaws.com"),
    ("Example.COM.", "example.com"),
    ("localhost", "localhost"),
    ("_dmarc.example.com", "_dmarc.example.com"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("1e100.net", "1e100.net"),
    ("123.example.com", "123.example.com"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
])
def test_names_are_lower_cased_without_one_trailing_dot(text, canonical):
    assert canonical_host(text) == canonical
    assert canonical_name(text) == canonical
    assert parse_ip(text) is None


def test_longest_allowed_name_is_253_characters():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    assert canonical_name(name) == name
    assert canonical_name(name + ".") == name
    with pytest.raises(HostError, match="253"):
        canonical_name(name + "b")


@pytest.mark.parametrize("text", [
    "2130706433",          # 127.0.0.1 as one decimal number
    "0177.0.0.1",          # octal first octet
    "0x7f.1",              # hex + short form
    "0x7f.0.0.1",
    "127.1",               # short form
    "127.0.1",
    "010.0.0.1",           # leading zero: octal to inet_aton
    "1.2.3.4.5",
    "00",
    "443",
])
def test_loose_numeric_spellings_are_refused(text):
    with pytest.raises(HostError):
        canonical_host(text)


@pytest.mark.parametrize("text", [
    "0x7f000001",          # inet_aton and glibc getaddrinfo read this as 127.0.0.1
    "0X7F000001",
    "127.0.0.0x1",         # so is this: the last part is hex, not a TLD
    "0x7f.0.0.0x1",
])
def test_hex_ipv4_spellings_are_refused(text):
    """Spellings the system resolver turns into an IPv4 address must not pass as DNS names.

    The module promises that every accepted host has exactly one meaning; glibc's
    getaddrinfo() resolves these (via inet_aton) to 127.0.0.1 without any DNS query.
    """
    with pytest.raises(HostError):
        canonical_host(text)


@pytest.mark.parametrize("text", [
    "",
    ".",
    "..",
    "a..b",
    ".example.com",
    "example.com..",
    "-example.com",
    "example-.com",
    "exa mple.com",
    "example.com/path",
    "example.com:443",
    "[::1]",
    "user@example.com",
    " 127.0.0.1",
    "127.0.0.1 ",
    "example.com\n",
    "a" * 64 + ".com",
])
def test_malformed_names_are_refused(text):
    with pytest.raises(HostError):
        canonical_host(text)


@pytest.mark.parametrize("text", [
    "bücher.example",
    "exаmple.com",   # Cyrillic 'а'
    "例え.jp",
    "ｅxample.com",  # full-width 'e'
])
def test_non_ascii_names_are_refused(text):
    with pytest.raises(HostError, match="ASCII"):
        canonical_host(text)


def test_over_long_names_are_refused():
    too_long = ".".join(["a" * 60] * 5)
    assert len(too_long) > 253
    with pytest.raises(HostError):
        canonical_host(too_long)


@pytest.mark.parametrize("value", [None, 127, b"example.com"])
def test_non_strings_are_refused(value):
    with pytest.raises(HostError):
        canonical_host(value)


def test_host_error_is_a_value_error():
    assert issubclass(HostError, ValueError)


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses())
def test_every_ip_canonicalises_to_its_compressed_form(address):
    assert canonical_host(str(address)) == str(address)
    assert canonical_host(address.exploded) == str(address)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=30))
def test_accepted_spellings_are_fixed_points(text):
    """Whatever is accepted is canonical already: canonicalising again changes nothing."""
    try:
        canonical = canonical_host(text)
    except HostError:
        return
    assert canonical_host(canonical) == canonical
    assert canonical == canonical.lower()
    assert not canonical.endswith(".")


_PART = st.one_of(
    st.integers(0, 2**32 - 1).map(str),
    st.integers(0, 2**32 - 1).map(lambda n: "0" + oct(n)[2:]),
    st.integers(0, 2**32 - 1).map(hex),
    st.integers(0, 255).map(lambda n: hex(n).upper().replace("0X", "0x")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PART, min_size=1, max_size=4).map(".".join))
def test_nothing_inet_aton_reads_as_an_address_passes_as_a_name(text):
    """If the system would read ``text`` as an IPv4 address, it is either that address's canonical
    spelling or refused: never accepted as a DNS name."""
    import socket

    try:
        packed = socket.inet_aton(text)
    except OSError:
        return
    try:
        accepted = canonical_host(text)
    except HostError:
        return
    assert accepted == socket.inet_ntoa(packed), f"{text!r} accepted as the name {accepted!r}"
