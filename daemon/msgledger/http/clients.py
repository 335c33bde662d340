"""Who sent a request: the `client` of every log line and of each journaled webhook event
(docs/clients.md).

The client is the TCP peer's address, unless the peer is inside one of
`http.trusted_proxies`: then it is the address that proxy says it took the request from,
read from `X-Forwarded-For`, or from `Forwarded` (RFC 7239) when there is no
`X-Forwarded-For`. A header from any other peer is ignored: anyone can write one.

Both headers are lists that grow on the way, each proxy appending the address it saw.
Only the entries our trusted proxies appended can be believed, and they are on the right:
whatever is left of them was written by whoever spoke to those proxies, the client
included. So the list is walked from the right, past every address that is itself a
trusted proxy, to the first that is not: that is the client. An entry that cannot be read
(`unknown`, an obfuscated node, garbage) stops the walk at the last address read well,
which is never one the client chose.

A unix-socket peer has no address (hypercorn's scope says None): it is named "unix", and
its headers are not read, since no CIDR can name it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNIX_PEER = "unix"  # the client of a request that came over a unix socket
USER_AGENT_CHARS = 200  # of a User-Agent a line keeps: enough to tell clients apart
# A node of either header: IPv6 in brackets, or IPv4, each with an optional port (which
# RFC 7239 lets a proxy obfuscate as "_name"); a bare address is tried before this.
_NODE = re.compile(r"\[(?P<v6>[^\]]+)\]|(?P<v4>[0-9.]+)")
_PORT = re.compile(r":(?:[0-9]{1,5}|_[A-Za-z0-9._-]+)")
# RFC 7239's forwarded-pair: token "=" ( token / quoted-string ), whitespace around it.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PAIR = re.compile(rf'\s*({_TOKEN})=({_TOKEN}|"(?:[^"\\]|\\.)*")\s*')
_ESCAPE = re.compile(r"\\(.)")


class ClientResolver:
    """`client(scope)` for every request, the trusted networks parsed once."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._networks: tuple[Network, ...] = tuple(ipaddress.ip_network(c) for c in trusted)

    def client(self, scope: Any) -> str:
        """The client of the request `scope` describes (an ASGI HTTP scope)."""
        peer = scope.get("client")
        if peer is None:
            return UNIX_PEER
        host: str = peer[0]
        if not self._networks:  # the default: no header is read at all
            return host
        address = parse_node(host)
        if address is None or not self.trusted(address):
            return host
        return str(self._walk(address, forwarded_hops(scope["headers"])))

    def trusted(self, address: Address) -> bool:
        return any(address in network for network in self._networks)

    def _walk(self, peer: Address, hops: Sequence[str | None]) -> Address:
        """The rightmost hop that is not a trusted proxy; the last one read well if a hop
        cannot be read; the leftmost if every one is trusted."""
        current = peer
        for hop in reversed(hops):
            address = parse_node(hop) if hop is not None else None
            if address is None:
                break
            current = address
            if not self.trusted(current):
                break
        return current


def client_of(scope: Any, trusted: Iterable[str]) -> str:
    """The client of one request; a server keeps a `ClientResolver` instead."""
    return ClientResolver(trusted).client(scope)


def user_agent_of(value: bytes | None) -> str | None:
    """A User-Agent header as a log line carries it: decoded, cut to USER_AGENT_CHARS."""
    return value[:USER_AGENT_CHARS].decode("latin-1") if value is not None else None


def forwarded_hops(headers: Iterable[tuple[bytes, bytes]]) -> list[str | None]:
    """The addresses the request went through, leftmost first: every `X-Forwarded-For`
    entry, or without one every `Forwarded` element's `for=` (None where unreadable).
    Repeated header lines are one list, in order (RFC 9110 §5.3)."""
    xff: list[str] = []
    forwarded: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-forwarded-for":
            xff.append(value.decode("latin-1"))
        elif lowered == b"forwarded":
            forwarded.append(value.decode("latin-1"))
    if xff:  # what common proxies write; see docs/clients.md for why it wins
        return [hop.strip() for line in xff for hop in line.split(",") if hop.strip()]
    return [_for_of(element) for line in forwarded for element in _split(line, ",")
            if element.strip()]  # empty list elements are ignored (RFC 9110 §5.6.1)


def parse_node(text: str) -> Address | None:
    """An address as either header writes it ("192.0.2.1", "192.0.2.1:80", "2001:db8::1",
    "[2001:db8::1]:443"), IPv4-mapped IPv6 as IPv4; None for anything else."""
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        pass
    match = _NODE.match(text)
    port = text[match.end():] if match is not None else ""
    if match is None or (port and not _PORT.fullmatch(port)):
        return None
    try:
        return _unmapped(ipaddress.ip_address(match.group("v6") or match.group("v4")))
    except ValueError:
        return None


def _unmapped(address: Address) -> Address:
    """::ffff:192.0.2.1 as 192.0.2.1, so a dual-stack listener's peers match IPv4 CIDRs."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split(text: str, separator: str) -> list[str]:
    """`text` split at each `separator` that is not inside a quoted string."""
    parts, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _for_of(element: str) -> str | None:
    """The `for=` value of one Forwarded element, unquoted; None if the element does not
    parse, or has no `for=` or two (RFC 7239 §4 allows one)."""
    found: list[str] = []
    for pair in _split(element, ";"):
        match = _PAIR.fullmatch(pair)
        if match is None:
            return None
        name, value = match.groups()
        if name.lower() == "for":
            found.append(_ESCAPE.sub(r"\1", value[1:-1]) if value.startswith('"') else value)
    return found[0] if len(found) == 1 else None
