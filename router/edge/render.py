"""Render the edge's Kamailio configuration and rtpengine's command line from the policy.

Pure: the templates (``config/edge/*.cfg``) are text with ``{{name}}`` placeholders,
filled from ``Policy.edge`` and the router's own UDP address.  Writing the files,
making certificates and running programs belong to ``write`` and ``certs``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path

from router.errors import RouterError
from router.policy.model import Edge, Policy

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "config" / "edge"
KAMAILIO_CFG = "kamailio.cfg"
TLS_CFG = "tls.cfg"
RTPENGINE_ENV = "rtpengine.env"      # RTPENGINE_ARGS for deploy/sip-router-rtpengine.service
TEMPLATES = (KAMAILIO_CFG, TLS_CFG)
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")
_WILDCARDS = ("0.0.0.0", "::")


class EdgeConfigError(RouterError):
    """The edge cannot be rendered from this policy (no edge section, clashing sockets)."""


def load_templates(directory: Path = TEMPLATE_DIR) -> dict[str, str]:
    """The template texts by file name."""
    try:
        return {name: (directory / name).read_text(encoding="utf-8") for name in TEMPLATES}
    except OSError as exc:
        raise EdgeConfigError(f"cannot read the edge template {exc.filename}: {exc.strerror}") from None


def edge_directory(policy: Policy) -> str:
    """Where the rendered files, the self-signed pair and the logs of the edge live."""
    return os.path.join(policy.state_dir, "edge")


def router_address(policy: Policy) -> tuple[str, int]:
    """The router's own UDP address: the first udp ``listen:`` entry (its ``advertise``
    when it listens on a wildcard)."""
    for entry in policy.listen:
        if entry.transport == "udp":
            host = entry.advertise if entry.address in _WILDCARDS and entry.advertise else entry.address
            return host, entry.port
    raise EdgeConfigError("the edge relays to the router over UDP: add a udp entry to `listen:`")


def _edge(policy: Policy) -> Edge:
    if policy.edge is None:
        raise EdgeConfigError(f"{policy.source} has no `edge:` section")
    return policy.edge


def uri_host(address: str) -> str:
    """An address as the host part of a URI or socket: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


def _is_v6(address: str) -> bool:
    return ipaddress.ip_address(address).version == 6


def media_interface(edge: Edge) -> str:
    """rtpengine's ``--interface``: the local address it binds, ``!`` the address it
    puts in SDP when they differ.  rtpengine cannot bind a wildcard, so an edge on
    0.0.0.0 binds its media to the address it announces."""
    announced = edge.media_address or edge.public_address
    local = announced if edge.address in _WILDCARDS else edge.address
    return local if local == announced else f"{local}!{announced}"


def rtpengine_command(policy: Policy, binary: str = "rtpengine") -> list[str]:
    """rtpengine in userspace (no kernel table), in the foreground, logging to stderr."""
    edge = _edge(policy)
    if edge.rtpengine is None:
        raise EdgeConfigError("the edge has no rtpengine (`rtpengine: off`)")
    host, port = edge.rtpengine
    return [binary, "--config-file=none", "--table=-1", f"--interface={media_interface(edge)}",
            f"--listen-ng={uri_host(host)}:{port}", f"--port-min={edge.rtp_port_min}",
            f"--port-max={edge.rtp_port_max}", "--foreground", "--log-stderr"]


def kamailio_command(config_path: str, binary: str = "kamailio") -> list[str]:
    """Kamailio in the foreground (its children still forked), logging to stderr.  Shared
    memory: each TCP/TLS connection holds a 16 KiB read buffer and OpenSSL's state."""
    return [binary, "-DD", "-E", "-m", "256", "-M", "16", "-f", config_path]


def _check_sockets(edge: Edge) -> None:
    internal = ipaddress.ip_address(edge.internal_address)
    if edge.internal_address in _WILDCARDS:
        raise EdgeConfigError("edge.internal_address must be one address (the router sends to it), "
                              f"not {edge.internal_address}")
    if edge.address in _WILDCARDS and internal.version == ipaddress.ip_address(edge.address).version \
            and edge.internal_port == edge.udp_port:
        raise EdgeConfigError(f"edge.internal_port {edge.internal_port} is also the udp port of the edge "
                              f"listening on {edge.address}: give one of them another port")
    streams = [(name, port) for name, port in (("tcp", edge.tcp_port), ("tls", edge.tls_port),
                                                ("wss", edge.wss_port)) if port is not None]
    for i, (name, port) in enumerate(streams):
        for other, other_port in streams[i + 1:]:
            if port == other_port:       # udp may share tcp's port; two stream listeners may not
                raise EdgeConfigError(f"edge.{name} and edge.{other} are both port {port}: "
                                      "each stream listener needs its own")
    if (edge.address, edge.udp_port) == (edge.internal_address, edge.internal_port):
        raise EdgeConfigError("the edge's udp listener and its internal socket are the same: "
                              "give one of them another address or port")


