"""Finding the PSTN trunk: an IP as given, else DNS (SRV where configured, then A/AAAA).

Looked up when the router starts and on every reload, never while a call is
being routed, so a slow DNS server cannot stall the PJSIP thread mid-call.
RFC 3263 §4.2 order: lowest SRV priority first, then highest weight.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

from router.errors import RouterError
from router.policy.model import Trunk

# dnspython is imported where a trunk needs it (SRV, or a nameserver of its own), not
# here: ~6 MB less in each router process whose trunk is an address or a name the
# system resolves.
if TYPE_CHECKING:
    import dns.resolver


class ResolveError(RouterError):
    """The trunk's name has no usable DNS answer."""


def _resolver(nameserver: str | None) -> dns.resolver.Resolver | None:
    if nameserver is None:
        return None
    import dns.resolver
    resolver = dns.resolver.Resolver(configure=False)
    host, port = nameserver, 53
    if nameserver.count(":") == 1:
        host, _, text = nameserver.partition(":")
        port = int(text)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = 3.0
    return resolver


def _address(name: str, resolver: dns.resolver.Resolver | None) -> str:
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    if resolver is None:
        try:
            return str(socket.getaddrinfo(name, None, type=socket.SOCK_DGRAM)[0][4][0])
        except OSError as exc:
            raise ResolveError(f"{name}: {exc}") from None
    import dns.exception
    import dns.resolver
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        except dns.exception.DNSException as exc:
            raise ResolveError(f"{name} {rdtype}: {exc}") from None
        return str(answer[0].address)
    raise ResolveError(f"{name} has no A or AAAA record")


def resolve_trunk(trunk: Trunk) -> tuple[str, int]:
    """The address and port to send the trunk's traffic to."""
    resolver = _resolver(trunk.nameserver)
    if not trunk.srv:
        return _address(trunk.host, resolver), trunk.port
    query = f"_sip._{trunk.transport}.{trunk.host}"
    import dns.exception
    import dns.resolver
    try:
        answer = (resolver or dns.resolver.get_default_resolver()).resolve(query, "SRV")
    except dns.exception.DNSException as exc:
        raise ResolveError(f"{query} SRV: {exc}") from None
    records = sorted(answer, key=lambda r: (r.priority, -r.weight))
    best = records[0]
    return _address(str(best.target).rstrip("."), resolver), int(best.port)
