"""Rendering the Kamailio edge and rtpengine's command line from the policy (pure: no process runs)."""

from __future__ import annotations

import re

import pytest

from router.config import parse_policy
from router.edge.render import (
    KAMAILIO_CFG,
    RTPENGINE_ENV,
    TLS_CFG,
    EdgeConfigError,
    fill,
    kamailio_command,
    load_templates,
    media_interface,
    render,
    router_address,
    rtpengine_command,
)

EDGE = """\
domain: pbx.test
state_dir: /var/lib/test-router
listen:
  - {{address: {router}, port: 5070, transport: udp{advertise}}}
users: []
edge:
{edge}"""
DEFAULTS = {"address": "127.0.0.1", "internal_address": "127.0.0.2", "internal_port": "5062",
            "rtp_ports": "[31000, 31999]"}


def policy(extra: str = "", router: str = "127.0.0.1", advertise: str = ""):
    """A policy whose edge section is DEFAULTS overridden by ``extra`` ("key: value" lines)."""
    keys = dict(DEFAULTS)
    keys.update(line.split(": ", 1) for line in extra.splitlines())
    text = EDGE.format(edge="".join(f"  {k}: {v}\n" for k, v in keys.items()), router=router,
                       advertise=f", advertise: {advertise}" if advertise else "")
    return parse_policy(text, "/etc/test/router.yaml")


