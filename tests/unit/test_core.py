"""The SIP core's dispatch: every request answered (except ACK), retransmissions from memory."""

from __future__ import annotations

import pytest

from router.config import parse_policy
from router.policy.model import Binding, DeviceKind
from router.sip.commands import Log, SaveBindings, Send, Source
from router.sip.core import SipCore
from router.sip.message import parse
from router.sip.transaction import ResponseCache

SRC = Source("127.0.0.1", 5070)


@pytest.fixture
def core(tmp_path):
    policy = parse_policy("domain: pbx.test\nusers:\n  - {id: minh, devices: [{id: d, kind: app, password: p}]}\n",
                          str(tmp_path / "r.yaml"))
    return SipCore(policy, [], 1000.0, secret=b"s" * 32)


def req(method, branch="z9hG4bK1", extra=""):
    return (f"{method} sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\n"
            f"From: <sip:a@pbx.test>;tag=1\r\nTo: <sip:pbx.test>\r\nCall-ID: c-{branch}\r\n"
            f"CSeq: 1 {method}\r\n{extra}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def sends(commands):
    return [parse(c.data) for c in commands if isinstance(c, Send)]


@pytest.mark.parametrize("method, status", [("OPTIONS", 200), ("REGISTER", 401), ("SUBSCRIBE", 405),
                                            ("MESSAGE", 405), ("FOO", 501), ("BYE", 481), ("CANCEL", 481)])
def test_every_request_gets_an_answer(core, method, status):
    (reply,) = sends(core.on_request(req(method), SRC, 1000.0))
    assert reply.status == status


def test_ack_gets_no_answer(core):
    assert sends(core.on_request(req("ACK"), SRC, 1000.0)) == []


def test_a_retransmission_is_answered_from_the_transaction_cache(core):
    first = core.on_request(req("OPTIONS", "z9hG4bKr"), SRC, 1000.0)
    again = core.on_request(req("OPTIONS", "z9hG4bKr"), SRC, 1010.0)
    assert [c.data for c in again if isinstance(c, Send)] == [c.data for c in first if isinstance(c, Send)]
    later = core.on_request(req("OPTIONS", "z9hG4bKr"), SRC, 1033.0)    # after Timer J
    assert sends(later)[0].header("to") != sends(first)[0].header("to")


def test_a_malformed_request_with_addressable_headers_gets_400_with_the_reason(core):
    data = req("OPTIONS").replace(b"Content-Length: 0", b"Content-Length: 99")
    commands = core.on_request(data, SRC, 1000.0)
    (reply,) = sends(commands)
    assert reply.status == 400 and "truncated" in reply.header("warning")
    assert any(isinstance(c, Log) and c.event == "sip.malformed" for c in commands)


def test_garbage_is_dropped_and_logged_not_answered(core):
    commands = core.on_request(b"\x00\x01hello\r\n\r\n", SRC, 1000.0)
    assert sends(commands) == [] and isinstance(commands[0], Log)


@pytest.mark.parametrize("ping", [b"\r\n\r\n", b"\r\n", b" \r\n\t"])
def test_a_phones_crlf_keep_alive_is_neither_answered_nor_logged(core, ping):
    """pjsua-based softphones send CRLF every few seconds to hold their NAT mapping open."""
    assert core.on_request(ping, Source("127.0.0.1", 5070), 1000.0) == []


def test_replies_go_where_the_request_came_from(core):
    (send,) = [c for c in core.on_request(req("OPTIONS", extra=""), Source("10.1.1.1", 6000), 1000.0)
               if isinstance(c, Send)]
    assert (send.host, send.port) == ("10.1.1.1", 5070)      # no rport: the Via port


def test_one_timer_drives_binding_expiry_and_says_when_it_is_next_needed(tmp_path):
    policy = parse_policy("domain: pbx.test\nusers:\n  - {id: minh, devices: [{id: d, kind: app, password: p}]}\n",
                          str(tmp_path / "r.yaml"))
    gone = Binding("minh", "d", DeviceKind.APP, "sip:d@10.0.0.9", expires_at=1000.4)
    core = SipCore(policy, [gone], 1000.0, secret=b"s" * 32)
    assert core.next_timer() == 1001.0          # the second the binding expires in (and housekeeping)
    assert core.handle_timer(1000.3) == []
    assert core.location.bindings(1000.5, "minh") == []     # never routed to once expired
    (save,) = core.handle_timer(1001.0)
    assert isinstance(save, SaveBindings) and save.device_id == "d" and save.bindings == ()
    assert core.next_timer() == 1002.0          # now only the periodic housekeeping is left


def test_the_cache_forgets_in_order_and_says_when_it_next_needs_the_engine():
    cache = ResponseCache(linger=10.0)
    cache.put(("a",), b"1", 100.0)
    cache.put(("b",), b"2", 105.0)
    assert cache.next_timer() == 110.0
    assert cache.expire(110.0) == 1 and cache.get(("a",), 110.0) is None
    assert cache.get(("b",), 110.0) == b"2" and cache.next_timer() == 115.0


def test_the_cache_is_bounded_under_a_flood():
    cache = ResponseCache(linger=10.0, limit=3)
    for i in range(5):
        cache.put((str(i),), b"x", 100.0)
    assert len(cache.entries) == 3 and cache.get(("0",), 100.0) is None


def test_a_save_command_is_emitted_on_a_successful_register(core):
    assert not any(isinstance(c, SaveBindings) for c in core.on_request(req("REGISTER"), SRC, 1000.0))


def test_options_advertises_only_what_the_router_implements(core):
    (reply,) = sends(core.on_request(req("OPTIONS"), SRC, 1000.0))
    assert reply.status == 200 and reply.header("supported") == "path"     # Path (RFC 3327), not outbound
    assert "INVITE" in reply.header("allow")
