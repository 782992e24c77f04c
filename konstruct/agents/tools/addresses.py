"""Which network addresses a tool may send to: the edge against server-side request forgery.

A tenant names the URLs its webhooks are POSTed to and the hosts `http_request` may
reach; a worker sends those requests from inside the operator's network. Addresses
that are not public — loopback, private ranges (10/8, 172.16/12, 192.168/16,
fc00::/7), link-local (169.254/16, where clouds serve instance metadata, and fe80::/10),
and the other reserved ranges — are refused unless the operator allows their kind
(`tools.allow_addresses` in the config; the dev stack allows `loopback`).

A URL is checked twice. When a webhook is registered, a host written as a refused
address (`http://169.254.169.254/`, `http://10.0.0.5/`, `http://[fd00::1]/`) is refused
at once (`refused_literal`). When a call is made, the host's name is resolved, every
address it resolves to is checked (`checked`), and the request goes to a checked
address itself (`pinned`: the Host header and the TLS server name keep the name), so a
DNS answer that changes between the check and the connection cannot reach a refused
address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass

import httpx

from konstruct.agents.address_kinds import AddressKind

_WORDS: dict[AddressKind, str] = {
    "loopback": "a loopback address",
    "private": "a private address",
    "link_local": "a link-local address (where clouds serve instance metadata)",
    "reserved": "a reserved, non-public address",
}
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_kind(address: IpAddress) -> AddressKind | None:
    """The kind of a non-public address; None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            address = embedded
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link_local"
    if address.is_private and not address.is_unspecified:
        return "private"
    if not address.is_global or address.is_multicast:
        return "reserved"  # 0.0.0.0, shared (100.64/10), documentation, multicast...
    return None


def literal_address(host: str) -> IpAddress | None:
    """The address a URL's host names literally ("10.0.0.5", "fd00::1"); None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class AddressRefused(Exception):
    """A host that is, or resolves to, an address of a kind the operator does not allow."""


@dataclass(frozen=True)
class AddressPolicy:
    """The kinds of non-public address tools may reach (none unless the operator says)."""

    allowed: frozenset[AddressKind] = frozenset()

    @classmethod
    def allowing(cls, kinds: Collection[AddressKind]) -> AddressPolicy:
        return cls(frozenset(kinds))

    def refusal(self, host: str, address: IpAddress) -> str | None:
        """Why `host` may not be reached at `address`; None when it may."""
        kind = address_kind(address)
        if kind is None or kind in self.allowed:
            return None
        resolved = "" if literal_address(host) == address else f" resolves to {address}, which"
        return (
            f"host '{host}'{resolved} is {_WORDS[kind]}, which tools may not reach"
            f" (an operator allows it with tools.allow_addresses: [{kind}] in the config)"
        )

    def refused_literal(self, url: str) -> str | None:
        """Why a URL whose host is a refused address written out may not be registered."""
        try:
            host = httpx.URL(url).host
        except (httpx.InvalidURL, ValueError, TypeError):
            return None  # the URL's own validation says what is wrong with it
        address = literal_address(host)
        return None if address is None else self.refusal(host, address)

    async def checked(self, url: httpx.URL) -> list[IpAddress]:
        """The addresses `url`'s host is, or resolves to, in the resolver's order.

        Raises `AddressRefused` when any of them is of a refused kind, and `OSError`
        when the name does not resolve."""
        host = url.host
        address = literal_address(host)
        if address is not None:
            addresses = [address]
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        for candidate in addresses:
            why = self.refusal(host, candidate)
            if why is not None:
                raise AddressRefused(why)
        return addresses


def pinned(url: httpx.URL, address: IpAddress) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """`url` sent to `address` itself: the URL with the address as its host, the Host
    header, and the request extensions (the TLS server name) that keep the name."""
    host = url.host
    if literal_address(host) is not None:
        return url, {}, {}
    host_header = host if url.port is None else f"{host}:{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return url.copy_with(host=str(address)), {"Host": host_header}, extensions