def defines(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^#!define (\w+)(.*)$", text, re.M)}


def listens(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("listen=")]


def test_the_defines_carry_the_yaml_values():
    cfg = render(policy("udp: 5080\ntcp: 5081\ntls: 5082\nwss: 8443\nrtpengine: 127.0.0.1:22223"))[KAMAILIO_CFG]
    d = defines(cfg)
    assert d["INTERNAL_ADDRESS"] == '"127.0.0.2"' and d["INTERNAL_PORT"] == "5062"
    assert d["INTERNAL_SOCKET"] == '"udp:127.0.0.2:5062"'
    assert d["ROUTER_URI"] == '"sip:127.0.0.1:5070"' and d["ROUTER_ADDRESS"] == '"127.0.0.1"'
    assert d["UDP_SOCKET"] == '"udp:127.0.0.1:5080"' and d["WSS_PORT"] == "8443"
    assert d["RTPENGINE_SOCKET"] == '"udp:127.0.0.1:22223"'
    assert d["TLS_CONFIG"] == '"/var/lib/test-router/edge/tls.cfg"'
    assert {"WITH_UDP", "WITH_TLS", "WITH_WSS", "WITH_RTPENGINE"} <= set(d)
    assert (d["ROUTER_ADDRESS"], d["ROUTER_PORT"]) == ('"127.0.0.1"', "5070")   # only it speaks on the inside
    assert listens(cfg) == ["listen=udp:127.0.0.1:5080", "listen=tcp:127.0.0.1:5081", "listen=tls:127.0.0.1:5082",
                            "listen=tls:127.0.0.1:8443", "listen=udp:127.0.0.2:5062"]
    assert "{{" not in cfg and "}}" not in cfg


def test_the_internal_socket_is_the_last_listener_so_never_the_default_one():
    assert listens(render(policy())[KAMAILIO_CFG])[-1] == "listen=udp:127.0.0.2:5062"


def test_substitution_happens_only_in_the_header():
    """Everything after the rendered block is the same for every site: a Kamailio engineer
    reads one routing script."""
    templates = load_templates()
    marker = "# ---- end of rendered values"
    tail = templates[KAMAILIO_CFG].split(marker, 1)[1]
    assert "{{" not in tail
    assert render(policy("wss: off"))[KAMAILIO_CFG].split(marker, 1)[1] == tail


def test_listeners_turned_off_are_absent():
    files = render(policy("udp: off\ntls: off\nwss: off\ntcp: 5090"))
    cfg = files[KAMAILIO_CFG]
    assert listens(cfg) == ["listen=tcp:127.0.0.1:5090", "listen=udp:127.0.0.2:5062"]
    d = defines(cfg)
    assert not {"WITH_UDP", "WITH_TLS", "WITH_WSS"} & set(d)
    assert TLS_CFG not in files                  # no TLS listener, no TLS profile to load


def test_wss_alone_still_loads_tls():
    files = render(policy("tls: off\nwss: 7443"))
    d = defines(files[KAMAILIO_CFG])
    assert {"WITH_TLS", "WITH_WSS"} <= set(d)
    assert "listen=tls:127.0.0.1:7443" in listens(files[KAMAILIO_CFG])
    assert "certificate = /var/lib/test-router/edge/cert.pem" in files[TLS_CFG]
    assert "private_key = /var/lib/test-router/edge/key.pem" in files[TLS_CFG]


def test_named_certificate_files_go_into_tls_cfg():
    tls = render(policy("certificate: /etc/ssl/edge.pem\nprivate_key: keys/edge.key"))[TLS_CFG]
    assert "certificate = /etc/ssl/edge.pem" in tls
    assert "private_key = /var/lib/test-router/keys/edge.key" in tls      # relative to state_dir


def test_rtpengine_off_leaves_media_out():
    p = policy("rtpengine: off")
    files = render(p)
    assert "WITH_RTPENGINE" not in defines(files[KAMAILIO_CFG])
    assert RTPENGINE_ENV not in files
    with pytest.raises(EdgeConfigError, match="no rtpengine"):
        rtpengine_command(p)


def test_rtpengine_command_line():
    p = policy("rtpengine: 127.0.0.1:22223")
    assert rtpengine_command(p) == [
        "rtpengine", "--config-file=none", "--table=-1", "--interface=127.0.0.1",
        "--listen-ng=127.0.0.1:22223", "--port-min=31000", "--port-max=31999", "--foreground", "--log-stderr"]
    assert "--no-fallback" not in rtpengine_command(p)       # it means: refuse to run without the kernel table
    env = render(p)[RTPENGINE_ENV]
    assert 'RTPENGINE_ARGS="--config-file=none --table=-1 --interface=127.0.0.1 ' in env


def test_a_wildcard_edge_advertises_and_binds_its_media_to_the_public_address():
    p = policy("address: 0.0.0.0\nadvertise: 192.0.2.10\nudp: 5060\ntcp: 5060\ntls: 5061\nwss: 443")
    cfg = render(p)[KAMAILIO_CFG]
    assert "listen=udp:0.0.0.0:5060 advertise 192.0.2.10:5060" in listens(cfg)
    assert "listen=tls:0.0.0.0:443 advertise 192.0.2.10:443" in listens(cfg)
    assert p.edge is not None and media_interface(p.edge) == "192.0.2.10"     # rtpengine cannot bind 0.0.0.0


def test_media_address_is_announced_beside_the_local_one():
    p = policy("address: 10.0.0.5\nadvertise: 198.51.100.7\nmedia_address: 198.51.100.8")
    assert p.edge is not None and media_interface(p.edge) == "10.0.0.5!198.51.100.8"
    assert "--interface=10.0.0.5!198.51.100.8" in rtpengine_command(p)


def test_ipv6_addresses_are_bracketed():
    p = policy("address: '::1'\ninternal_address: '::1'\ninternal_port: 5063\nrtpengine: '[::1]:22222'")
    cfg = render(p)[KAMAILIO_CFG]
    d = defines(cfg)
    assert d["INTERNAL_SOCKET"] == '"udp:[::1]:5063"' and d["INTERNAL_ADDRESS"] == '"::1"'
    assert d["RTPENGINE_SOCKET"] == '"udp6:[::1]:22222"'
    assert "listen=udp:[::1]:5060" in listens(cfg)
    assert "--listen-ng=[::1]:22222" in rtpengine_command(p)


def test_the_router_address_is_its_first_udp_listener():
    # the edge on another host (a wildcard router is refused with the edge on loopback)
    p = policy("internal_address: 192.0.2.30", router="0.0.0.0", advertise="192.0.2.20")
    assert router_address(p) == ("192.0.2.20", 5070)
    d = defines(render(p)[KAMAILIO_CFG])
    assert d["ROUTER_URI"] == '"sip:192.0.2.20:5070"'
    assert d["ROUTER_ADDRESS"] == '"192.0.2.20"'       # the internal socket takes only its advertised address


def test_clashing_internal_socket_is_refused():
    with pytest.raises(EdgeConfigError, match="internal_port"):
        render(policy("address: 0.0.0.0\nadvertise: 192.0.2.10\nudp: 5062"))
    with pytest.raises(EdgeConfigError, match="one address"):
        render(policy("internal_address: 0.0.0.0"))
    with pytest.raises(EdgeConfigError, match="edge.tls and edge.wss are both port 5061"):
        render(policy("tls: 5061\nwss: 5061"))


def test_no_edge_section_is_an_error():
    p = parse_policy("domain: pbx.test\nstate_dir: /tmp/x\nusers: []\n", "/etc/r.yaml")
    with pytest.raises(EdgeConfigError, match="no `edge:` section"):
        render(p)


def test_an_unknown_placeholder_is_an_error_not_a_silent_gap():
    with pytest.raises(EdgeConfigError, match="no value for {{nope}}"):
        fill("a {{nope}} b", {"yes": "1"})
    assert fill("{{a}}-{{a}}", {"a": "x"}) == "x-x"


def test_kamailio_runs_in_the_foreground_logging_to_stderr():
    command = kamailio_command("/var/lib/x/edge/kamailio.cfg", "/usr/sbin/kamailio")
    assert command[0] == "/usr/sbin/kamailio" and "-DD" in command and "-E" in command
    assert command[-2:] == ["-f", "/var/lib/x/edge/kamailio.cfg"]


def test_the_routing_script_honours_the_contract():
    """The lines the router relies on, so an edit of the template cannot drop one unnoticed."""
    cfg = load_templates()[KAMAILIO_CFG]
    for needle in ('remove_hf("X-Edge-Client")', 'append_hf("X-Edge-Client: $var(client);transport=$(pr{s.tolower})',
                   'modparam("path", "use_received", 1)', "add_path_received(", "force_rport()",
                   "loose_route_preloaded()", "set_forward_no_connect()", 't_reply("430", "Flow Failed")',
                   "$fs = INTERNAL_SOCKET", "record_route(", "add_contact_alias()", "handle_ruri_alias()",
                   "ws_handle_handshake()", "tcp_accept_no_cl=yes", "pike_check_req()", "sanity_check(",
                   "rtpengine_offer(", "rtpengine_answer(", "rtpengine_delete("):
        assert needle in cfg, needle


def test_trusted_peers_skip_flood_limiting_and_nobody_does_without_them():
    with_peers = parse_policy(EDGE.format(edge="".join(f"  {k}: {v}\n" for k, v in DEFAULTS.items()),
                                          router="127.0.0.1", advertise="")
                              .replace("users: []", "users: []\ntrusted_peers: [{name: acd, address: 10.0.0.5}, "
                                                    "{name: trunk, address: 192.0.2.0/24}]"),
                              "/etc/test/router.yaml")
    assert defines(render(with_peers)[KAMAILIO_CFG])["TRUSTED_NETWORKS"] == '"10.0.0.5/32,192.0.2.0/24"'
    assert defines(render(policy())[KAMAILIO_CFG])["TRUSTED_NETWORKS"] == '"0.0.0.0/32"'
