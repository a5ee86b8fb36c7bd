"""The forking proxy as a pure state machine: INVITE and responses in, messages out, clock passed in."""

from __future__ import annotations

import dataclasses

import pytest

from router.config import parse_policy
from router.policy.model import Binding, DeviceKind, ReceiveMethod
from router.sip import digest
from router.sip.branch import TABLE, Action, Event, State
from router.sip.commands import Log, SaveCall, Send, Source
from router.sip.core import SipCore
from router.sip.forward import Local
from router.sip.message import parse

POLICY = """
domain: pbx.test
trunk: {address: 10.9.9.9, port: 5080}
trusted_peers: [{name: acd, address: 10.0.0.1}]
queues: [{id: q, hotline: "842873001234"}, {id: nohot}]
users:
  - id: minh
    extension: "1002"
    receive_method: all_devices
    agent_phone: "84987654321"
    default_queue: q
    ring_timeout: 5
    fallback: [agent_phone]
    devices:
      - {id: desk, kind: ip_phone, password: a}
      - {id: app, kind: app, password: b}
"""
ACD = Source("10.0.0.1", 5060)
LOCAL = Local("10.0.0.2", 5060)


def binding(device: str, kind: str, port: int) -> Binding:
    return Binding("minh", device, DeviceKind(kind), f"sip:{device}@10.1.1.{port % 250}:{port}", 1e9,
                   source_host="10.1.1.1", source_port=port)


@pytest.fixture
def core(tmp_path):
    policy = parse_policy(POLICY, str(tmp_path / "r.yaml"))
    return SipCore(policy, [binding("desk", "ip_phone", 7001), binding("app", "app", 7002)], 1000.0,
                   local=LOCAL)


def invite(branch="z9hG4bKacd1", extra="", user="1002", mf=70):
    return (f"INVITE sip:{user}@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch={branch}\r\n"
            f"From: <sip:0909@10.0.0.1>;tag=c1\r\nTo: <sip:{user}@pbx.test>\r\nCall-ID: call-1\r\n"
            f"CSeq: 1 INVITE\r\nContact: <sip:0909@10.0.0.1>\r\nMax-Forwards: {mf}\r\n{extra}"
            "Content-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n").encode()


def sent(commands, host=None, port=None):
    return [parse(c.data) for c in commands if isinstance(c, Send)
            and (host is None or c.host == host) and (port is None or c.port == port)]


def answer(request, status, reason="", tag="dev", extra=""):
    """A response from a phone to a request the router sent it."""
    vias = "".join(f"Via: {v}\r\n" for v in request.all("via"))
    to = request.header("to") + (f";tag={tag}" if status > 100 else "")
    return (f"SIP/2.0 {status} {reason or 'X'}\r\n{vias}From: {request.header('from')}\r\nTo: {to}\r\n"
            f"Call-ID: {request.call_id}\r\nCSeq: {request.header('cseq')}\r\n{extra}"
            "Content-Length: 0\r\n\r\n").encode()


def start(core):
    out = core.on_request(invite(), ACD, 1000.0)
    branches = {m.uri.split("@")[0][4:]: m for m in sent(out) if m.is_request}
    return out, branches


def test_all_devices_forks_to_each_device_where_it_registered_from_and_sends_100(core):
    out, branches = start(core)
    assert set(branches) == {"desk", "app"}
    to_phones = [c for c in out if isinstance(c, Send) and c.host == "10.1.1.1"]
    assert sorted(c.port for c in to_phones) == [7001, 7002]
    assert [m.status for m in sent(out, "10.0.0.1")] == [100]
    desk = branches["desk"]
    assert desk.all("record-route") == ["<sip:10.0.0.2:5060;lr>"]
    assert desk.all("via")[0].startswith("SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsr")
    assert desk.header("max-forwards") == "69" and desk.body == b"v=0\n"


def test_the_first_2xx_is_forwarded_and_the_other_branch_is_cancelled_with_reason(core):
    _, branches = start(core)
    core.on_response(answer(branches["app"], 180, "Ringing", tag="a"), Source("10.1.1.1", 7002), 1000.5)
    out = core.on_response(answer(branches["desk"], 200, "OK"), Source("10.1.1.1", 7001), 1001.0)
    (ok,) = sent(out, "10.0.0.1")
    assert ok.status == 200 and len(ok.all("via")) == 1          # our Via is gone
    (cancel,) = [m for m in sent(out, "10.1.1.1", 7002) if m.method == "CANCEL"]
    assert cancel.header("reason") == 'SIP;cause=200;text="Call completed elsewhere"'
    assert cancel.top_via.branch == branches["app"].top_via.branch
    record = next(c.record for c in out if isinstance(c, SaveCall))
    assert record.answered_by == "desk" and record.status == 200


