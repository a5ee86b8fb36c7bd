"""How a request reaches a registered binding, and who is behind the edge; pure.

Three ways, decided when the binding is registered:

* **Through the edge** (RFC 3327 Path): the REGISTER came through a proxy that
  put itself in ``Path``.  Every request for the binding carries that Path as its
  ``Route`` and goes to the first hop, the Request-URI staying the Contact, so
  the edge hands it to the device over the very connection it registered on.
* **At the Contact as written** (RFC 3261 §10.3, §16.5): the Contact is an
  address the router can reach and nothing in the REGISTER says a NAT is in
  between.  A third-party registration, or a device that sends from one socket
  and listens on another, is reached where its Contact says.
* **At the REGISTER's source** (the NAT practice of Kamailio's
  ``fix_nated_register``): when a NAT is seen -- the Contact names a private,
  loopback or link-local address that is not the source, or a name the router
  would have to resolve, or the top Via's sent-by is not the packet's source (a
  NAT rewrote the address) -- or the Contact asks for a transport the REGISTER
  did not arrive on.  These bindings are kept open by keep-alive pings
  (``keepalive``).

The edge stamps each request it relays with ``X-Edge-Client: host:port;
transport=ws``: the device's own address.  The router believes it only from
the edge's internal address; throttling, trusted-peer matching and the dialog
sender check then use the device's address, never the edge's.
"""

from __future__ import annotations

import ipaddress

from router.policy.model import Binding, Edge
from router.sip.commands import Source
from router.sip.message import SipMessage, Uri, Via, parse_name_addr, parse_uri

# Addresses that do not reach across a NAT: RFC 1918, carrier-grade NAT (RFC 6598),
# unique-local IPv6 (RFC 4193); loopback and link-local are checked by kind.
_BEHIND_NAT = tuple(ipaddress.ip_network(n) for n in
                    ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))
CLIENT_TRANSPORTS = frozenset({"udp", "tcp", "tls", "ws", "wss", "sctp"})


def is_private(host: str) -> bool:
    """An address that does not reach across a NAT: RFC 1918, CGNAT, loopback, link-local."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local or \
        any(address.version == n.version and address in n for n in _BEHIND_NAT)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return False


def nat_reason(contact: Uri, via: Via, source: Source) -> str | None:
    """Why the Contact cannot be used as written (None: it can)."""
    host = contact.host.strip("[]")
    at_source = host == source.host       # the usual case: no address to parse (the source is one)
    if not at_source and not _is_ip(host):
        return f"the Contact names {host!r}, not an address"
    transport = (contact.params.get("transport") or "udp").lower()
    if transport != source.transport:
        return f"the Contact asks for {transport}, the REGISTER came over {source.transport}"
    if not at_source and is_private(host):
        return f"the Contact's private address {host} is not the source {source.host}"
    if via.host.strip("[]") != source.host or (via.port or 5060) != source.port:
        return f"the Via says {via.host}:{via.port or 5060}, the packet came from {source.host}:{source.port}"
    return None


def destination(binding: Binding) -> tuple[Source, tuple[str, ...]]:
    """Where a request for ``binding`` is sent, and the Route set it carries."""
    if binding.path:
        first = parse_uri(parse_name_addr(binding.path[0]).uri)
        transport = (first.params.get("transport") or "udp").lower()
        return Source(first.host.strip("[]"), first.port or 5060, transport), binding.path
    if binding.at_contact:
        contact = parse_uri(binding.contact)
        return Source(contact.host.strip("[]"), contact.port or 5060, binding.transport,
                      direct=binding.transport == "udp"), ()
    return Source(binding.source_host, binding.source_port, binding.transport, binding.conn), ()


def needs_keepalive(binding: Binding) -> bool:
    """A UDP binding reached through a NAT binding of its own (source, not Contact), or a UDP
    device behind the edge: its pinhole closes unless something crosses it now and then.
    Connections through the edge are kept alive by the edge."""
    if binding.path:
        return binding.device_transport == "udp"
    if binding.at_contact or binding.transport != "udp":
        return False
    try:
        contact = parse_uri(binding.contact)
    except ValueError:
        return True
    return (contact.host.strip("[]"), contact.port or 5060) != (binding.source_host, binding.source_port)


def edge_source(msg: SipMessage, source: Source, edge: Edge | None, header: str) -> Source:
    """``source`` with the edge's client stamped in, when the request came from the edge."""
    # Only the edge's UDP socket: its address and port over TCP are anyone's to bind.
    if edge is None or source.transport != "udp" or source.port != edge.internal_port \
            or not _same_address(source.host, edge.internal_address):
        return source
    value = msg.header(header.lower())
    if not value:
        return source
    hostport, _, params = value.partition(";")
    host, colon, port = hostport.strip().rpartition(":")
    host = host.strip("[]")
    transport = "udp"
    for param in params.split(";"):
        name, _, val = param.strip().partition("=")
        if name.lower() == "transport" and val.lower() in CLIENT_TRANSPORTS:
            transport = val.lower()
    if not colon or not port.isdigit() or not 0 < int(port) < 65536 or not _is_ip(host):
        return source
    return Source(source.host, source.port, source.transport, source.conn, host, int(port), transport)
