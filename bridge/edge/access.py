"""Where a request comes from, and whether that source may call at all.

The source is the TCP peer, unless the peer is one of `TRUSTED_PROXIES`: then
`X-Forwarded-For` is read from the right (the hop nearest to us) past every
trusted proxy, and the first address that is not one is the source. Anyone else's
`X-Forwarded-For` is ignored, so a client cannot choose its own source address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from aiohttp import web

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
FORWARDED_FOR = "X-Forwarded-For"


@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> IPAddress | None:
    """An address as a proxy writes it (IPv4-mapped IPv6 as IPv4), or None if it is not one.

    Cached: it runs on every request, and the same few peers (an ingress, Luma's senders)
    send them all; addresses are immutable.
    """
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class SourcePolicy:
    """Resolves a request's source address and checks it against the allow-list."""

    def __init__(
        self, *, allowed: Iterable[IPNetwork] = (), trusted_proxies: Iterable[IPNetwork] = ()
    ) -> None:
        self._allowed = tuple(allowed)
        self._trusted = tuple(trusted_proxies)

    @property
    def restricted(self) -> bool:
        return bool(self._allowed)

    def source(self, request: web.Request) -> IPAddress | None:
        """The client's address, or None when it cannot be known (then it is not allowed)."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address = parse_address(str(peer[0])) if isinstance(peer, tuple) and peer else None
        if address is None or not self._is_trusted(address):
            return address
        hops = [
            hop for header in request.headers.getall(FORWARDED_FOR, []) for hop in header.split(",")
        ]
        for hop in reversed(hops):
            forwarded = parse_address(hop)
            if forwarded is None:
                # A trusted proxy wrote something we cannot read: the client is unknown.
                return None
            address = forwarded
            if not self._is_trusted(address):
                return address
        return address  # every hop is a trusted proxy: the leftmost is the client

    def allows(self, source: IPAddress | None) -> bool:
        """True without an allow-list; else only for a known source inside it."""
        if not self._allowed:
            return True
        return source is not None and any(source in network for network in self._allowed)

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)
