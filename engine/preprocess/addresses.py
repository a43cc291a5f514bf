"""Which IP addresses a server may connect to on a client's behalf (image fetches, webhooks).

`is_public_address(a)` is True only for a globally reachable unicast address. The decision is
made from explicit tables of the IANA IPv4 and IPv6 Special-Purpose Address Registries (not from
`ipaddress.is_global`, whose answers differ between Python releases), most specific entry first,
so e.g. 192.0.0.9/32 (globally reachable) wins over 192.0.0.0/24 (not).

IPv6 addresses that carry an IPv4 address a dual-stack host, a tunnel or a translator may deliver
to are decided by that IPv4 address (all of them, where there are several):

    ::a.b.c.d               IPv4-compatible (RFC 4291, deprecated; :: and ::1 embed 0.0.0.0/1)
    ::ffff:a.b.c.d          IPv4-mapped     (RFC 4291)
    ::ffff:0:a.b.c.d        IPv4-translated (RFC 2765 / 6145)
    64:ff9b::a.b.c.d        NAT64 well-known prefix (RFC 6052)
    2002:AABB:CCDD::/48     6to4 (RFC 3056): the IPv4 address in bits 16-47
    2001:0:SSSS:SSSS:…:CCCC:CCCC  Teredo (RFC 4380): server IPv4 in bits 32-63, client IPv4
                            (bit-inverted) in bits 96-127

The local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215) goes to a site's own translator, so it is
never public whatever it embeds. Other IPv6 addresses are public only inside 2000::/3, the only
block IANA allocates as global unicast: that refuses 5f00::/16 (SRv6 SIDs), fec0::/10
(deprecated site-local), fc00::/7, fe80::/10, ff00::/8, 100::/64 and the rest of ::/8 at once.
IPv4 multicast (224.0.0.0/4, not in the special-purpose registry) is refused too: only unicast
hosts are fetched from.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["is_public_address", "embedded_ipv4", "is_host_name"]

# A DNS label as resolvers take it (underscores too: they occur in real host names).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

_V4, _V6 = ipaddress.IPv4Network, ipaddress.IPv6Network

# (block, globally reachable), from the IANA IPv4 Special-Purpose Address Registry; deprecated
# entries without a "globally reachable" answer are refused.
IPV4_SPECIAL: tuple[tuple[_V4, bool], ...] = tuple((_V4(net), ok) for net, ok in (
    ("0.0.0.0/8", False), ("0.0.0.0/32", False), ("10.0.0.0/8", False),
    ("100.64.0.0/10", False), ("127.0.0.0/8", False), ("169.254.0.0/16", False),
    ("172.16.0.0/12", False), ("192.0.0.0/24", False), ("192.0.0.0/29", False),
    ("192.0.0.8/32", False), ("192.0.0.9/32", True), ("192.0.0.10/32", True),
    ("192.0.0.170/32", False), ("192.0.0.171/32", False), ("192.0.2.0/24", False),
    ("192.31.196.0/24", True), ("192.52.193.0/24", True), ("192.88.99.0/24", False),
    ("192.88.99.2/32", False), ("192.168.0.0/16", False), ("192.175.48.0/24", True),
    ("198.18.0.0/15", False), ("198.51.100.0/24", False), ("203.0.113.0/24", False),
    ("240.0.0.0/4", False), ("255.255.255.255/32", False),
    ("224.0.0.0/4", False),  # multicast (IPv4 Address Space Registry)
))

# The IANA IPv6 Special-Purpose Address Registry entries inside 2000::/3 (everything outside it
# is refused, see above; the IPv4-embedding blocks are decided before this table is used).
IPV6_SPECIAL: tuple[tuple[_V6, bool], ...] = tuple((_V6(net), ok) for net, ok in (
    ("2001::/23", False), ("2001:1::1/128", True), ("2001:1::2/128", True),
    ("2001:1::3/128", True), ("2001:2::/48", False), ("2001:3::/32", True),
    ("2001:4:112::/48", True), ("2001:10::/28", False), ("2001:20::/28", True),
    ("2001:30::/28", True), ("2001:db8::/32", False), ("2620:4f:8000::/48", True),
    ("3fff::/20", False),
))
GLOBAL_UNICAST = _V6("2000::/3")
LOCAL_NAT64 = _V6("64:ff9b:1::/48")
_LOW32_PREFIXES = tuple(_V6(n) for n in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96",
                                         "64:ff9b::/96"))
_SIXTOFOUR, _TEREDO = _V6("2002::/16"), _V6("2001::/32")


def _most_specific(ip, table, default: bool) -> bool:
    matches = [(net.prefixlen, ok) for net, ok in table if ip in net]
    return max(matches)[1] if matches else default


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 address(es) `ip` delivers to (see the module doc), or None if it embeds none."""
    value = int(ip)
    if any(ip in net for net in _LOW32_PREFIXES):
        return [ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    if ip in _SIXTOFOUR:
        return [ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF)]
    if ip in _TEREDO:
        return [ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF),
                ipaddress.IPv4Address(~value & 0xFFFFFFFF)]
    return None


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    return _most_specific(ip, IPV4_SPECIAL, True)


def is_public_address(address: str) -> bool:
    """True for a globally reachable unicast IP (text form; an IPv6 zone id is ignored, and
    anything that is not an IP address is not public)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 4:
        return _public_v4(ip)
    if ip in LOCAL_NAT64:
        return False
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        return all(_public_v4(v4) for v4 in embedded)
    return ip in GLOBAL_UNICAST and _most_specific(ip, IPV6_SPECIAL, True)


def is_host_name(host: str) -> bool:
    """Whether `host` (a URL's hostname, brackets stripped) can name a server: an IP address, or
    a DNS name whose IDNA form is dot-separated labels of letters, digits, '-' and '_' (at most
    253 characters; one trailing dot allowed). Refuses what urlsplit passes through but no
    resolver can use: '%00', spaces, empty labels ('a..b')."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
            return True
        except ValueError:
            return False
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(x) for x in name.split("."))