def test_a_cancel_before_any_provisional_waits_for_one(core):
    _, branches = start(core)
    out = core.on_response(answer(branches["desk"], 200, "OK"), Source("10.1.1.1", 7001), 1001.0)
    assert [m for m in sent(out, "10.1.1.1", 7002) if m.method == "CANCEL"] == []   # §9.1
    later = core.on_response(answer(branches["app"], 180, "Ringing"), Source("10.1.1.1", 7002), 1001.1)
    assert sent(later, "10.0.0.1") == []            # the call is answered: no more ringing upstream
    assert [m.method for m in sent(later, "10.1.1.1", 7002)] == ["CANCEL"]


def test_provisional_responses_are_forwarded_but_100_is_not(core):
    _, branches = start(core)
    assert sent(core.on_response(answer(branches["desk"], 100), Source("10.1.1.1", 7001), 1000.1)) == []
    (ringing,) = sent(core.on_response(answer(branches["desk"], 180, "Ringing"), Source("10.1.1.1", 7001), 1000.2))
    assert ringing.status == 180


def test_a_retransmitted_invite_gets_the_last_response_again_and_is_not_forked_twice(core):
    _, branches = start(core)
    core.on_response(answer(branches["desk"], 180, "Ringing"), Source("10.1.1.1", 7001), 1000.2)
    out = core.on_request(invite(), ACD, 1000.5)
    assert [m.status for m in sent(out)] == [180]


def test_a_call_that_rings_wakes_the_router_only_for_its_ring_timeout(core):
    """Both phones ring at once: their INVITEs' retransmission timers stopped, so the loop
    has nothing to do for this call before its ring timeout (5 s) and does not wake for it."""
    _, branches = start(core)
    assert core.proxy.next_timer() == pytest.approx(1000.5)     # Timer A: nothing heard yet
    for name, port in (("desk", 7001), ("app", 7002)):
        core.on_response(answer(branches[name], 180, "Ringing", tag=name), Source("10.1.1.1", port), 1000.01)
    assert core.proxy.next_timer() == pytest.approx(1005.0)


def test_far_deadlines_of_calls_in_one_second_share_a_wake_up(core):
    """Calls answered a few milliseconds apart linger 32 s for retransmissions; they are
    forgotten together, at a quarter-second mark, not one wake-up each."""
    for n, at in enumerate((1000.01, 1000.07, 1000.16)):
        out = core.on_request(invite(branch=f"z9hG4bKacd{n}").replace(b"call-1", b"call-%d" % n), ACD, at)
        desk, app = (next(m for m in sent(out, "10.1.1.1", port) if m.is_request) for port in (7001, 7002))
        core.on_response(answer(app, 180, "Ringing", tag="a"), Source("10.1.1.1", 7002), at + 0.001)
        out = core.on_response(answer(desk, 200, "OK"), Source("10.1.1.1", 7001), at + 0.002)
        (cancel,) = [m for m in sent(out, "10.1.1.1", 7002) if m.method == "CANCEL"]
        core.on_response(answer(cancel, 200, "OK", tag="a"), Source("10.1.1.1", 7002), at + 0.003)
        core.on_response(answer(app, 487, "Request Terminated", tag="a"), Source("10.1.1.1", 7002), at + 0.004)
    marks = sorted({call.wake_at for call in core.proxy.calls.values()})
    assert marks == [1032.25]                    # 32 s after the answers, rounded up to 0.25 s
    core.handle_timer(1032.2)
    assert len(core.proxy.calls) == 3            # not yet: at most a quarter second late
    core.handle_timer(1032.25)
    assert not core.proxy.calls


def test_ring_timeout_cancels_every_branch_and_falls_back_to_agent_phone(core):
    _, branches = start(core)
    for name, port in (("desk", 7001), ("app", 7002)):
        core.on_response(answer(branches[name], 180, "Ringing", tag=name), Source("10.1.1.1", port), 1000.2)
    assert core.next_timer() <= 1005.0
    out = core.handle_timer(1005.0)
    cancels = [m for m in sent(out) if m.method == "CANCEL"]
    assert len(cancels) == 2 and all("Ring timeout" in m.header("reason") for m in cancels)
    (pstn,) = [m for m in sent(out, "10.9.9.9", 5080) if m.method == "INVITE"]
    assert pstn.uri == "sip:84987654321@10.9.9.9:5080"
    assert pstn.header("p-asserted-identity") == "<sip:842873001234@10.9.9.9>"
    assert pstn.header("diversion").startswith("<sip:1002@pbx.test>")


