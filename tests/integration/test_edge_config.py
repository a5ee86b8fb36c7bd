"""The Kamailio edge as rendered: Kamailio accepts it, ``sip-router edge-config`` writes it,
and, running on loopback against a UDP socket in the router's place, it keeps the contract
the router relies on (Path, X-Edge-Client, the flow back to the client, 430 for a flow
that is gone, rtpengine between a browser and a desk phone)."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.config import load_policy
from router.edge.certs import CertificateError, ensure_self_signed
from router.edge.render import render
from router.edge.write import check_config, kamailio_binary, write_files
from tests.integration.edge import EdgeLab, RouterStandIn, StreamClient, WsClient, write_edge_config
from tests.support import ROOT, free_port

pytestmark = pytest.mark.integration

DESK_SDP = ("v=0\r\no=desk 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio 30000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")
# What Chromium answers (trimmed): DTLS-SRTP, ICE, rtcp-mux.
BROWSER_ANSWER = ("v=0\r\no=- 46117314 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 1\r\n"
                  "m=audio 9 UDP/TLS/RTP/SAVPF 0 8 101\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
                  "a=candidate:1 1 udp 2113937151 127.0.0.1 50000 typ host generation 0\r\n"
                  "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
                  f"a=fingerprint:sha-256 {':'.join(['AB'] * 32)}\r\na=setup:active\r\na=mid:1\r\n"
                  "a=sendrecv\r\na=rtcp-mux\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
                  "a=rtpmap:101 telephone-event/8000\r\n")


def need_kamailio() -> str:
    binary = kamailio_binary()
    if binary is None:
        pytest.fail("kamailio is not installed: run scripts/test as root, which installs Debian's kamailio, "
                    "kamailio-websocket-modules, kamailio-tls-modules and rtpengine-daemon")
    return binary


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "-c", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- the rendered configuration

@pytest.mark.parametrize("edge", [
    {},
    {"udp": "off", "tls": "off", "wss": "off"},
    {"tls": "off", "rtpengine": "off"},
    {"address": "0.0.0.0", "advertise": "127.0.0.1"},
], ids=["everything", "tcp-only", "wss-without-rtpengine", "wildcard"])
def test_kamailio_accepts_the_rendered_configuration(tmp_path, edge):
    binary = need_kamailio()
    policy = load_policy(str(write_edge_config(tmp_path, free_port(), **edge)))
    assert policy.edge is not None
    ensure_self_signed(policy.edge.certificate, policy.edge.private_key, ["127.0.0.1"])
    paths = write_files(render(policy), str(tmp_path / "state" / "edge"))
    ok, output = check_config(paths[0], binary)
    assert ok, output


def test_kamailio_refuses_a_broken_configuration(tmp_path):
    binary = need_kamailio()
    broken = tmp_path / "broken.cfg"
    broken.write_text('loadmodule "tm.so"\nrequest_route {\n\tno_such_function();\n}\n')
    ok, output = check_config(str(broken), binary)
    assert not ok and "no_such_function" in output


def test_edge_config_end_to_end(tmp_path):
    need_kamailio()
    config = write_edge_config(tmp_path, free_port())
    first = cli(config, "edge-config")
    assert first.returncode == 0, first.stderr
    edge_dir = tmp_path / "state" / "edge"
    for name in ("kamailio.cfg", "tls.cfg", "rtpengine.env", "cert.pem", "key.pem"):
        assert (edge_dir / name).is_file(), name
        assert str(edge_dir / name) in first.stdout or name.endswith(".pem")
    assert stat.S_IMODE(os.stat(edge_dir / "key.pem").st_mode) == 0o600
    assert "made a self-signed certificate" in first.stdout
    assert "kamailio -c accepts the configuration" in first.stdout
    assert "rtpengine --config-file=none --table=-1" in first.stdout
    assert f"-f {edge_dir / 'kamailio.cfg'}" in first.stdout
    cert = (edge_dir / "cert.pem").read_bytes()

    again = cli(config, "--json", "edge-config")      # the pair exists now: kept as it is
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["certificate_made"] is False and data["kamailio_check"]["ok"] is True
    assert data["commands"]["rtpengine"][:3] == ["rtpengine", "--config-file=none", "--table=-1"]
    assert data["connect"]["wss"].startswith("wss://127.0.0.1:")
    assert (edge_dir / "cert.pem").read_bytes() == cert

    check = cli(config, "check")
    assert check.returncode == 0 and "edge: udp 127.0.0.1:" in check.stdout


def test_edge_config_without_an_edge_section_exits_2(tmp_path):
    config = tmp_path / "router.yaml"
    config.write_text(f"domain: pbx.test\nstate_dir: {tmp_path}\nusers: []\n")
    result = cli(config, "edge-config")
    assert result.returncode == 2
    assert "has no `edge:` section" in result.stderr
    assert not (tmp_path / "edge").exists()


def test_a_bad_edge_section_names_file_and_line_and_exits_2(tmp_path):
    config = write_edge_config(tmp_path, free_port(), wss=99999, rtpengine="somewhere")
    result = cli(config, "edge-config")
    assert result.returncode == 2
    lines = config.read_text().splitlines()
    wss_line = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("wss:"))
    rtp_line = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("rtpengine:"))
    assert re.search(rf"{re.escape(str(config))}:{wss_line}:\d+: edge.wss: '99999' is not a port number",
                     result.stderr), result.stderr
    assert re.search(rf"{re.escape(str(config))}:{rtp_line}:\d+: edge.rtpengine:", result.stderr), result.stderr
    assert not (tmp_path / "state" / "edge").exists()


def test_the_self_signed_pair_is_made_only_when_missing(tmp_path):
    cert, key = tmp_path / "d" / "cert.pem", tmp_path / "d" / "key.pem"
    assert ensure_self_signed(str(cert), str(key), ["127.0.0.1", "edge.example"]) is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"], capture_output=True,
                          text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:edge.example" in text
    before = cert.read_bytes()
    assert ensure_self_signed(str(cert), str(key), ["127.0.0.1"]) is False
    assert cert.read_bytes() == before
    assert [p.name for p in cert.parent.iterdir() if p.name.startswith(".")] == []   # no leftovers


def test_no_openssl_is_a_clear_error(tmp_path):
    with pytest.raises(CertificateError, match="not installed"):
        ensure_self_signed(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), ["127.0.0.1"],
                           openssl="no-such-openssl")


# ---------------------------------------------------------------- the running edge

@pytest.fixture
def edge(tmp_path) -> Iterator[tuple[EdgeLab, RouterStandIn]]:
    need_kamailio()
    router_port = free_port()
    lab = EdgeLab(write_edge_config(tmp_path, router_port), tmp_path)
    router = RouterStandIn(router_port)
    try:
        lab.start()
        yield lab, router
    finally:
        lab.stop()
        router.close()


def register(client: StreamClient | WsClient, proto: str, contact: str, call_id: str) -> None:
    client.send(f"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/{proto} client.invalid;branch=z9hG4bK-{call_id}\r\n"
                f"From: <sip:lan@pbx.test>;tag=f-{call_id}\r\nTo: <sip:lan@pbx.test>\r\nCall-ID: {call_id}\r\n"
                f"CSeq: 1 REGISTER\r\nContact: <{contact}>\r\nX-Edge-Client: 6.6.6.6:6;transport=udp\r\n"
                "Max-Forwards: 70\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n")


def to_client(lab: EdgeLab, router: RouterStandIn, method: str, ruri: str, path: str, call_id: str,
              sdp: str = "") -> None:
    """What the router sends for a binding made through the edge: Route = its Path."""
    body = f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}" if sdp \
        else "Content-Length: 0\r\n\r\n"
    router.send(f"{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {router.address[0]}:{router.address[1]};"
                f"branch=z9hG4bK-{call_id};rport\r\nRoute: {path}\r\nFrom: \"Desk\" <sip:1001@pbx.test>;tag=desk\r\n"
                f"To: <sip:lan@pbx.test>\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n"
                f"Contact: <sip:1001@127.0.0.1:30000>\r\nMax-Forwards: 70\r\n{body}", lab.internal)


@pytest.mark.parametrize("transport", ["tcp", "wss"])
def test_register_and_a_request_back_down_the_flow(edge, transport):
    lab, router = edge
    assert lab.tcp_port and lab.wss_port
    client = StreamClient(lab.address, lab.tcp_port) if transport == "tcp" else WsClient(lab.address, lab.wss_port)
    try:
        contact = "sip:lan@10.0.0.9:5060;transport=tcp" if transport == "tcp" else "sip:k3@x.invalid;transport=ws"
        register(client, transport.upper(), contact, f"reg-{transport}")
        relayed = router.recv_call(f"reg-{transport}")
        assert router.last_source == lab.internal                 # from the internal socket
        client_at = f"{client.local[0]}:{client.local[1]}"
        assert relayed.all("x-edge-client") == [f"{client_at};transport={transport}"]     # the forged one is gone
        uri_transport = "tcp" if transport == "tcp" else "ws"
        path = relayed.header("path")
        assert path == f"<sip:{lab.internal[0]}:{lab.internal[1]};lr;received=sip:{client_at}%3Btransport%3D" \
                       f"{uri_transport}>"
        router.reply(relayed, 200, "OK", headers=[("Path", path), ("Contact", f"<{contact}>;expires=600")])
        assert client.recv().startswith(b"SIP/2.0 200 OK")

        to_client(lab, router, "OPTIONS", contact, path, f"opt-{transport}")
        assert client.recv().startswith(f"OPTIONS {contact} SIP/2.0".encode())

        client.close()
        time.sleep(0.3)
        started = time.monotonic()
        to_client(lab, router, "INVITE", contact, path, f"inv-{transport}", DESK_SDP)
        answer = router.recv_call(f"inv-{transport}")
        assert (answer.status, answer.reason) == (430, "Flow Failed")
        assert time.monotonic() - started < 1.0, "a dead flow fails at once, not at the router's timeout"
    finally:
        client.close()


def test_desk_phone_calls_a_browser_through_rtpengine(edge):
    lab, router = edge
    assert lab.wss_port
    browser = WsClient(lab.address, lab.wss_port)
    try:
        contact = "sip:k3@x.invalid;transport=ws;ob"
        register(browser, "WSS", contact, "reg-b")
        relayed = router.recv_call("reg-b")
        path = relayed.header("path") or ""
        router.reply(relayed, 200, "OK", headers=[("Path", path)])
        browser.recv()

        to_client(lab, router, "INVITE", contact, path, "call-b", DESK_SDP)
        offer = browser.recv().decode()
        assert offer.startswith("INVITE ") and "mb=out" in offer
        sdp = offer.split("\r\n\r\n", 1)[1]
        assert re.search(r"^m=audio \d+ UDP/TLS/RTP/SAVPF ", sdp, re.M), sdp
        assert "a=fingerprint:sha-256 " in sdp and "a=ice-ufrag:" in sdp and "a=candidate:" in sdp
        assert "a=rtcp-mux" in sdp and "a=crypto" not in sdp

        head = offer.split("\r\n\r\n", 1)[0].split("\r\n")
        keep = [line for line in head[1:] if line.split(":", 1)[0].lower() in ("via", "from", "call-id", "cseq",
                                                                                "record-route")]
        to = next(line for line in head if line.lower().startswith("to:"))
        browser.send("\r\n".join(["SIP/2.0 200 OK", *keep, f"{to};tag=browser", f"Contact: <{contact}>",
                                  "Content-Type: application/sdp", f"Content-Length: {len(BROWSER_ANSWER)}", "",
                                  BROWSER_ANSWER]))
        answer = router.recv_call("call-b")
        assert answer.status == 200
        body = answer.body.decode()
        assert re.search(r"^m=audio \d+ RTP/AVP ", body, re.M), body
        assert "a=ice-" not in body and "a=fingerprint" not in body and "a=candidate" not in body
        assert "alias=" in (answer.header("contact") or "")          # so in-dialog requests find the flow
    finally:
        browser.close()
    assert "offer" in lab.media.text() and "answer" in lab.media.text()


def test_tcp_storms_and_content_length(edge):
    """200 connections opened and dropped (half of them reset, a third halfway through a
    message), then a message whose body straddles byte 4,000 and hides a request: one
    request reaches the router, the hidden one never does."""
    lab, router = edge
    assert lab.tcp_port
    sockets = []
    for i in range(200):
        s = socket.create_connection((lab.address, lab.tcp_port), timeout=2)
        if i % 3 == 0:
            s.send(b"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP")
        sockets.append(s)
    for i, s in enumerate(sockets):
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    hidden = ("REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP 6.6.6.6;branch=z9hG4bK-hidden\r\n"
              "From: <sip:evil@pbx.test>;tag=e\r\nTo: <sip:evil@pbx.test>\r\nCall-ID: hidden\r\n"
              "CSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n")
    head = ("MESSAGE sip:1001@pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.9;branch=z9hG4bK-m1\r\n"
            "From: <sip:lan@pbx.test>;tag=m1\r\nTo: <sip:1001@pbx.test>\r\nCall-ID: straddle\r\nCSeq: 1 MESSAGE\r\n"
            f"Max-Forwards: 70\r\nX-Pad: {'p' * 3700}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(hidden)}\r\n\r\n")
    data = (head + hidden).encode()
    assert len(head) < 4000 < len(data)
    client = StreamClient(lab.address, lab.tcp_port)
    try:
        client.send(data[:3990])
        time.sleep(0.2)
        client.send(data[3990:])
        message = router.recv_call("straddle")
        assert message.method == "MESSAGE" and message.body.decode() == hidden
        seen = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                seen.add(router.recv(0.2).call_id)
            except TimeoutError:
                pass
        assert "hidden" not in seen
    finally:
        client.close()
    assert lab.kamailio.running(), lab.logs()
