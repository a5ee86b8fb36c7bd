"""What the agent page's softphone is given: the web device's HA1, never its password."""

from __future__ import annotations

from router.sip import digest
from router.web.softphone import softphone_for

EDGE = "edge: {address: 127.0.0.1, udp: 5070, tcp: 5070, internal_address: 127.0.0.2, wss: 8443}\n"


def test_with_an_edge_the_page_gets_the_web_devices_ha1_and_a_stable_instance(make_policy):
    policy = make_policy(EDGE)
    lan = policy.user("lan")
    settings = softphone_for(policy, lan)
    assert settings is not None
    assert (settings.wss_url, settings.uri, settings.auth_user, settings.device_id) == (
        "wss://127.0.0.1:8443", "sip:lan@pbx.test", "lan-web", "lan-web")
    assert settings.ha1 == digest.ha1("MD5", "lan-web", "pbx.test", "p3") and "p3" not in str(settings)
    assert settings.instance.startswith("urn:uuid:") and settings.instance == softphone_for(policy, lan).instance


def test_no_softphone_without_an_edge_or_without_a_web_device(make_policy):
    assert softphone_for(make_policy(), make_policy().user("lan")) is None          # no edge
    policy = make_policy(EDGE)
    assert softphone_for(policy, policy.user("minh")) is None                       # minh has no web device
    no_wss = make_policy(EDGE.replace("wss: 8443", "wss: off"))
    assert softphone_for(no_wss, no_wss.user("lan")) is None
