"""The router behind the Kamailio edge, all real processes on loopback.

The lab: the router on 127.0.0.1 (trusting the ACD at 127.0.0.1), the edge on
127.0.0.1 with UDP/TCP, TLS and WSS listeners and its internal socket on
127.0.0.2, rtpengine beside it.  Apps connect over TLS to the edge; the ACD
(a raw UDP peer) calls the router directly.  minh takes calls on `app` and
falls back to his desk phone, which registers directly over UDP.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.edge.write import kamailio_binary
from router.sip.message import SipMessage
from tests.integration.edge import EdgeLab, StreamClient
from tests.integration.rawsip import UdpPeer, authorization, invite
from tests.integration.streamsip import StreamPeer
from tests.support import free_port

pytestmark = pytest.mark.integration


def edge_section(tmp: Path) -> str:
    tcp = free_port(socket.SOCK_STREAM)
    return (f"edge:\n  address: 127.0.0.1\n  udp: {tcp}\n  tcp: {tcp}\n"
            f"  tls: {free_port(socket.SOCK_STREAM)}\n  wss: {free_port(socket.SOCK_STREAM)}\n"
            f"  internal_address: 127.0.0.2\n  internal_port: {free_port()}\n"
            f"  rtpengine: 127.0.0.1:{free_port()}\n  rtp_ports: [42000, 42999]\n")


def _minh_on_app(text: str) -> str:
    return text.replace("    receive_method: ip_phone\n", "    receive_method: app\n    fallback: [ip_phone]\n", 1)


class EdgedLab:
    def __init__(self, lab: object, edge: EdgeLab) -> None:
        self.lab = lab
        self.edge = edge


@pytest.fixture
def edged(make_lab, tmp_path: Path) -> Iterator[EdgedLab]:
    if kamailio_binary() is None:
        pytest.fail("kamailio is not installed: run scripts/test as root (Debian kamailio, "
                    "kamailio-websocket-modules, kamailio-tls-modules, rtpengine-daemon)")
    lab = make_lab(edit=lambda t: _minh_on_app(t) + edge_section(tmp_path))
    edge = EdgeLab(lab.config, tmp_path / "edge-logs")
    edge.start()
    try:
        yield EdgedLab(lab, edge)
    finally:
        edge.stop()


def _final(peer: UdpPeer, seconds: float = 5.0) -> SipMessage:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = peer.recv()
        if not msg.is_request and msg.status >= 200:
            return msg
    raise AssertionError("no final response")


def test_an_app_over_tls_registers_through_the_edge_and_receives_a_call(edged):
    lab, edge = edged.lab, edged.edge
    with StreamPeer("127.0.0.1", edge.tls_port, tls=True) as app, UdpPeer(lab.port) as acd:
        ok = app.register_with("1002", "minh-app", "minh-app-secret")
        assert ok.status == 200, edge.logs()
        assert ok.header("supported") == "path" and ok.all("path")
        (row,) = lab.registrations("minh")
        assert (row["kind"], row["transport"], row["via"], row["reached_at"]) == ("app", "tls", "edge", "path")
        assert row["source"] == f"127.0.0.1:{app.local_port}"

        acd.send(invite(acd, lab.port, "1002", "edge-tls-1"))
        ringing = app.wait_request("INVITE")                    # over the app's own TLS connection
        assert ringing.uri == app.contact
        app.answer(ringing, 180, "Ringing")
        app.answer(ringing, 200, "OK")
        answered = _final(acd)
        assert answered.status == 200
    (record,) = [c for c in lab.calls("minh") if c["call_id"] == "edge-tls-1"]
    assert record["answered_by"] == "minh-app"


def test_a_call_to_an_app_whose_connection_is_gone_falls_back_at_once(edged):
    lab = edged.lab
    with UdpPeer(lab.port) as desk, UdpPeer(lab.port) as acd:
        with StreamPeer("127.0.0.1", edged.edge.tls_port, tls=True) as app:
            assert app.register_with("1002", "minh-app", "minh-app-secret").status == 200
        assert desk.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
        assert {r["device"] for r in lab.registrations("minh")} == {"minh-app", "minh-desk"}
        started = time.monotonic()
        acd.send(invite(acd, lab.port, "1002", "edge-gone-1"))
        ringing = desk.wait_request("INVITE")                 # the fallback: ip_phone
        waited = time.monotonic() - started
        assert waited < 2.0, f"the fallback waited {waited:.1f} s (ring timeout 15 s)"
        assert ringing.call_id == "edge-gone-1"
    (fallback,) = lab.router.wait_for("call.fallback")
    assert fallback["why"] == "430 from every branch"         # the edge: Flow Failed


def _app_invite(app: StreamPeer, call_id: str, cseq: int, auth: str = "", method: str = "INVITE") -> bytes:
    return (f"{method} sip:1001@pbx.test SIP/2.0\r\n"
            f"Via: SIP/2.0/TLS {app.local_host}:{app.local_port};branch=z9hG4bK-{call_id}-{cseq};rport\r\n"
            f"From: <sip:1002@pbx.test>;tag=app-{call_id}\r\nTo: <sip:1001@pbx.test>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <{app.contact}>\r\n"
            f"{auth}Max-Forwards: 70\r\nUser-Agent: stream-app\r\nContent-Length: 0\r\n\r\n").encode()


def _final_on(app: StreamPeer, cseq_method: str) -> SipMessage:
    while True:
        msg = app.recv()
        if not msg.is_request and msg.status >= 200 and (msg.header("cseq") or "").endswith(cseq_method):
            return msg


def _finals(app: StreamPeer, count: int) -> dict[str, int]:
    """The next ``count`` final responses, by the method their CSeq names."""
    out: dict[str, int] = {}
    while len(out) < count:
        msg = app.recv()
        if not msg.is_request and msg.status >= 200:
            out[(msg.header("cseq") or "").split()[-1]] = msg.status
    return out


def test_an_app_calling_through_the_edge_is_challenged_and_its_cancel_stops_the_ringing(edged):
    lab, edge = edged.lab, edged.edge
    # the app connects from 127.0.0.5: 127.0.0.1 is the lab's trusted ACD
    with StreamPeer("127.0.0.1", edge.tls_port, tls=True, source_host="127.0.0.5") as app, \
            UdpPeer(lab.port) as desk:
        assert app.register_with("1002", "minh-app", "minh-app-secret").status == 200
        assert desk.register_with("MD5", "1001", "lan-desk", "desk-secret").status == 200
        app.send(_app_invite(app, "app-call-1", 1))
        challenge = _final_on(app, "INVITE")
        assert challenge.status == 407                        # the edge is not a trusted peer
        app.send(_app_invite(app, "app-call-1", 1, method="ACK"))
        auth = authorization(challenge, "MD5", "minh-app", "minh-app-secret", "sip:1001@pbx.test", "INVITE")
        app.send(_app_invite(app, "app-call-1", 2, auth))
        ringing = desk.wait_request("INVITE")
        desk.send(_answer(ringing, 180, "Ringing"))
        app.send(_app_invite(app, "app-call-1", 2, method="CANCEL"))
        finals = _finals(app, 2)                   # the CANCEL's 200 and the INVITE's 487, in either order
        assert finals == {"CANCEL": 200, "INVITE": 487}, finals
        assert desk.wait_request("CANCEL").call_id == "app-call-1"   # the ringing stops
    assert not lab.router.events("call.in_dialog.refused")


def _answer(request: SipMessage, status: int, reason: str) -> bytes:
    vias = "".join(f"Via: {v}\r\n" for v in request.all("via"))
    rr = "".join(f"Record-Route: {r}\r\n" for r in request.all("record-route"))
    return (f"SIP/2.0 {status} {reason}\r\n{vias}{rr}From: {request.header('from')}\r\n"
            f"To: {request.header('to')};tag=desk\r\nCall-ID: {request.call_id}\r\n"
            f"CSeq: {request.header('cseq')}\r\nContent-Length: 0\r\n\r\n").encode()


def _smuggling(port: int) -> bytes:
    """A MESSAGE whose body straddles byte 4,000 of the stream, with a REGISTER inside it."""
    hidden = (b"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKhidden\r\n"
              b"From: <sip:1001@pbx.test>;tag=h\r\nTo: <sip:1001@pbx.test>\r\nCall-ID: hidden-register\r\n"
              b"CSeq: 1 REGISTER\r\nContact: <sip:evil@203.0.113.66>\r\nContent-Length: 0\r\n\r\n")
    head = (f"MESSAGE sip:1001@pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKsmug\r\n"
            "From: <sip:x@pbx.test>;tag=s\r\nTo: <sip:1001@pbx.test>\r\nCall-ID: smuggle-1\r\nCSeq: 1 MESSAGE\r\n"
            "Max-Forwards: 70\r\nContent-Type: text/plain\r\n").encode()
    padding = b"x" * (4000 - len(head) - 30)
    body = padding + hidden
    return head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def test_a_tcp_storm_and_a_smuggled_request_stay_at_the_edge(edged):
    lab, edge = edged.lab, edged.edge
    started = time.monotonic()
    for i in range(200):                                        # opened and dropped within a few seconds
        s = socket.create_connection(("127.0.0.1", edge.tcp_port), timeout=2.0)
        if i % 3 == 0:
            s.sendall(b"INVITE sip:1001@pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP 1")   # half a message
        if i % 2 == 0:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        s.close()
    storm = time.monotonic() - started
    client = StreamClient("127.0.0.1", edge.tcp_port)
    try:
        client.send(_smuggling(client.local[1]))
        time.sleep(0.5)
    finally:
        client.close()
    assert storm < 5.0
    assert lab.router.proc.poll() is None and edge.kamailio.running(), edge.logs()
    assert "hidden-register" not in lab.router.log_text()
    with UdpPeer(lab.port) as desk, UdpPeer(lab.port) as acd:   # and calls still route
        assert desk.register_with("MD5", "1001", "lan-desk", "desk-secret").status == 200
        acd.send(invite(acd, lab.port, "1001", "after-storm-1"))
        assert desk.wait_request("INVITE").call_id == "after-storm-1"
    assert lab.registrations("lan")[0]["device"] == "lan-desk"
