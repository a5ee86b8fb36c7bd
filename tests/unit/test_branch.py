"""The INVITE client transaction of one branch: a typed transition table with no silent gaps."""

from __future__ import annotations

import itertools

import pytest

from router.sip.branch import (
    IGNORED,
    ILLEGAL,
    REPORTS,
    TABLE,
    TIMER_B,
    Action,
    Branch,
    Event,
    IllegalTransition,
    Spec,
    State,
)
from router.sip.commands import Source
from router.sip.message import parse

INVITE = (b"INVITE sip:desk@10.1.1.1:7001 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsrx\r\n"
          b"From: <sip:0909@10.0.0.1>;tag=c1\r\nTo: <sip:1002@pbx.test>\r\nCall-ID: b-1\r\n"
          b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


def branch(transport="udp", now=100.0):
    dest = Source("10.1.1.1", 7001, transport)
    b = Branch("z9hG4bKsrx", "b-1", "desk", "sip:desk@10.1.1.1:7001", dest, INVITE,
               "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsrx", parse(INVITE), (), now,
               Spec("sip:desk@10.1.1.1:7001", "desk", dest))
    b.arm(now)
    return b


def response(status):
    return parse((f"SIP/2.0 {status} X\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsrx\r\n"
                  "From: <sip:0909@10.0.0.1>;tag=c1\r\nTo: <sip:1002@pbx.test>;tag=p\r\nCall-ID: b-1\r\n"
                  "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode())


def test_every_state_and_event_pair_is_a_transition_ignored_or_illegal_and_only_one():
    every = set(itertools.product(State, Event))
    handled, ignored, illegal = set(TABLE), set(IGNORED), set(ILLEGAL)
    assert handled | ignored | illegal == every
    assert not handled & ignored and not handled & illegal and not ignored & illegal


def test_every_action_in_the_table_is_an_action_and_the_call_gets_only_reports():
    actions = {a for _, acts in TABLE.values() for a in acts}
    assert all(isinstance(a, Action) for a in actions)
    assert REPORTS <= actions


@pytest.mark.parametrize("state, event", sorted(ILLEGAL, key=lambda p: (p[0].value, p[1].value)))
def test_an_illegal_pair_raises_instead_of_doing_nothing(state, event):
    b = branch()
    b.state = state
    with pytest.raises(IllegalTransition):
        b.step(event, 101.0)


@pytest.mark.parametrize("state, event", sorted(IGNORED, key=lambda p: (p[0].value, p[1].value)))
def test_a_late_response_is_ignored_on_purpose(state, event):
    b = branch()
    b.state = state
    step = b.step(event, 101.0, response({Event.PROVISIONAL: 180, Event.SUCCESS: 200}.get(event, 486)))
    assert step.sends == [] and step.reports == [] and b.state is state


def test_timer_a_retransmits_with_doubling_interval_until_a_response():
    b = branch()
    fired = b.fire(100.5)
    assert [e for e, _ in fired] == [Event.TIMER_A] and fired[0][1].sends[0].data == INVITE
    assert b.timers[Event.TIMER_A] == 101.5
    b.step(Event.PROVISIONAL, 101.0, response(180))
    assert Event.TIMER_A not in b.timers and Event.TIMER_B not in b.timers and Event.TIMER_C in b.timers


def test_no_response_at_all_times_out_once_and_stops_every_timer():
    b = branch()
    fired = b.fire(100.0 + TIMER_B)
    assert fired[-1][0] is Event.TIMER_B and fired[-1][1].reports == [Action.TIMED_OUT]
    assert b.state is State.TERMINATED and b.timers == {} and b.fire(1e9) == []


def test_a_cancel_before_a_provisional_waits_and_goes_with_it():
    b = branch()
    assert b.step(Event.CANCEL, 100.1).sends == []
    step = b.step(Event.PROVISIONAL, 100.2, response(180))
    assert step.reports == [Action.FORWARD_PROVISIONAL]
    (cancel,) = step.sends
    assert parse(cancel.data).method == "CANCEL" and Event.TIMER_E in b.timers


def test_a_cancel_asked_twice_is_sent_once():
    b = branch()
    b.step(Event.PROVISIONAL, 100.2, response(180))
    assert len(b.step(Event.CANCEL, 100.3).sends) == 1
    assert b.step(Event.CANCEL, 100.4).sends == []


def test_a_failure_is_acked_hop_by_hop_and_its_retransmission_acked_again():
    b = branch()
    step = b.step(Event.FAILURE, 100.2, response(486))
    assert [parse(s.data).method for s in step.sends] == ["ACK"] and step.reports == [Action.FAILED]
    again = b.step(Event.FAILURE, 100.3, response(486))
    assert [parse(s.data).method for s in again.sends] == ["ACK"] and again.reports == []


def test_over_tcp_there_is_no_retransmission_timer():
    b = branch("tcp")
    assert set(b.timers) == {Event.TIMER_B}
