"""decide(): each receive method against each set of registered devices."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from router.policy.decide import CallRequest, Fork, PstnLeg, Redirect, Reject, decide
from router.policy.model import ReceiveMethod, RoutingMode

from .conftest import BASE, binding

NOW = 1000.0
LAN_DEVICES = {"web": "lan-web", "app": "lan-app", "ip_phone": "lan-desk"}
RINGS = {"all_devices": {"web", "app", "ip_phone"}, "app": {"web", "app"}, "ip_phone": {"ip_phone"}}


def with_method(policy, user_id, method, **changes):
    users = tuple(dataclasses.replace(u, receive_method=ReceiveMethod(method), **changes)
                  if u.id == user_id else u for u in policy.users)
    return dataclasses.replace(policy, users=users)


ALL_SUBSETS = [set(c) for n in range(4) for c in itertools.combinations(["web", "app", "ip_phone"], n)]


@pytest.mark.parametrize("method", ["all_devices", "app", "ip_phone"])
@pytest.mark.parametrize("registered", ALL_SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_each_device_method_rings_exactly_the_matching_registered_devices(policy, method, registered):
    policy = with_method(policy, "lan", method)
    bindings = [binding(LAN_DEVICES[k], k) for k in registered]
    decision = decide(policy, CallRequest(user="lan"), bindings, NOW)
    expected = registered & RINGS[method]
    if expected:
        assert isinstance(decision, Fork)
        assert {t.kind.value for t in decision.targets} == expected
        assert {t.device_id for t in decision.targets} == {LAN_DEVICES[k] for k in expected}
    else:
        assert isinstance(decision, Reject)
        assert decision.status == 480
        assert f"{method}: no" in decision.reason and "registered" in decision.reason


@pytest.mark.parametrize("registered", ALL_SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_agent_phone_dials_the_agent_from_the_queue_hotline_whatever_is_registered(policy, registered):
    policy = with_method(policy, "lan", "agent_phone")
    bindings = [binding(LAN_DEVICES[k], k) for k in registered]
    decision = decide(policy, CallRequest(user="lan"), bindings, NOW)
    assert isinstance(decision, PstnLeg)
    assert decision.number == "84912345678"
    assert decision.caller_id == "842873001234"
    assert decision.target.uri == "sip:84912345678@127.0.0.1:5080"


def test_an_agent_on_ip_phone_with_an_app_and_a_desk_phone_registered_only_the_desk_phone_rings(policy):
    bindings = [binding("minh-desk", "ip_phone", "minh"), binding("lan-app", "app", "minh")]
    decision = decide(policy, CallRequest(user="1002"), bindings, NOW)
    assert isinstance(decision, Fork)
    assert [t.device_id for t in decision.targets] == ["minh-desk"]
    assert any("skipped lan-app (app)" in n for n in decision.notes)


def test_expired_bindings_and_other_users_bindings_do_not_ring(policy):
    bindings = [binding("minh-desk", "ip_phone", "minh", expires_at=NOW - 1),
                binding("lan-desk", "ip_phone", "lan")]
    decision = decide(policy, CallRequest(user="minh"), bindings, NOW)
    assert isinstance(decision, Reject)


def test_unknown_user_is_404(policy):
    decision = decide(policy, CallRequest(user="nobody"), [], NOW)
    assert isinstance(decision, Reject) and decision.status == 404


def test_ring_timeout_comes_from_the_user_then_the_queue_then_the_default(make_policy):
    policy = make_policy()
    bindings = [binding("lan-desk", "ip_phone")]
    assert decide(policy, CallRequest(user="lan"), bindings, NOW).ring_timeout == 12
    assert decide(policy, CallRequest(user="lan", queue_header="sales"), bindings, NOW).ring_timeout == 15
    policy = with_method(policy, "lan", "all_devices", ring_timeout=7.0)
    assert decide(policy, CallRequest(user="lan"), bindings, NOW).ring_timeout == 7


class TestFallbackChain:
    def test_no_device_of_the_needed_kind_falls_back_at_once(self, policy):
        policy = with_method(policy, "minh", "ip_phone", fallback=(ReceiveMethod.AGENT_PHONE,))
        decision = decide(policy, CallRequest(user="minh"), [], NOW)
        assert isinstance(decision, PstnLeg)
        assert decision.number == "84987654321"
        assert any("ip_phone: no ip_phone device registered" in n for n in decision.notes)

    def test_a_ringing_step_says_which_step_comes_next_on_no_answer(self, policy):
        policy = with_method(policy, "minh", "ip_phone",
                             fallback=(ReceiveMethod.APP, ReceiveMethod.AGENT_PHONE))
        bindings = [binding("minh-desk", "ip_phone", "minh"), binding("minh-app", "app", "minh")]
        first = decide(policy, CallRequest(user="minh"), bindings, NOW)
        assert isinstance(first, Fork) and first.method is ReceiveMethod.IP_PHONE and first.next_step == 1
        second = decide(policy, CallRequest(user="minh", step=first.next_step), bindings, NOW)
        assert isinstance(second, Fork) and second.method is ReceiveMethod.APP and second.next_step == 2
        assert [t.device_id for t in second.targets] == ["minh-app"]
        third = decide(policy, CallRequest(user="minh", step=second.next_step), bindings, NOW)
        assert isinstance(third, PstnLeg) and third.next_step is None

    def test_deployment_default_fallback_applies_when_the_user_has_none(self, make_policy):
        policy = make_policy(base=BASE.replace("routing: {{fallback: []}}",
                                               "routing: {{fallback: [agent_phone]}}"))
        decision = decide(policy, CallRequest(user="lan"), [], NOW)
        assert isinstance(decision, PstnLeg)

    def test_a_user_fallback_of_none_overrides_the_default(self, policy):
        policy = with_method(policy, "lan", "ip_phone", fallback=())
        decision = decide(policy, CallRequest(user="lan"), [], NOW)
        assert isinstance(decision, Reject) and decision.status == 480

    def test_the_chain_never_repeats_a_method(self, policy):
        policy = with_method(policy, "lan", "ip_phone",
                             fallback=(ReceiveMethod.IP_PHONE, ReceiveMethod.IP_PHONE))
        decision = decide(policy, CallRequest(user="lan"), [binding("lan-desk", "ip_phone")], NOW)
        assert isinstance(decision, Fork) and decision.next_step is None

    def test_when_every_step_fails_the_reason_names_each_failure(self, policy):
        policy = with_method(policy, "minh", "ip_phone", fallback=(ReceiveMethod.AGENT_PHONE,),
                             agent_phone=None)
        decision = decide(policy, CallRequest(user="minh"), [], NOW)
        assert isinstance(decision, Reject) and decision.status == 480
        assert "no ip_phone device registered" in decision.reason
        assert "no valid agent phone number" in decision.reason


class TestQueueAndHotline:
    def test_the_queue_header_wins(self, policy):
        policy = with_method(policy, "lan", "agent_phone")
        d = decide(policy, CallRequest(user="lan", queue_header="sales", called_number="842873001235"), [], NOW)
        assert d.queue_id == "sales" and d.caller_id == "842873009999"

    def test_the_called_did_selects_the_queue_without_a_header(self, policy):
        policy = with_method(policy, "minh", "agent_phone")
        d = decide(policy, CallRequest(user="minh", called_number="842873001235"), [], NOW)
        assert d.queue_id == "support" and d.caller_id == "842873001234"

    def test_the_called_hotline_selects_its_queue(self, policy):
        policy = with_method(policy, "minh", "agent_phone")
        d = decide(policy, CallRequest(user="minh", called_number="842873001234"), [], NOW)
        assert d.queue_id == "support"

    def test_the_users_default_queue_is_last(self, policy):
        policy = with_method(policy, "minh", "agent_phone")
        d = decide(policy, CallRequest(user="minh", called_number="84900000000"), [], NOW)
        assert d.queue_id == "sales"

    def test_an_unknown_queue_header_is_noted_and_resolution_goes_on(self, policy):
        policy = with_method(policy, "minh", "agent_phone")
        d = decide(policy, CallRequest(user="minh", queue_header="nope"), [], NOW)
        assert d.queue_id == "sales"
        assert "unknown queue 'nope'" in d.notes[0]

    def test_a_queue_without_hotline_refuses_agent_phone_with_a_clear_reason(self, policy):
        policy = with_method(policy, "minh", "agent_phone")
        d = decide(policy, CallRequest(user="minh", queue_header="nohotline"), [], NOW)
        assert isinstance(d, Reject) and d.status == 480
        assert "queue 'nohotline' has no hotline" in d.reason

    def test_a_caller_that_may_not_use_the_trunk_never_gets_a_pstn_leg(self, policy):
        policy = with_method(policy, "minh", "agent_phone")
        d = decide(policy, CallRequest(user="minh", may_use_trunk=False), [], NOW)
        assert isinstance(d, Reject) and "not allowed to reach the PSTN trunk" in d.reason


class TestRedirect:
    def test_redirect_lists_the_devices_then_the_fallback_at_lower_q(self, policy):
        policy = with_method(policy, "minh", "ip_phone", fallback=(ReceiveMethod.AGENT_PHONE,))
        bindings = [binding("minh-desk", "ip_phone", "minh")]
        d = decide(policy, CallRequest(user="minh", mode=RoutingMode.REDIRECT), bindings, NOW)
        assert isinstance(d, Redirect)
        assert [(t.uri, t.q) for t in d.targets] == [
            (bindings[0].contact, 1.0), ("sip:84987654321@127.0.0.1:5080", 0.5)]

    def test_redirect_for_agent_phone_is_the_trunk_uri_of_the_number(self, policy):
        policy = with_method(policy, "minh", "agent_phone", fallback=())
        d = decide(policy, CallRequest(user="minh", mode=RoutingMode.REDIRECT), [], NOW)
        assert isinstance(d, Redirect)
        assert [t.uri for t in d.targets] == ["sip:84987654321@127.0.0.1:5080"]

    def test_redirect_with_nothing_to_offer_is_480(self, policy):
        d = decide(policy, CallRequest(user="minh", mode=RoutingMode.REDIRECT), [], NOW)
        assert isinstance(d, Reject) and d.status == 480
