"""``sip-router edge-config``: render the edge into the state directory, make the
self-signed pair when configured, let Kamailio check the result, say how to start it."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

from router.config import load_policy
from router.edge.certs import ensure_self_signed
from router.edge.render import (
    KAMAILIO_CFG,
    edge_directory,
    kamailio_command,
    render,
    router_address,
    rtpengine_command,
    uri_host,
)
from router.edge.write import check_config, kamailio_binary, write_files
from router.policy.model import Edge


def connect_points(edge: Edge) -> dict[str, str]:
    """Where phones and browsers reach the edge, per transport that is on."""
    host = uri_host(edge.public_address)
    points = {proto: f"{host}:{port}" for proto, port in
              (("udp", edge.udp_port), ("tcp", edge.tcp_port), ("tls", edge.tls_port)) if port}
    if edge.wss_port:
        points["wss"] = f"wss://{host}:{edge.wss_port}"
    return points


def describe_edge(edge: Edge) -> str:
    """One line: the listeners, the internal socket and rtpengine."""
    listeners = ", ".join(f"{proto} {where}" if proto != "wss" else where
                          for proto, where in connect_points(edge).items())
    media = f"rtpengine {uri_host(edge.rtpengine[0])}:{edge.rtpengine[1]}" if edge.rtpengine else "no rtpengine"
    return (f"{listeners}; toward the router from {uri_host(edge.internal_address)}:{edge.internal_port}; "
            f"{media}")


def edge_config(config: str, as_json: bool = False) -> int:
    """Exit status: 0 written (and accepted by ``kamailio -c`` when Kamailio is installed),
    1 Kamailio refused it, 2 the YAML has no ``edge:`` section."""
    policy = load_policy(config)
    edge = policy.edge
    if edge is None:
        print(f"error: {config} has no `edge:` section: add one to run Kamailio and rtpengine in front "
              "of the router (config/router.yaml shows every key)", file=sys.stderr)
        return 2
    directory = edge_directory(policy)
    made = False
    if edge.self_signed and (edge.tls_port or edge.wss_port):
        made = ensure_self_signed(edge.certificate, edge.private_key, [edge.public_address])
    paths = write_files(render(policy), directory)
    cfg = f"{directory}/{KAMAILIO_CFG}"
    binary = kamailio_binary()
    ok, output = check_config(cfg, binary) if binary else (True, "")
    commands = {"kamailio": kamailio_command(cfg, binary or "kamailio")}
    if edge.rtpengine is not None:
        commands["rtpengine"] = rtpengine_command(policy)
    router = router_address(policy)
    data: dict[str, Any] = {
        "files": paths, "certificate": edge.certificate if edge.tls_port or edge.wss_port else None,
        "certificate_made": made, "kamailio_check": None if binary is None else {"ok": ok, "output": output},
        "commands": commands, "connect": connect_points(edge),
        "router": f"{uri_host(router[0])}:{router[1]}",
        "rtpengine": f"{uri_host(edge.rtpengine[0])}:{edge.rtpengine[1]}" if edge.rtpengine else None,
        "internal": f"{uri_host(edge.internal_address)}:{edge.internal_port}"}
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _print_text(data, edge)
    return 0 if ok else 1


def _print_text(data: dict[str, Any], edge: Edge) -> None:
    for path in data["files"]:
        print(f"edge: wrote {path}")
    if data["certificate_made"]:
        print(f"edge: made a self-signed certificate {edge.certificate} (key {edge.private_key}, mode 0600); "
              "browsers must be told to accept it once, or name a real one in edge.certificate")
    check = data["kamailio_check"]
    if check is None:
        print("edge: kamailio is not installed, the configuration was not checked (Debian packages kamailio "
              "kamailio-websocket-modules kamailio-tls-modules rtpengine-daemon)")
    elif check["ok"]:
        print("edge: kamailio -c accepts the configuration")
    else:
        print("edge: kamailio -c REFUSES the configuration:", file=sys.stderr)
        for line in check["output"].splitlines()[-25:]:
            print(f"  {line}", file=sys.stderr)
    if "rtpengine" in data["commands"]:
        print(f"start rtpengine:\n  {shlex.join(data['commands']['rtpengine'])}")
    print(f"start kamailio:\n  {shlex.join(data['commands']['kamailio'])}")
    print("phones and browsers connect to: " + ", ".join(f"{k} {v}" if k != "wss" else v
                                                         for k, v in data["connect"].items()))
    print(f"the edge relays to the router at {data['router']} from {data['internal']}")

