"""The client address of an admin request: the socket's peer, or the address a trusted proxy
(admin.trusted_proxies) put in X-Forwarded-For. Only the hops that are themselves trusted are
peeled off, right to left; the first untrusted address is the client, so a client cannot forge
its address by sending its own X-Forwarded-For through the proxy."""
from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _trusted(addr: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def client_ip(peer: str | None, forwarded_for: list[str], networks: Sequence[Network]) -> str:
    """peer: the socket's address; forwarded_for: every X-Forwarded-For header, in order."""
    ip = peer or "-"
    if not networks or not _trusted(ip, networks):
        return ip
    hops = [h.strip() for header in forwarded_for for h in header.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return ip  # garbage from beyond the last trusted proxy: keep the last good address
        ip = hop
        if not _trusted(hop, networks):
            return hop
    return ip


def middleware(networks: Sequence[Network]):
    @web.middleware
    async def forwarded(request: web.Request, handler):
        ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), networks)
        if ip != request.remote:
            request = request.clone(remote=ip)
        return await handler(request)
    return forwarded