def _listen_lines(edge: Edge) -> list[str]:
    host = uri_host(edge.address)
    advertised = edge.advertise is not None and edge.advertise != edge.address
    lines = []
    for proto, port in (("udp", edge.udp_port), ("tcp", edge.tcp_port), ("tls", edge.tls_port),
                        ("tls", edge.wss_port)):
        if port is None:
            continue
        suffix = f" advertise {uri_host(edge.advertise or '')}:{port}" if advertised else ""
        note = "  # WSS: WebSocket over TLS" if proto == "tls" and port == edge.wss_port else ""
        lines.append(f"listen={proto}:{host}:{port}{suffix}{note}")
    # Last: the first udp listener is the default socket, and that must face the clients.
    lines.append(f"listen=udp:{uri_host(edge.internal_address)}:{edge.internal_port}  # toward the router")
    return lines


def _feature_lines(edge: Edge) -> list[str]:
    features = []
    if edge.udp_port is not None:
        features.append("WITH_UDP")
    if edge.tls_port is not None or edge.wss_port is not None:
        features.append("WITH_TLS")
    if edge.wss_port is not None:
        features.append("WITH_WSS")
    if edge.rtpengine is not None:
        features.append("WITH_RTPENGINE")
    return [f"#!define {name}" for name in features]


def values(policy: Policy, directory: str | None = None) -> dict[str, str]:
    """Every placeholder's value, for ``policy``'s edge rendered into ``directory``."""
    edge = _edge(policy)
    _check_sockets(edge)
    router_host, router_port = router_address(policy)
    where = directory or edge_directory(policy)
    rtpengine = ""
    if edge.rtpengine is not None:
        rtp_host, rtp_port = edge.rtpengine
        rtpengine = f"{'udp6' if _is_v6(rtp_host) else 'udp'}:{uri_host(rtp_host)}:{rtp_port}"
    return {
        "address": edge.address,
        "address_host": uri_host(edge.address),
        "public_address": edge.public_address,
        "internal_address": edge.internal_address,
        "internal_host": uri_host(edge.internal_address),
        "internal_port": str(edge.internal_port),
        "router_address": router_host,
        "router_host": uri_host(router_host),
        "router_port": str(router_port),
        "udp_port_number": str(edge.udp_port or 0),
        "wss_port_number": str(edge.wss_port or 0),
        "rtpengine_socket": rtpengine,
        "tls_config": os.path.join(where, TLS_CFG),
        "certificate": edge.certificate,
        "private_key": edge.private_key,
        # 0.0.0.0/32 is never a packet's source: with no trusted peers, nobody skips pike.
        "trusted_networks": ",".join(str(p.net) for p in policy.trusted_peers) or "0.0.0.0/32",
        "features": "\n".join(_feature_lines(edge)),
        "listeners": "\n".join(_listen_lines(edge)),
    }


def fill(template: str, fields: Mapping[str, str], name: str = "template") -> str:
    """``template`` with every ``{{key}}`` replaced; an unknown placeholder is an error."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(fields))
    if missing:
        raise EdgeConfigError(f"{name}: no value for {', '.join('{{' + m + '}}' for m in missing)}")
    return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], template)


def render(policy: Policy, templates: Mapping[str, str] | None = None,
           directory: str | None = None) -> dict[str, str]:
    """File name -> rendered text for the edge of ``policy``: ``kamailio.cfg``; ``tls.cfg``
    when a TLS or WSS listener is on; ``rtpengine.env`` (rtpengine's arguments, for the
    systemd unit) when rtpengine is on.  ``directory`` is where the files
    will live (default ``<state_dir>/edge``): kamailio.cfg names tls.cfg by path."""
    edge = _edge(policy)
    texts = dict(templates) if templates is not None else load_templates()
    fields = values(policy, directory)
    out = {KAMAILIO_CFG: fill(texts[KAMAILIO_CFG], fields, KAMAILIO_CFG)}
    if edge.tls_port is not None or edge.wss_port is not None:
        out[TLS_CFG] = fill(texts[TLS_CFG], fields, TLS_CFG)
    if edge.rtpengine is not None:
        args = " ".join(rtpengine_command(policy)[1:])
        out[RTPENGINE_ENV] = ("# rtpengine's arguments, from the edge section of the router's YAML "
                              f"(rendered by `sip-router edge-config`)\nRTPENGINE_ARGS=\"{args}\"\n")
    return out
