"""Call routing end to end: the real router, SIPp as the ACD, the phones and the PSTN trunk."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration.calllab import CallLab
from tests.integration.peers import SippPeer
from tests.integration.sippgen import invite_flow
from tests.support import SCENARIOS

pytestmark = pytest.mark.integration

@pytest.fixture
def calls(lab) -> Iterator[CallLab]:
    world = CallLab(lab)
    try:
        yield world
    finally:
        world.stop()


@pytest.fixture
def make_calls(make_lab) -> Iterator[object]:
    worlds: list[CallLab] = []

    def make(**kwargs: object) -> CallLab:
        world = CallLab(make_lab(**kwargs))  # start=False is passed through
        worlds.append(world)
        return world
    try:
        yield make
    finally:
        for world in worlds:
            world.stop()


def with_user_fields(user: str, fields: str):
    def edit(text: str) -> str:
        anchor = f"  - id: {user}\n"
        return text.replace(anchor, anchor + "".join(f"    {line}\n" for line in fields.splitlines()))
    return edit


def test_all_devices_rings_every_device_and_the_others_are_cancelled_when_one_answers(calls):
    desk = calls.phone("lan-desk", "answer")
    app = calls.phone("lan-app", "ring")
    web = calls.phone("lan-web", "ring")
    result, log = calls.call("1001", 200)
    assert result.returncode == 0, log
    assert desk.received("INVITE")
    for other in (app, web):
        assert other.wait_received("INVITE")
        (cancel,) = other.wait_received("CANCEL")
        assert 'Reason: SIP;cause=200;text="Call completed elsewhere"' in cancel
    (record,) = calls.lab.calls("lan")
    assert record["answered_by"] == "lan-desk" and record["status"] == 200
    assert set(record["branches"].split(",")) == {"lan-desk", "lan-app", "lan-web"}


def test_an_agent_on_ip_phone_with_an_app_and_a_desk_phone_registered_only_the_desk_phone_rings(calls):
    desk = calls.phone("minh-desk", "answer")
    app = calls.phone("minh-app", "answer")
    result, log = calls.call("1002", 200)
    assert result.returncode == 0, log
    assert len(desk.received("INVITE")) == 1
    assert app.received("INVITE") == []
    assert desk.wait_received("BYE"), "the caller's BYE must pass through the router"


def test_app_method_rings_web_and_app_but_not_the_desk_phone_after_a_cli_change(calls):
    desk = calls.phone("lan-desk", "answer")
    app = calls.phone("lan-app", "answer")
    web = calls.phone("lan-web", "ring")
    calls.lab.cli("set-method", "lan", "app", "--as", "lan")
    time.sleep(1.2)                       # the router picks run-time changes up within a second
    result, log = calls.call("1001", 200)
    assert result.returncode == 0, log
    assert desk.received("INVITE") == []
    assert app.received("INVITE") and web.wait_received("INVITE")


def test_agent_phone_reaches_the_trunk_with_the_number_and_the_queue_hotline(calls):
    pstn = calls.trunk("answer")
    desk = calls.phone("minh-desk", "answer")
    calls.lab.cli("set-method", "minh", "agent_phone", "--as", "minh")
    time.sleep(1.2)
    result, log = calls.call("1002", 200, headers="X-Queue: support\n")
    assert result.returncode == 0, log
    (invite,) = pstn.received("INVITE")
    assert invite.startswith(f"INVITE sip:84987654321@127.0.0.1:{calls.lab.trunk_port} SIP/2.0")
    assert "P-Asserted-Identity: <sip:842873001234@127.0.0.1>" in invite
    assert "Diversion: <sip:1002@pbx.test>" in invite
    assert "X-Queue" not in invite
    assert desk.received("INVITE") == []
    (record,) = calls.lab.calls("minh")
    assert record["answered_by"] == "pstn:84987654321" and record["method"] == "agent_phone"


def test_a_call_whose_queue_has_no_hotline_is_refused_with_a_reason(make_calls):
    world = make_calls(edit=lambda t: t.replace('  - {id: support, hotline: "842873001234"}',
                                                 '  - {id: support, hotline: "842873001234"}\n  - {id: nohot}'))
    world.lab.cli("set-method", "minh", "agent_phone", "--as", "lan")
    time.sleep(1.2)
    result, log = world.call("1002", 480, headers="X-Queue: nohot\n")
    assert result.returncode == 0, log
    assert "queue 'nohot' has no hotline" in log


def test_ring_timeout_falls_back_to_agent_phone(make_calls):
    world = make_calls(edit=with_user_fields("minh", "ring_timeout: 3\nfallback: [agent_phone]"))
    desk = world.phone("minh-desk", "ring")
    pstn = world.trunk("answer")
    started = time.monotonic()
    result, log = world.call("1002", 200, timeout=30)
    assert result.returncode == 0, log
    (cancel,) = desk.wait_received("CANCEL")
    assert "Ring timeout" in cancel
    assert pstn.received("INVITE") and 2.5 < time.monotonic() - started < 15
    (record,) = world.lab.calls("minh")
    assert record["method"] == "ip_phone>agent_phone" and record["answered_by"] == "pstn:84987654321"


def test_no_device_registered_falls_back_at_once(make_calls):
    world = make_calls(edit=with_user_fields("minh", "fallback: [agent_phone]"))
    pstn = world.trunk("answer")
    result, log = world.call("1002", 200)
    assert result.returncode == 0, log
    assert pstn.received("INVITE")


def test_no_device_and_no_fallback_answers_480_naming_why(calls):
    result, log = calls.call("1002", 480)
    assert result.returncode == 0, log
    assert 'Reason: SIP;cause=480;text="ip_phone: no ip_phone device registered"' in log
    assert "Warning: 399 sip-router" in log


def test_a_cancel_from_the_caller_cancels_every_branch_and_answers_487(calls):
    app = calls.phone("lan-app", "ring")
    web = calls.phone("lan-web", "ring")
    result, log = calls.call("1001", 487, cancel_after_ms=300, ringing=2)
    assert result.returncode == 0, log
    assert app.wait_received("CANCEL") and web.wait_received("CANCEL")
    (record,) = calls.lab.calls("lan")
    assert record["status"] == 487


def test_a_bye_from_the_caller_passes_through_to_the_phone(calls):
    desk = calls.phone("minh-desk", "answer")
    result, log = calls.call("1002", 200, bye_after_ms=100)
    assert result.returncode == 0, log
    (bye,) = desk.wait_received("BYE")
    assert "Route:" not in bye                 # the router consumed its own Route entry
    (record,) = calls.lab.calls("minh")
    assert record["duration_s"] is not None


def test_a_bye_from_the_phone_passes_through_to_the_caller(calls):
    desk = calls.phone("minh-desk", "answer_hangup")
    result, log = calls.call("1002", 200, bye_from_callee=True)
    assert result.returncode == 0, log + desk.messages()[-3000:]
    assert "BYE sip:0909000111@127.0.0.1" in log
    assert desk.wait_received("ACK")
    (record,) = calls.lab.calls("minh")
    assert record["duration_s"] is not None and record["answered_by"] == "minh-desk"


def test_a_busy_device_is_reported_busy_to_the_caller(calls):
    calls.phone("minh-desk", "busy")
    result, log = calls.call("1002", 486)
    assert result.returncode == 0, log


def test_redirect_mode_answers_302_with_the_contacts(make_calls):
    world = make_calls(edit=lambda t: t.replace("trusted_peers: [{name: acd, address: 127.0.0.1}]",
                                                "trusted_peers: [{name: acd, address: 127.0.0.1, mode: redirect}]"))
    desk = world.phone("lan-desk", "answer")
    world.phone("lan-app", "answer")
    result, log = world.call("1001", 302)
    assert result.returncode == 0, log
    reply = log.split("SIP/2.0 302")[1]
    assert "<sip:lan-desk@127.0.0.1:" in reply and "<sip:lan-app@127.0.0.1:" in reply and ";q=1" in reply
    assert desk.received("INVITE") == []


def test_an_untrusted_source_is_challenged_and_cannot_reach_the_trunk(calls):
    pstn = calls.trunk("answer")
    calls.lab.cli("set-method", "minh", "agent_phone", "--as", "minh")
    time.sleep(1.2)
    scenario = invite_flow(calls.lab.tmp / "stranger.xml", "1002", 407)
    result = calls.lab.sipp(scenario, local_ip="127.0.0.2")
    assert result.returncode == 0, calls.lab.sipp_log(scenario)
    time.sleep(0.5)
    assert pstn.received("INVITE") == []


def test_a_device_with_wrong_credentials_is_refused_403(calls):
    pstn = calls.trunk("answer")
    calls.lab.cli("set-method", "minh", "agent_phone", "--as", "minh")
    time.sleep(1.2)
    scenario = invite_flow(calls.lab.tmp / "fraud.xml", "1002", 403, proxy_auth=True)
    result = calls.lab.sipp(scenario, user="lan-app", password="guess", local_ip="127.0.0.2")
    assert result.returncode == 0, calls.lab.sipp_log(scenario)
    assert pstn.received("INVITE") == []


def test_an_authenticated_registered_device_may_call_an_agent(calls):
    desk = calls.phone("minh-desk", "answer")
    calls.phone("lan-app", "answer")
    scenario = invite_flow(calls.lab.tmp / "internal.xml", "1002", 200, proxy_auth=True)
    result = calls.lab.sipp(scenario, user="lan-app", password="app-secret", local_ip="127.0.0.2")
    assert result.returncode == 0, calls.lab.sipp_log(scenario)
    assert desk.received("INVITE")


def test_an_unknown_user_is_404_and_max_forwards_zero_is_483(calls):
    result, log = calls.call("9999", 404)
    assert result.returncode == 0, log
    result, log = calls.call("1002", 483, name="hops", max_forwards=0)
    assert result.returncode == 0, log


def test_the_router_registers_to_a_trunk_that_has_credentials(make_lab, tmp_path):
    def edit(text: str) -> str:
        return text.replace("trunk: {address: 127.0.0.1, port: ",
                            "trunk: {username: acme, password: s3cret, realm: carrier, address: 127.0.0.1, port: ")
    lab = make_lab(edit=edit, start=False)
    carrier = SippPeer("carrier", tmp_path, ["-sf", str(SCENARIOS / "trunk_registrar.xml")])
    carrier.port = lab.trunk_port
    try:
        carrier.start()
        time.sleep(0.3)
        lab.router.start()
        events = lab.router.wait_for("trunk.registration", timeout=10)
        assert any(e["code"] == 200 for e in events), lab.router.log_text()[-2000:]
        challenged, answered = carrier.wait_received("REGISTER", 2)[:2]
        assert "Authorization" not in challenged
        assert 'username="acme"' in answered and 'realm="carrier"' in answered
    finally:
        carrier.stop()


def test_a_trunk_named_by_srv_is_found_through_dns(make_calls):
    from tests.integration.dnsserver import DnsServer
    holder: dict[str, int] = {}

    def edit(text: str) -> str:
        return text.replace("trunk: {address: 127.0.0.1, port: ",
                            "trunk: {address: carrier.test, srv: true, "
                            f"nameserver: '127.0.0.1:{holder['dns']}', port: ")
    records = {}
    with DnsServer(records) as dns_server:
        holder["dns"] = dns_server.port
        world = make_calls(edit=edit, start=False)
        records[("_sip._udp.carrier.test.", "SRV")] = ["20 1 9 backup.carrier.test.",
                                                         f"10 5 {world.lab.trunk_port} pstn.carrier.test."]
        records[("pstn.carrier.test.", "A")] = ["127.0.0.1"]
        world.lab.router.start()
        resolved = world.lab.router.wait_for("trunk.resolved")[0]
        assert (resolved["address"], resolved["port"]) == ("127.0.0.1", world.lab.trunk_port)
        pstn = world.trunk("answer")
        world.lab.cli("set-method", "minh", "agent_phone", "--as", "minh")
        time.sleep(1.2)
        result, log = world.call("1002", 200)
        assert result.returncode == 0, log
        (invite,) = pstn.received("INVITE")
        assert invite.startswith("INVITE sip:84987654321@carrier.test SIP/2.0")
        assert ("_sip._udp.carrier.test.", "SRV") in dns_server.queries
