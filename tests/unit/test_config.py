"""The YAML policy: every mistake reported with file:line, nothing passes silently."""

from __future__ import annotations

import textwrap

import pytest

from router.config import load_policy, parse_policy
from router.errors import ConfigError
from router.policy.model import DeviceKind, ReceiveMethod, RoutingMode

GOOD = """\
domain: pbx.test
trunk: {address: 127.0.0.1}
queues:
  - id: q1
    hotline: "842873001234"
users:
  - id: lan
    extension: "1001"
    receive_method: ip_phone
    agent_phone: "84912345678"
    default_queue: q1
    devices:
      - id: lan-desk
        kind: ip_phone
        password: secret
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_policy(textwrap.dedent(text), "router.yaml")
    return info.value.problems


def test_the_shipped_example_is_valid():
    policy = load_policy("config/router.yaml")
    assert policy.users and policy.queues and policy.trunk is not None
    assert {d.kind for u in policy.users for d in u.devices} == set(DeviceKind)


def test_a_good_file_loads_into_frozen_dataclasses():
    policy = parse_policy(GOOD, "router.yaml")
    user = policy.user("1001")
    assert user is not None and user.id == "lan"
    assert user.receive_method is ReceiveMethod.IP_PHONE
    assert policy.queue("q1").ring_timeout == 15.0
    assert policy.routing.mode is RoutingMode.PROXY
    with pytest.raises(AttributeError):
        user.receive_method = ReceiveMethod.APP  # type: ignore[misc]


def test_an_invalid_agent_phone_names_file_line_and_the_fix():
    text = GOOD.replace('agent_phone: "84912345678"', 'agent_phone: "0912345678"')
    assert problems(text) == [
        "router.yaml:10:18: users[0].agent_phone: '0912345678' starts with the trunk prefix 0; "
        "write it as 84912345678"]


def test_an_unknown_key_is_an_error_with_its_line():
    text = GOOD.replace("    receive_method: ip_phone", "    recieve_method: ip_phone")
    (line,) = problems(text)
    assert line.startswith("router.yaml:9:5: users[0].recieve_method: unknown key; did you mean 'receive_method'?")


def test_an_unknown_receive_method_lists_the_valid_ones():
    (line,) = problems(GOOD.replace("receive_method: ip_phone", "receive_method: phone"))
    assert line.startswith("router.yaml:9:21: users[0].receive_method: 'phone' is not one of: all_devices")


def test_every_error_is_reported_at_once():
    text = GOOD.replace("kind: ip_phone", "kind: desk").replace('hotline: "842873001234"', "hotline: 123")
    found = problems(text)
    assert any(p.startswith("router.yaml:5:14: queues[0].hotline:") for p in found)
    assert any(p.startswith("router.yaml:14:15: users[0].devices[0].kind: 'desk'") for p in found)


def test_duplicate_ids_extensions_and_usernames_are_errors():
    text = GOOD + (
        "  - id: minh\n"
        "    extension: \"1001\"\n"
        "    devices:\n"
        "      - {id: lan-desk, kind: app, password: x}\n")
    assert problems(text) == [
        "router.yaml:16:5: users[1]: user id or extension '1001' is already used by users[0]",
        "router.yaml:16:5: users[1]: device id 'lan-desk' is already used by users[0]",
        "router.yaml:16:5: users[1]: device username 'lan-desk' is already used by users[0]",
    ]


def test_a_duplicate_yaml_key_is_an_error():
    found = problems(GOOD.replace("    extension: \"1001\"\n", "    extension: \"1001\"\n    extension: \"1002\"\n"))
    assert found == ["router.yaml:9:5: users[0].extension: duplicate key"]


def test_agent_phone_without_a_number_is_a_configuration_error():
    text = GOOD.replace("receive_method: ip_phone", "receive_method: agent_phone").replace(
        '    agent_phone: "84912345678"\n', "")
    (line,) = problems(text)
    assert line.startswith("router.yaml:7:5: users[0].agent_phone: user 'lan' may ring agent_phone")


def test_a_fallback_to_agent_phone_needs_a_trunk():
    text = GOOD.replace("trunk: {address: 127.0.0.1}\n", "").replace(
        "receive_method: ip_phone", "receive_method: ip_phone\n    fallback: [agent_phone]")
    assert any("no trunk is configured" in p for p in problems(text))


def test_ring_timeout_has_a_minimum_of_3_seconds():
    (line,) = problems(GOOD.replace('hotline: "842873001234"', 'hotline: "842873001234"\n    ring_timeout: 2'))
    assert line == "router.yaml:6:19: queues[0].ring_timeout: must be at least 3, not 2"


def test_a_device_needs_a_password_or_ha1():
    (line,) = problems(GOOD.replace("        password: secret\n", ""))
    assert line.startswith("router.yaml:13:9: users[0].devices[0]: needs a password or an ha1")


def test_an_unknown_default_queue_is_an_error():
    (line,) = problems(GOOD.replace("default_queue: q1", "default_queue: q9"))
    assert line == "router.yaml:7:5: users[0].default_queue: no queue with id 'q9'"


def test_broken_yaml_names_the_line():
    (line,) = problems(GOOD.replace("    hotline:", "  hotline: [unclosed\n    x:"))
    assert line.startswith("router.yaml:") and "not valid YAML" in line


def test_a_trusted_peer_must_be_an_address_or_network():
    (line,) = problems(GOOD + "trusted_peers:\n  - address: pbx.example\n")
    assert line.startswith("router.yaml:17:14: trusted_peers[0].address: 'pbx.example' is not an address")


def test_an_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_policy(str(tmp_path / "missing.yaml"))


def test_a_trunk_found_by_srv_takes_its_nameserver_and_names_no_port_in_uris():
    policy = parse_policy(GOOD.replace("trunk: {address: 127.0.0.1}",
                                       "trunk: {address: carrier.test, srv: true, nameserver: '10.0.0.53:5353'}"),
                          "router.yaml")
    assert policy.trunk.srv and policy.trunk.nameserver == "10.0.0.53:5353"
    assert policy.trunk.uri_for("84912345678") == "sip:84912345678@carrier.test"


def test_a_bad_nameserver_is_an_error():
    (line,) = problems(GOOD.replace("trunk: {address: 127.0.0.1}",
                                    "trunk: {address: carrier.test, nameserver: dns.example}"))
    assert line == "router.yaml:2:44: trunk.nameserver: 'dns.example' is not an IP address with an optional :port"


def test_a_file_that_is_not_utf8_is_refused_with_its_line_and_column(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_bytes(b"domain: pbx.test\nusers: []\n# caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_policy(str(path))
    assert err.value.problems == [f"{path}:3:6: byte 0xe9 is not UTF-8 text; save the file as UTF-8"]


def test_a_control_character_or_a_tab_is_refused_with_its_line_and_a_hint(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_policy("domain: pbx.test\nusers:\x00 []\n", "r.yaml")
    assert err.value.problems == ["r.yaml:2:7: not valid YAML: character U+0000 is not allowed in the file"]
    with pytest.raises(ConfigError) as err:
        parse_policy("domain: pbx.test\nusers:\n\t- id: a\n", "r.yaml")
    assert err.value.problems[0].startswith("r.yaml:3:") and "indents with spaces" in err.value.problems[0]


@pytest.mark.parametrize("text, where", [
    ("domain: pbx.test\nusers:\n  - id: a\n\t  kind: x\n", "r.yaml:4:1:"),      # a tab before spaces
    ("domain: pbx.test\nusers:\n  - id: a\n  \t  devices: []\n", "r.yaml:4:3:"),  # a tab after spaces
    ("x:\n  - a\n  -\tb: 1\n", "r.yaml:3:4:"),                               # a tab after the dash
])
def test_a_tab_is_pointed_at_by_line_and_column_with_what_to_do(text, where):
    with pytest.raises(ConfigError) as err:
        parse_policy(text, "r.yaml")
    (line,) = err.value.problems
    assert line.startswith(where) and "YAML indents with spaces only; replace it with spaces" in line


def test_yaml_that_is_broken_without_a_tab_gets_no_tab_hint():
    with pytest.raises(ConfigError) as err:
        parse_policy("domain: pbx.test\nusers: a: b\n", "r.yaml")
    (line,) = err.value.problems
    assert line.startswith("r.yaml:2:9: not valid YAML:") and "tab" not in line


def test_errors_come_in_the_order_of_the_file_whatever_order_they_are_checked_in():
    # the users are checked before the cross-checks and the edge, the queues before the users:
    # a problem low in the file is found first, one high in the file last
    text = GOOD.replace("default_queue: q1", "default_queue: q9").replace("kind: ip_phone", "kind: desk") \
        .replace('hotline: "842873001234"', "hotline: 123") + "routing: {ring_timeout: 1}\n"
    found = problems(text)
    places = [tuple(int(n) for n in p.split(":")[1:3]) for p in found]
    assert places == sorted(places) and len(found) == 4
    assert [p.split(": ")[1] for p in found] == [
        "queues[0].hotline", "users[0].default_queue", "users[0].devices[0].kind", "routing.ring_timeout"]


@pytest.mark.parametrize("typo, meant", [
    ("recieve_method", "receive_method"), ("Extension", "extension"), ("fallbak", "fallback"),
])
def test_an_unknown_key_suggests_the_key_it_is_closest_to(typo, meant):
    (line,) = problems(GOOD.replace("    extension: \"1001\"\n", f"    {typo}: \"1001\"\n"))
    assert f"users[0].{typo}: unknown key; did you mean {meant!r}?" in line


def test_an_unknown_key_like_nothing_known_gets_no_guess():
    (line,) = problems(GOOD.replace("    extension: \"1001\"\n", "    extension: \"1001\"\n    zzz: x\n"))
    assert "users[0].zzz: unknown key (known here:" in line and "did you mean" not in line


def test_the_example_ha1_is_the_md5_its_comment_names():
    import re

    from router.sip.digest import ha1
    text = open("config/router.yaml", encoding="utf-8").read()
    value, username, realm, password = re.search(
        r'ha1: ([0-9a-f]{32}) +# md5\("([^:]+):([^:]+):([^"]+)"\)', text).groups()
    policy = load_policy("config/router.yaml")
    device = next(d for u in policy.users for d in u.devices if d.ha1_md5 is not None)
    assert (username, realm) == (device.auth_username, policy.domain)
    assert ha1("MD5", username, realm, password) == value == device.ha1_md5


# ---------------------------------------------------------------------------- the edge section
EDGE_BASE = GOOD + "listen: [{address: 127.0.0.1, port: 5070}]\ntrusted_peers: [{name: acd, address: 10.0.0.5}]\n"


def _edge_problems(section: str, base: str = EDGE_BASE) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_policy(base + section, "router.yaml")
    return caught.value.problems


def test_an_edge_section_with_defaults_names_a_self_signed_pair_under_the_state_dir(tmp_path):
    policy = parse_policy(EDGE_BASE + f"state_dir: {tmp_path}\nedge:\n  address: 127.0.0.1\n  tcp: off\n",
                          str(tmp_path / "router.yaml"))
    edge = policy.edge
    assert edge is not None and edge.tcp_port is None and (edge.udp_port, edge.tls_port, edge.wss_port) == (
        5060, 5061, 8443)
    assert edge.self_signed and edge.certificate == str(tmp_path / "edge" / "cert.pem")
    assert edge.rtpengine == ("127.0.0.1", 22222) and edge.internal_address == "127.0.0.2"


def test_no_edge_section_means_no_edge():
    assert parse_policy(EDGE_BASE, "router.yaml").edge is None


def test_an_edge_inside_a_trusted_network_is_refused_it_would_trust_every_client():
    (problem,) = _edge_problems("edge: {address: 127.0.0.1, internal_address: 10.0.0.5}\n")
    assert problem.startswith("router.yaml:") and "inside trusted peer 'acd'" in problem


def test_with_the_edge_on_this_host_the_router_listens_on_loopback_only():
    base = EDGE_BASE.replace("address: 127.0.0.1, port: 5070", "address: 0.0.0.0, port: 5070, advertise: 192.0.2.1")
    (problem,) = _edge_problems("edge: {address: 192.0.2.1}\n", base)
    assert "loopback only, not 0.0.0.0" in problem


def test_the_edge_and_the_router_cannot_share_a_port():
    (problem,) = _edge_problems("edge: {address: 127.0.0.1, udp: 5070, tcp: 5070}\n")
    assert "127.0.0.1:5070 is also an edge listener" in problem


@pytest.mark.parametrize("section, words", [
    ("edge: {address: 127.0.0.1, wss: 99999}\n", "not a port number"),
    ("edge: {address: 127.0.0.1, rtp_ports: [5000, 4000]}\n", "rtp_ports"),
    ("edge: {address: 127.0.0.1, rtpengine: nowhere}\n", "not ip:port"),
    ("edge: {address: 127.0.0.1, udp: off, tcp: off, tls: off, wss: off}\n", "every listener is off"),
    ("edge: {address: 0.0.0.0}\n", "needs `advertise:`"),
    ("edge: {address: 127.0.0.1, certificate: site.pem}\n", "private_key: is required"),
    ("edge: {address: 127.0.0.1, colour: blue}\n", "colour"),
])
def test_a_bad_edge_section_says_what_is_wrong_with_file_and_line(section, words):
    problems = _edge_problems(section)
    assert any(words in p and p.startswith("router.yaml:") for p in problems), problems


_SCALARS = ["", "~", "null", "Null", "NULL", "true", "yes", "No", "off", "ON", "y", "n", "0", "-1", "+7",
            "0x1F", "0o17", "017", "1_000", "1.5", "-.inf", ".NaN", "1e3", "6.8523015e+5", "190:20:30",
            "2026-11-28", "2026-11-28 22:13:22", "<<", "=", "pw0", "u1", "+84901234567", "10000",
            "ip_phone", ".5", "-", "-x", "+", "1:2", "0b101", "True", "FALSE"]


@pytest.mark.parametrize("quoted", [False, True])
def test_the_lean_resolver_tags_every_scalar_as_pyyaml_does(quoted):
    """The loader's own ``resolve`` (two million calls for 100,000 users) must give
    each node the tag PyYAML's safe loader gives it: a wrong tag would turn ``no``
    into text or a quoted ``'10000'`` into a number."""
    import yaml

    from router.yamlnodes import Loader
    items = "\n".join(f"- '{v}'" if quoted else f"- {v}" for v in _SCALARS if v != "" or not quoted)
    text = f"{items}\n- [a, 1, ~]\n- {{k: v}}\n- !!str 5\n"
    ours = yaml.compose(text, Loader=Loader)
    theirs = yaml.compose(text, Loader=yaml.SafeLoader)

    def tags(node):
        if isinstance(node, yaml.ScalarNode):
            return [(node.value, node.tag)]
        children = node.value if isinstance(node, yaml.SequenceNode) else [v for kv in node.value for v in kv]
        return [(type(node).__name__, node.tag), *[t for c in children for t in tags(c)]]
    assert tags(ours) == tags(theirs)
    expected = "tag:yaml.org,2002:str" if quoted else "tag:yaml.org,2002:bool"
    assert ("true", expected) in tags(ours)