def test_when_every_branch_fails_the_fallback_is_tried(core):
    _, branches = start(core)
    core.on_response(answer(branches["desk"], 480, "Unavailable"), Source("10.1.1.1", 7001), 1000.1)
    out = core.on_response(answer(branches["app"], 408, "Timeout"), Source("10.1.1.1", 7002), 1000.2)
    acks = [m for m in sent(out, "10.1.1.1") if m.method == "ACK"]
    assert len(acks) == 1 and acks[0].top_via.branch == branches["app"].top_via.branch
    assert [m.uri for m in sent(out, "10.9.9.9")] == ["sip:84987654321@10.9.9.9:5080"]


def test_busy_everywhere_is_answered_busy_not_fallen_back(core):
    _, branches = start(core)
    core.on_response(answer(branches["desk"], 486, "Busy Here"), Source("10.1.1.1", 7001), 1000.1)
    out = core.on_response(answer(branches["app"], 486, "Busy Here"), Source("10.1.1.1", 7002), 1000.2)
    assert [m.status for m in sent(out, "10.0.0.1")] == [486]
    assert sent(out, "10.9.9.9") == []


def test_a_cancel_from_the_caller_cancels_the_branches_and_answers_487(core):
    _, branches = start(core)
    for name, port in (("desk", 7001), ("app", 7002)):
        core.on_response(answer(branches[name], 180, "Ringing", tag=name), Source("10.1.1.1", port), 1000.2)
    cancel = invite().replace(b"INVITE sip", b"CANCEL sip").replace(b"1 INVITE", b"1 CANCEL")
    out = core.on_request(cancel, ACD, 1001.0)
    statuses = [(m.status, m.method) for m in sent(out, "10.0.0.1")]
    assert statuses == [(200, "CANCEL"), (487, "INVITE")]
    assert len([m for m in sent(out, "10.1.1.1") if m.method == "CANCEL"]) == 2


def test_the_ack_of_our_final_failure_is_absorbed(core):
    core.policy = dataclasses.replace(core.policy, users=tuple(
        dataclasses.replace(u, fallback=(), receive_method=ReceiveMethod.AGENT_PHONE, default_queue="nohot")
        for u in core.policy.users))
    out = core.on_request(invite(), ACD, 1000.0)
    (final,) = sent(out, "10.0.0.1")
    assert final.status == 480 and "no hotline" in final.header("reason")
    ack = invite().replace(b"INVITE sip", b"ACK sip").replace(b"1 INVITE", b"1 ACK")
    assert sent(core.on_request(ack, ACD, 1000.1)) == []


