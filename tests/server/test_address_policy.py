"""The SSRF address classifier (fastllava.preprocess.addresses.is_public_address) against the IANA
special-purpose registries, written out here by hand from the registries (not from the code's own
tables), and the refusal messages, which must never name the address a host name resolved to.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from fastllava.preprocess.addresses import embedded_ipv4, is_host_name
from fastllava.preprocess.image_io import (ImageFetchError, ImageLimits, is_public_address,
                                           load_image)

# IANA IPv4 Special-Purpose Address Registry: (block, name, "Globally Reachable").
# Deprecated 192.88.99.0/24 (6to4 relay anycast, RFC 7526) has no answer there: refused.
IPV4_REGISTRY = [
    ("0.0.0.0/8", "This network", False),
    ("0.0.0.0/32", "This host on this network", False),
    ("10.0.0.0/8", "Private-Use", False),
    ("100.64.0.0/10", "Shared Address Space", False),
    ("127.0.0.0/8", "Loopback", False),
    ("169.254.0.0/16", "Link Local", False),
    ("172.16.0.0/12", "Private-Use", False),
    ("192.0.0.0/24", "IETF Protocol Assignments", False),
    ("192.0.0.0/29", "IPv4 Service Continuity Prefix", False),
    ("192.0.0.8/32", "IPv4 dummy address", False),
    ("192.0.0.9/32", "Port Control Protocol Anycast", True),
    ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", True),
    ("192.0.0.170/32", "NAT64/DNS64 Discovery", False),
    ("192.0.0.171/32", "NAT64/DNS64 Discovery", False),
    ("192.0.2.0/24", "Documentation (TEST-NET-1)", False),
    ("192.31.196.0/24", "AS112-v4", True),
    ("192.52.193.0/24", "AMT", True),
    ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", False),
    ("192.88.99.2/32", "6a44-relay anycast address", False),
    ("192.168.0.0/16", "Private-Use", False),
    ("192.175.48.0/24", "Direct Delegation AS112 Service", True),
    ("198.18.0.0/15", "Benchmarking", False),
    ("198.51.100.0/24", "Documentation (TEST-NET-2)", False),
    ("203.0.113.0/24", "Documentation (TEST-NET-3)", False),
    ("240.0.0.0/4", "Reserved", False),
    ("255.255.255.255/32", "Limited Broadcast", False),
    ("224.0.0.0/4", "Multicast (IPv4 Address Space Registry): not a unicast host", False),
]

# IANA IPv6 Special-Purpose Address Registry, plus blocks of the IPv6 Address Space registry
# that are not global unicast. None: "derived from the embedded IPv4 address" (checked below).
IPV6_REGISTRY = [
    ("::1/128", "Loopback Address", False),
    ("::/128", "Unspecified Address", False),
    ("::ffff:0:0/96", "IPv4-mapped Address", None),
    ("64:ff9b::/96", "IPv4-IPv6 Translat.", None),
    ("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local use)", False),
    ("100::/64", "Discard-Only Address Block", False),
    ("100:0:0:1::/64", "Dummy IPv6 Prefix", False),
    ("2001::/23", "IETF Protocol Assignments", False),
    ("2001::/32", "TEREDO", None),
    ("2001:1::1/128", "Port Control Protocol Anycast", True),
    ("2001:1::2/128", "Traversal Using Relays around NAT Anycast", True),
    ("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", True),
    ("2001:2::/48", "Benchmarking", False),
    ("2001:3::/32", "AMT", True),
    ("2001:4:112::/48", "AS112-v6", True),
    ("2001:10::/28", "Deprecated (previously ORCHID)", False),
    ("2001:20::/28", "ORCHIDv2", True),
    ("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", True),
    ("2001:db8::/32", "Documentation", False),
    ("2002::/16", "6to4", None),
    ("2620:4f:8000::/48", "Direct Delegation AS112 Service", True),
    ("3fff::/20", "Documentation", False),
    ("5f00::/16", "Segment Routing (SRv6) SIDs", False),
    ("fc00::/7", "Unique-Local", False),
    ("fe80::/10", "Link-Local Unicast", False),
    # IPv6 Address Space registry
    ("fec0::/10", "Deprecated site-local", False),
    ("ff00::/8", "Multicast", False),
    ("::/96", "IPv4-compatible (deprecated)", None),
    ("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)", None),
    ("4000::/3", "Reserved by IETF", False),
]


def _more_specific(net, table) -> list:
    return [n for n, _, _ in table if ipaddress.ip_network(n) != net
            and ipaddress.ip_network(n).subnet_of(net)]


def _samples(block: str, table) -> list[str]:
    """The first, a middle and the last address of `block` not inside a more specific entry."""
    net = ipaddress.ip_network(block)
    inner = [ipaddress.ip_network(n) for n in _more_specific(net, table)]
    picks = [net[0], net[net.num_addresses // 2 + 1] if net.num_addresses > 2 else net[-1],
             net[-1]]
    return [str(a) for a in picks if not any(a in n for n in inner)]


@pytest.mark.parametrize("block, name, reachable", IPV4_REGISTRY)
def test_ipv4_registry(block, name, reachable):
    for address in _samples(block, IPV4_REGISTRY):
        assert is_public_address(address) is reachable, (address, name)


@pytest.mark.parametrize("block, name, reachable", [e for e in IPV6_REGISTRY if e[2] is not None])
def test_ipv6_registry(block, name, reachable):
    for address in _samples(block, IPV6_REGISTRY):
        assert is_public_address(address) is reachable, (address, name)


# (address, the IPv4 address(es) it delivers to)
EMBEDDED = [
    ("::ffff:127.0.0.1", ["127.0.0.1"]), ("::ffff:8.8.8.8", ["8.8.8.8"]),
    ("::127.0.0.1", ["127.0.0.1"]), ("::8.8.8.8", ["8.8.8.8"]), ("::1", ["0.0.0.1"]),
    ("::ffff:0:7f00:1", ["127.0.0.1"]), ("::ffff:0:808:808", ["8.8.8.8"]),
    ("64:ff9b::7f00:1", ["127.0.0.1"]), ("64:ff9b::a00:1", ["10.0.0.1"]),
    ("64:ff9b::808:808", ["8.8.8.8"]),
    ("2002:7f00:1::1", ["127.0.0.1"]), ("2002:c0a8:101::", ["192.168.1.1"]),
    ("2002:808:808::1", ["8.8.8.8"]),
    # Teredo: server 65.54.227.120, client 192.0.2.45 stored inverted (RFC 4380 example)
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["65.54.227.120", "192.0.2.45"]),
    ("2001:0:808:808::f7f7:f7f7", ["8.8.8.8", "8.8.8.8"]),
    ("2001:0:808:808::80ff:fffe", ["8.8.8.8", "127.0.0.1"]),
]


@pytest.mark.parametrize("address, ipv4", EMBEDDED)
def test_embedded_ipv4_decides(address, ipv4):
    assert [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(address))] == ipv4
    expected = all(is_public_address(a) for a in ipv4)
    assert is_public_address(address) is expected, address


@pytest.mark.parametrize("address", [
    "::127.0.0.1", "::ffff:0:7f00:1", "64:ff9b:1::808:808", "64:ff9b:1:abcd::1", "fec0::1",
    "5f00::1", "::ffff:10.1.2.3", "fe80::1%eth0", "ff02::1", "100::1", "2001:db8::8",
    "not an address", "", "127.0.0.1 ", "0x7f000001"])
def test_issue_gaps_and_junk_are_not_public(address):
    assert not is_public_address(address)


def test_public_examples():
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::1",
                    "192.0.0.9", "2001:4:112::1"):
        assert is_public_address(address), address


def test_refusal_never_names_the_resolved_address(monkeypatch):
    """A host name that resolves to a non-public address is refused, and the message names the
    host (which the client sent) but not what it resolved to (which would map internal DNS)."""
    real = socket.getaddrinfo
    resolved = {"internal.test": "10.20.30.40", "v6.test": "fd12:3456::9abc",
                "mapped.test": "::ffff:172.16.5.4"}

    def fake(host, port, *args, **kwargs):
        if host in resolved:
            family = socket.AF_INET6 if ":" in resolved[host] else socket.AF_INET
            sockaddr = (resolved[host], port, 0, 0) if family == socket.AF_INET6 else (
                resolved[host], port)
            return [(family, socket.SOCK_STREAM, 6, "", sockaddr)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    limits = ImageLimits(allow_private_hosts=False, timeout_s=5)
    for host, address in resolved.items():
        with pytest.raises(ImageFetchError) as info:
            load_image(f"http://{host}:9/img.png", limits)
        message = str(info.value)
        assert host in message and "non-public" in message, message
        assert address not in message and address.rsplit(":", 1)[-1] not in message, message


@pytest.mark.parametrize("host, ok", [
    ("example.com", True), ("a_b.example.com.", True), ("bücher.de", True), ("127.0.0.1", True),
    ("::1", True), ("2001:db8::1", True), ("x" * 63 + ".com", True),
    ("", False), ("%00", False), ("a..b", False), ("-a.com", False), ("a-.com", False),
    ("a b", False), ("x" * 64 + ".com", False), ("a\x00b", False), (("a" * 60 + ".") * 5, False),
    ("1::2::3", False),
])
def test_is_host_name(host, ok):
    assert is_host_name(host) is ok
