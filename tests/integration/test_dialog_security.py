"""Inside a call, only its two ends speak: the real router, raw UDP peers on loopback.

The ACD (127.0.0.1, a trusted peer) calls minh; minh's desk phone answers.
Someone on 127.0.0.2 who has learnt the Call-ID and both tags tries to hang
the call up: refused with 403, and the desk phone hears nothing of it.
"""

from __future__ import annotations

import pytest

from router.sip.forward import render
from router.sip.message import SipMessage
from tests.integration.rawsip import UdpPeer

pytestmark = pytest.mark.integration


def _invite(acd: UdpPeer, router_port: int) -> bytes:
    return (f"INVITE sip:1002@127.0.0.1:{router_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{acd.port};branch=z9hG4bK-sec-inv;rport\r\n"
            "From: <sip:0909123456@acd.test>;tag=acd1\r\nTo: <sip:1002@pbx.test>\r\n"
            f"Call-ID: sec-call-1\r\nCSeq: 1 INVITE\r\nContact: <sip:acd@127.0.0.1:{acd.port}>\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def _answer(invite_text: bytes, status: int, reason: str, tag: str, contact: str) -> bytes:
    lines = invite_text.decode().split("\r\n")
    keep = [ln for ln in lines if ln.split(":")[0].lower() in
            ("via", "from", "call-id", "cseq", "record-route")]
    to = next(ln for ln in lines if ln.lower().startswith("to:"))
    return ("\r\n".join([f"SIP/2.0 {status} {reason}", *keep, f"{to};tag={tag}",
                         f"Contact: <{contact}>", "Content-Length: 0", "", ""])).encode()


def _in_dialog(method: str, cseq: int, peer: UdpPeer, branch: str, router_port: int) -> bytes:
    return (f"{method} sip:minh-raw@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {peer.host}:{peer.port};branch={branch};rport\r\n"
            f"Route: <sip:127.0.0.1:{router_port};lr>\r\n"
            "From: <sip:0909123456@acd.test>;tag=acd1\r\nTo: <sip:1002@pbx.test>;tag=desk1\r\n"
            f"Call-ID: sec-call-1\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def _next(peer: UdpPeer, method: str | None = None, status: int | None = None, tries: int = 6) -> SipMessage:
    for _ in range(tries):                      # skip retransmissions and provisional noise
        msg = peer.recv()
        if (method is None or msg.method == method and msg.is_request) and \
                (status is None or msg.status == status):
            return msg
    raise AssertionError(f"no {method or status} within {tries} messages")


def test_a_stranger_with_the_call_id_and_tags_cannot_hang_up_an_answered_call(lab):
    with UdpPeer(lab.port) as desk, UdpPeer(lab.port) as acd, UdpPeer(lab.port, "127.0.0.2") as stranger:
        assert desk.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
        lab.registrations("minh")                        # the binding is in force
        acd.send(_invite(acd, lab.port))
        ringing = _next(desk, "INVITE")
        desk.send(_answer(_text(ringing), 200, "OK", "desk1", f"sip:minh-raw@127.0.0.1:{desk.port}"))
        assert _next(acd, status=200).status == 200
        acd.send(_in_dialog("ACK", 1, acd, "z9hG4bK-sec-ack", lab.port))
        assert _next(desk, "ACK").method == "ACK"

        stranger.send(_in_dialog("BYE", 2, stranger, "z9hG4bK-sec-evil", lab.port))
        refused = stranger.recv()
        assert refused.status == 403
        assert desk.nothing_within(1.0)                  # the phone never heard the forged BYE

        acd.send(_in_dialog("BYE", 2, acd, "z9hG4bK-sec-bye", lab.port))
        assert _next(desk, "BYE").method == "BYE"        # the real caller still hangs up
    assert "call.in_dialog.refused" in lab.router.log_text()


def _text(msg: SipMessage) -> bytes:
    """A received request as text again, for copying its headers into the answer."""
    return render(f"{msg.method} {msg.uri} SIP/2.0", list(msg.headers), msg.body)