def test_in_dialog_requests_go_between_the_two_ends_only(core):
    _, branches = start(core)
    core.on_response(answer(branches["desk"], 200, "OK", tag="d1"), Source("10.1.1.1", 7001), 1001.0)
    bye = (b"BYE sip:desk@10.1.1.1:7001 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKbye\r\n"
           b"Route: <sip:10.0.0.2:5060;lr>\r\nFrom: <sip:0909@10.0.0.1>;tag=c1\r\n"
           b"To: <sip:1002@pbx.test>;tag=d1\r\nCall-ID: call-1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    out = core.on_request(bye, ACD, 1010.0)
    (forwarded,) = sent(out, "10.1.1.1", 7001)
    assert forwarded.method == "BYE" and forwarded.all("route") == []
    record = next(c.record for c in out if isinstance(c, SaveCall))
    assert record.ended_at == 1010.0
    stranger = bye.replace(b"call-1", b"call-9")
    assert [m.status for m in sent(core.on_request(stranger, ACD, 1010.0))] == [481]


def test_an_untrusted_caller_is_challenged_and_nothing_is_forwarded(core):
    out = core.on_request(invite(), Source("192.0.2.66", 5060), 1000.0)
    (challenge,) = sent(out)
    assert challenge.status == 407 and challenge.all("proxy-authenticate")
    assert any(isinstance(c, Log) and c.event == "call.refused" for c in out)


def test_max_forwards_zero_is_483_and_an_unknown_user_404(core):
    assert sent(core.on_request(invite(mf=0), ACD, 1000.0))[0].status == 483
    assert sent(core.on_request(invite(branch="z9hG4bKx", user="77"), ACD, 1000.0))[0].status == 404


def test_a_request_that_comes_back_through_us_is_a_loop(core):
    _, branches = start(core)
    looped = branches["desk"]
    data = (f"INVITE {looped.uri} SIP/2.0\r\n" + "".join(f"Via: {v}\r\n" for v in looped.all("via"))
            + "".join(f"{n}: {v}\r\n" for n, v in looped.headers if n not in ("via", "content-length"))
            + "Content-Length: 0\r\n\r\n").encode()
    # the loop hash covers the Request-URI: make the loop arrive with the URI the proxy first saw
    data = data.replace(looped.uri.encode(), b"sip:1002@10.0.0.2", 1)
    assert sent(core.on_request(data, Source("10.1.1.1", 7001), 1000.3))[0].status == 482


def test_redirect_mode_answers_302_with_q_values(tmp_path):
    policy = parse_policy(POLICY.replace("address: 10.0.0.1}", "address: 10.0.0.1, mode: redirect}"),
                          str(tmp_path / "r.yaml"))
    core = SipCore(policy, [binding("desk", "ip_phone", 7001)], 1000.0, local=LOCAL)
    (reply,) = sent(core.on_request(invite(), ACD, 1000.0))
    assert reply.status == 302
    assert reply.all("contact") == ["<sip:desk@10.1.1.1:7001>;q=1", "<sip:84987654321@10.9.9.9:5080>;q=0.5"]


def test_the_branch_table_answers_every_response_in_every_live_state():
    for state in (State.CALLING, State.PROCEEDING):
        for event in (Event.PROVISIONAL, Event.SUCCESS, Event.FAILURE, Event.CANCEL):
            assert (state, event) in TABLE
    assert TABLE[(State.CALLING, Event.CANCEL)][1] == (Action.PEND_CANCEL,)     # §9.1: wait for a 1xx
    assert Action.CANCEL_IF_PENDING in TABLE[(State.CALLING, Event.PROVISIONAL)][1]


def test_a_trunk_challenge_is_answered_once_with_the_trunk_credentials_and_the_next_cseq(tmp_path):
    policy = parse_policy(POLICY.replace("trunk: {address: 10.9.9.9, port: 5080}",
                                         "trunk: {address: 10.9.9.9, port: 5080, username: acme, password: s3cret}")
                          .replace("receive_method: all_devices", "receive_method: agent_phone"),
                          str(tmp_path / "r.yaml"))
    core = SipCore(policy, [], 1000.0, local=LOCAL)
    (leg,) = [m for m in sent(core.on_request(invite(), ACD, 1000.0), "10.9.9.9") if m.method == "INVITE"]
    challenge = answer(leg, 407, "Proxy Authentication Required", tag="t",
                       extra='Proxy-Authenticate: Digest realm="carrier", nonce="n1", qop="auth", algorithm=MD5\r\n')
    out = core.on_response(challenge, Source("10.9.9.9", 5080), 1000.1)
    ack, again = [m for m in sent(out, "10.9.9.9")]
    assert ack.method == "ACK" and ack.cseq == (1, "ACK")
    assert again.method == "INVITE" and again.cseq == (2, "INVITE")
    assert again.header("proxy-authorization").startswith('Digest username="acme", realm="carrier"')
    ok = core.on_response(answer(again, 200, "OK", tag="t2"), Source("10.9.9.9", 5080), 1000.2)
    (to_caller,) = sent(ok, "10.0.0.1")
    assert to_caller.status == 200 and to_caller.cseq == (1, "INVITE")     # the caller's own CSeq
    bye = (b"BYE sip:84987654321@10.9.9.9:5080 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKb\r\n"
           b"From: <sip:0909@10.0.0.1>;tag=c1\r\nTo: <sip:1002@pbx.test>;tag=t2\r\nCall-ID: call-1\r\n"
           b"CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    (forwarded,) = sent(core.on_request(bye, ACD, 1001.0), "10.9.9.9")
    assert forwarded.cseq == (3, "BYE")
    second = core.on_response(answer(again, 407, "Again", tag="t3",
                                     extra='Proxy-Authenticate: Digest realm="carrier", nonce="n2"\r\n'),
                              Source("10.9.9.9", 5080), 1000.3)
    assert [m.method for m in sent(second, "10.9.9.9")] in ([], ["ACK"])   # never a second retry


def test_caller_id_by_from_rewrite_shows_the_hotline_and_restores_the_callers_from(tmp_path):
    policy = parse_policy(POLICY.replace("trunk: {address: 10.9.9.9, port: 5080}",
                                         "trunk: {address: 10.9.9.9, port: 5080, caller_id: from}")
                          .replace("receive_method: all_devices", "receive_method: agent_phone"),
                          str(tmp_path / "r.yaml"))
    core = SipCore(policy, [], 1000.0, local=LOCAL)
    (leg,) = [m for m in sent(core.on_request(invite(), ACD, 1000.0), "10.9.9.9") if m.method == "INVITE"]
    assert leg.header("from") == '"842873001234" <sip:842873001234@pbx.test>;tag=c1'
    (to_caller,) = sent(core.on_response(answer(leg, 200, "OK", tag="t"), Source("10.9.9.9", 5080), 1000.1),
                        "10.0.0.1")
    assert to_caller.header("from") == "<sip:0909@10.0.0.1>;tag=c1"


def _answered(core):
    _, branches = start(core)
    core.on_response(answer(branches["desk"], 200, "OK", tag="d1"), Source("10.1.1.1", 7001), 1001.0)
    return branches


def _bye(from_tag="c1", to_tag="d1", branch="z9hG4bKbye", via="10.0.0.1:5060"):
    return (f"BYE sip:desk@10.1.1.1:7001 SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch={branch}\r\n"
            f"Route: <sip:10.0.0.2:5060;lr>\r\nFrom: <sip:0909@10.0.0.1>;tag={from_tag}\r\n"
            f"To: <sip:1002@pbx.test>;tag={to_tag}\r\nCall-ID: call-1\r\nCSeq: 2 BYE\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def test_a_stranger_who_knows_the_call_id_and_tags_cannot_hang_up_the_call(core):
    _answered(core)
    stranger = Source("192.0.2.66", 5060)
    out = core.on_request(_bye(via="192.0.2.66:5060"), stranger, 1010.0)
    assert [(m.status, c.host) for c, m in zip([c for c in out if isinstance(c, Send)], sent(out), strict=True)] \
        == [(403, "192.0.2.66")]                               # refused, and nothing forwarded to the phone
    assert any(isinstance(c, Log) and c.event == "call.in_dialog.refused" and c.level == "warning" for c in out)
    assert not any(isinstance(c, SaveCall) for c in out)      # the call goes on
    (forwarded,) = sent(core.on_request(_bye(), ACD, 1011.0), "10.1.1.1", 7001)   # the real caller still can
    assert forwarded.method == "BYE"


def test_a_stranger_cannot_pose_as_the_callee_either(core):
    _answered(core)
    reinvite = _bye(from_tag="d1", to_tag="c1").replace(b"BYE", b"INVITE").replace(b"2 INVITE", b"5 INVITE")
    out = core.on_request(reinvite, Source("10.1.1.9", 7001), 1010.0)      # another host
    assert [m.status for m in sent(out)] == [403]
    out = core.on_request(reinvite.replace(b"z9hG4bKbye", b"z9hG4bKok"), Source("10.1.1.1", 7099), 1010.0)
    (forwarded,) = sent(out, "10.0.0.1", 5060)    # the answering phone, its NAT rebound to a new port
    assert forwarded.method == "INVITE"


def test_a_stray_ack_from_a_stranger_is_dropped_and_logged_not_forwarded(core):
    _answered(core)
    ack = _bye(via="192.0.2.66:5060").replace(b"BYE", b"ACK").replace(b"2 ACK", b"1 ACK")
    out = core.on_request(ack, Source("192.0.2.66", 5060), 1010.0)
    assert sent(out) == [] and any(isinstance(c, Log) and c.event == "call.in_dialog.refused" for c in out)


def test_a_phone_ringing_longer_than_timer_b_is_not_timed_out(tmp_path):
    policy = parse_policy(POLICY.replace("ring_timeout: 5", "ring_timeout: 60"), str(tmp_path / "r.yaml"))
    core = SipCore(policy, [binding("desk", "ip_phone", 7001), binding("app", "app", 7002)], 1000.0, local=LOCAL)
    _, branches = start(core)
    for name, port in (("desk", 7001), ("app", 7002)):
        core.on_response(answer(branches[name], 180, "Ringing", tag=name), Source("10.1.1.1", port), 1000.2)
    out = core.handle_timer(1040.0)                            # past 64*T1 = 32 s, before the ring timeout
    assert [m for m in sent(out) if m.method != "OPTIONS"] == []   # no CANCEL, no 408 to the caller
    out = core.handle_timer(1060.0)
    assert len([m for m in sent(out) if m.method == "CANCEL"]) == 2


@pytest.mark.parametrize("to", ["<mailto:x@y>", "<urn:service:sos>", "<sip:>", "tel:+84-28", "garbage"])
def test_a_trusted_invite_with_an_odd_to_header_is_still_routed(core, to):
    out = core.on_request(invite().replace(b"To: <sip:1002@pbx.test>", f"To: {to}".encode()), ACD, 1000.0)
    assert [m.status for m in sent(out, "10.0.0.1")] == [100]      # the phones ring; the caller hears 100
    assert len([m for m in sent(out, "10.1.1.1") if m.method == "INVITE"]) == 2
    assert not any(isinstance(c, Log) and c.event == "sip.core.error" for c in out)


@pytest.mark.parametrize("uri, status", [("mailto:1002@pbx.test", 416), ("sip:1002@[::1", 400)])
def test_an_invite_whose_request_uri_cannot_be_read_gets_a_final_answer(core, uri, status):
    out = core.on_request(invite().replace(b"INVITE sip:1002@10.0.0.2 ", f"INVITE {uri} ".encode()), ACD, 1000.0)
    assert [m.status for m in sent(out)] == [status]


def test_a_bug_while_routing_still_answers_the_caller_500_and_logs_the_traceback(core, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(core.proxy, "on_invite", broken)
    out = core.on_request(invite(), ACD, 1000.0)
    assert [m.status for m in sent(out, "10.0.0.1")] == [500]
    (error,) = [c for c in out if isinstance(c, Log) and c.event == "sip.core.error"]
    assert error.level == "error" and "KeyError: 'a bug'" in dict(error.fields)["traceback"]
    again = core.on_request(invite(), ACD, 1000.5)                 # its retransmission: the same 500
    assert [m.status for m in sent(again)] == [500]


def test_a_bug_on_a_response_is_logged_and_the_next_response_still_handled(core, monkeypatch):
    _, branches = start(core)
    real = core.proxy.on_response
    monkeypatch.setattr(core.proxy, "on_response", lambda *_a: (_ for _ in ()).throw(ValueError("bug")))
    out = core.on_response(answer(branches["desk"], 180, "Ringing"), Source("10.1.1.1", 7001), 1000.2)
    assert [c.event for c in out if isinstance(c, Log)] == ["sip.core.error"]
    monkeypatch.setattr(core.proxy, "on_response", real)
    (ok,) = sent(core.on_response(answer(branches["desk"], 200, "OK"), Source("10.1.1.1", 7001), 1001.0))
    assert ok.status == 200


def test_a_bug_in_one_calls_timers_answers_that_caller_500_and_leaves_the_others_alone(core):
    _, branches = start(core)
    second = invite(branch="z9hG4bKacd2").replace(b"call-1", b"call-2")
    core.on_request(second, ACD, 1000.0)
    first = next(c for c in core.proxy.calls.values() if c.call_id == "call-1")
    for b in first.branches.values():
        b.fire = lambda _now: (_ for _ in ()).throw(KeyError("bug"))  # type: ignore[method-assign]
    out = core.handle_timer(1000.5)                            # Timer A is due on both calls
    assert [(m.status, m.call_id) for m in sent(out, "10.0.0.1") if not m.is_request] == [(500, "call-1")]
    assert [c.event for c in out if isinstance(c, Log) and c.level == "error"] == ["sip.core.error"]
    assert {m.call_id for m in sent(out, "10.1.1.1") if m.method == "INVITE"} == {"call-2"}  # call 2 retransmits


def test_a_cancel_from_someone_other_than_the_caller_is_refused_and_the_phones_keep_ringing(core):
    _, branches = start(core)
    for name, port in (("desk", 7001), ("app", 7002)):
        core.on_response(answer(branches[name], 180, "Ringing", tag=name), Source("10.1.1.1", port), 1000.2)
    cancel = invite().replace(b"INVITE sip", b"CANCEL sip").replace(b"1 INVITE", b"1 CANCEL")
    out = core.on_request(cancel, Source("192.0.2.66", 5060), 1001.0)
    assert [m.status for m in sent(out)] == [403]
    assert [m for m in sent(out, "10.1.1.1") if m.method == "CANCEL"] == []
    out = core.on_request(cancel, ACD, 1001.5)                 # the caller's own CANCEL still works
    assert [(m.status, m.method) for m in sent(out, "10.0.0.1")] == [(200, "CANCEL"), (487, "INVITE")]


def test_a_call_past_its_linger_time_waits_for_a_cancelled_phone_and_never_stalls_the_timer(core):
    _, branches = start(core)
    cancel = invite().replace(b"INVITE sip", b"CANCEL sip").replace(b"1 INVITE", b"1 CANCEL")
    core.on_request(cancel, ACD, 1000.2)                    # before any provisional: the CANCELs wait
    out = []
    for name, port in (("desk", 7001), ("app", 7002)):
        out += core.on_response(answer(branches[name], 100, "Trying"), Source("10.1.1.1", port), 1003.0)
    cancels = [m for m in sent(out) if m.method == "CANCEL"]
    assert len(cancels) == 2
    for c, port in zip(cancels, (7001, 7002), strict=True):   # the phones take the CANCEL but their 487 is lost
        core.on_response(answer(c, 200, "OK"), Source("10.1.1.1", port), 1003.1)
    core.handle_timer(1032.3)                               # past linger: returns (it used to spin for ever)
    assert core.proxy.calls                                 # the branches are not done yet
    assert core.proxy.next_timer() == pytest.approx(1035.0)  # Timer B of the CANCELled branches
    core.handle_timer(1035.0)                               # Timer B: the branches are done
    core.handle_timer(1035.01)                              # and the call is forgotten on the next pass
    assert not core.proxy.calls and not core.proxy.by_branch and core.proxy.next_timer() is None


def test_two_phones_answering_at_once_make_two_dialogs_each_reached_by_its_own_bye(core):
    _, branches = start(core)
    out = core.on_response(answer(branches["desk"], 200, "OK", tag="d1"), Source("10.1.1.1", 7001), 1001.0)
    out += core.on_response(answer(branches["app"], 200, "OK", tag="a1"), Source("10.1.1.1", 7002), 1001.0)
    assert [m.status for m in sent(out, "10.0.0.1")] == [200, 200]       # both go to the caller (§16.7)
    bye_app = _bye(to_tag="a1", branch="z9hG4bKbye2")
    (to_app,) = sent(core.on_request(bye_app, ACD, 1002.0), "10.1.1.1")
    assert to_app.method == "BYE"
    to_desk = sent(core.on_request(_bye(), ACD, 1003.0), "10.1.1.1")
    assert [m.method for m in to_desk] == ["BYE"]
    records = [c.record for c in core.on_request(_bye(branch="z9hG4bKbye3"), ACD, 1003.5) if isinstance(c, SaveCall)]
    assert records == []                                    # the call record was completed once, by desk's BYE


def test_the_trunk_may_hang_up_from_another_port_of_its_host(tmp_path):
    policy = parse_policy(POLICY.replace("fallback: [agent_phone]", "fallback: []")
                          .replace("receive_method: all_devices", "receive_method: agent_phone"),
                          str(tmp_path / "r.yaml"))
    core = SipCore(policy, [], 1000.0, local=LOCAL)
    out = core.on_request(invite(), ACD, 1000.0)
    (leg,) = [m for m in sent(out, "10.9.9.9", 5080) if m.method == "INVITE"]
    core.on_response(answer(leg, 200, "OK", tag="t1"), Source("10.9.9.9", 5080), 1001.0)
    bye = (f"BYE sip:0909@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKtb\r\n"
           f"From: {leg.header('to')};tag=t1\r\nTo: {leg.header('from')}\r\nCall-ID: call-1\r\n"
           "CSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n").encode()
    (forwarded,) = sent(core.on_request(bye, Source("10.9.9.9", 5060), 1010.0), "10.0.0.1")
    assert forwarded.method == "BYE"


def test_a_late_challenge_from_the_trunk_after_a_phone_answered_is_not_answered(core):
    _, branches = start(core)
    for name, port in (("desk", 7001), ("app", 7002)):
        core.on_response(answer(branches[name], 180, "Ringing", tag=name), Source("10.1.1.1", port), 1000.2)
    out = core.handle_timer(1005.0)                         # ring timeout: the PSTN leg starts
    (leg,) = [m for m in sent(out, "10.9.9.9", 5080) if m.method == "INVITE"]
    core.on_response(answer(branches["desk"], 200, "OK", tag="d1"), Source("10.1.1.1", 7001), 1005.1)
    late = core.on_response(answer(leg, 407, "Proxy Authentication Required", tag="t",
                                   extra='Proxy-Authenticate: Digest realm="c", nonce="n"\r\n'),
                            Source("10.9.9.9", 5080), 1005.2)
    assert [m.method for m in sent(late, "10.9.9.9")] == ["ACK"]     # ACKed, and no new INVITE


def _digest(core, header, method, uri, username, password, now, nc="00000001"):
    nonce = core.auth.nonces.issue(now)
    ha1 = digest.ha1("MD5", username, "pbx.test", password)
    response = digest.response("MD5", ha1, nonce, method, uri, "auth", nc, "abc")
    return (f'{header}: Digest username="{username}", realm="pbx.test", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm=MD5, qop=auth, nc={nc}, cnonce="abc"\r\n')


def test_bad_registers_naming_a_desk_phone_do_not_stop_its_owner_calling(core):
    """A stranger can lock a username out of registering for a minute; calls are not locked."""
    attacker = Source("192.0.2.66", 5060)
    for i in range(6):                                         # past max_auth_failures (5)
        bad = (f"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.66;branch=z9hG4bKbad{i}\r\n"
               f"From: <sip:1002@pbx.test>;tag=x\r\nTo: <sip:1002@pbx.test>\r\nCall-ID: bad-{i}\r\n"
               f"CSeq: {i + 1} REGISTER\r\n"
               + _digest(core, "Authorization", "REGISTER", "sip:pbx.test", "desk", "wrong", 1000.0)
               + "Content-Length: 0\r\n\r\n").encode()
        core.on_request(bad, attacker, 1000.0)
    desk = Source("10.1.1.1", 7001)                           # registered from here (the fixture)
    call = invite(branch="z9hG4bKdesk", user="0909123456").replace(b"Via: SIP/2.0/UDP 10.0.0.1:5060",
                                                                    b"Via: SIP/2.0/UDP 10.1.1.1:7001")
    call = call.replace(b"Content-Type", _digest(core, "Proxy-Authorization", "INVITE", "sip:0909123456@10.0.0.2",
                                                 "desk", "a", 1000.0).encode() + b"Content-Type")
    statuses = [m.status for m in sent(core.on_request(call, desk, 1000.5), "10.1.1.1", 7001)]
    assert 403 not in statuses and 407 not in statuses


def test_a_response_that_lost_the_callers_via_is_dropped_not_forwarded_without_one(core):
    _, branches = start(core)
    text = answer(branches["desk"], 180, "Ringing").decode().split("\r\n")
    ours = [ln for ln in text if ln.startswith("Via:")][0]
    broken = "\r\n".join(ln for ln in text if not ln.startswith("Via:") or ln == ours).encode()
    out = core.on_response(broken, Source("10.1.1.1", 7001), 1000.2)
    assert sent(out) == [] and [c.event for c in out if isinstance(c, Log)] == ["sip.response.dropped"]


def test_after_a_good_180_a_200_whose_next_via_was_mangled_is_still_dropped(core):
    _, branches = start(core)
    ringing = core.on_response(answer(branches["desk"], 180, "Ringing"), Source("10.1.1.1", 7001), 1000.1)
    assert [m.status for m in sent(ringing)] == [180]
    text = answer(branches["desk"], 200, "OK").decode().split("\r\n")
    second = [i for i, ln in enumerate(text) if ln.startswith("Via:")][1]
    text[second] = "Via: SIP/2.0/UDP 10.0.0.1:99999;branch=z9hG4bKacd"     # no such port
    out = core.on_response("\r\n".join(text).encode(), Source("10.1.1.1", 7001), 1000.2)
    assert sent(out) == [] and [c.event for c in out if isinstance(c, Log)] == ["sip.response.dropped"]


def test_max_forwards_written_with_a_leading_zero_is_still_zero(core):
    assert [m.status for m in sent(core.on_request(invite(mf="00"), ACD, 1000.0))] == [483]


def test_an_ended_dialog_is_forgotten_by_housekeeping_even_with_no_call_timer_due(core):
    _answered(core)
    core.on_request(_bye(), ACD, 1010.0)                       # ended: kept 32 s for retransmissions
    core.handle_timer(1035.0)
    core.handle_timer(1035.5)                                  # the call itself is forgotten by now
    assert len(core.proxy.dialogs) == 1 and core.proxy.next_timer() is None
    assert core.next_timer() <= 1036.5                         # housekeeping still wakes the core
    core.handle_timer(1043.0)
    assert len(core.proxy.dialogs) == 0


def test_while_the_router_is_behind_a_new_call_gets_503_and_a_call_under_way_goes_on(core):
    first = sent(core.on_request(invite(branch="z9hG4bKearly"), ACD, 1000.0))
    legs = [m for m in first if m.is_request]
    assert legs                                            # rung before the overload
    core.overloaded = True
    (refused,) = sent(core.on_request(invite(branch="z9hG4bKlate").replace(b"call-1", b"call-2"), ACD, 1000.1))
    assert refused.status == 503 and refused.header("retry-after") == "1"
    ringing = (f"SIP/2.0 180 Ringing\r\nVia: {legs[0].all('via')[0]}\r\nVia: {legs[0].all('via')[1]}\r\n"
               f"From: {legs[0].header('from')}\r\nTo: {legs[0].header('to')};tag=ph\r\nCall-ID: call-1\r\n"
               "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
    toward_caller = sent(core.on_response(ringing, Source("10.1.1.1", 7001), 1000.2), "10.0.0.1", 5060)
    assert [m.status for m in toward_caller] == [180]
    core.overloaded = False                                # caught up: the caller's retry is routed
    again = sent(core.on_request(invite(branch="z9hG4bKretry").replace(b"call-1", b"call-3"), ACD, 1001.2))
    assert [m for m in again if m.is_request]
