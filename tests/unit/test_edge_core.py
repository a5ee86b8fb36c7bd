"""The router behind the edge (Path, the client's own address) and phones behind NAT."""

from __future__ import annotations

import itertools

import pytest

from router.config import parse_policy
from router.sip import digest
from router.sip.commands import Log, SaveBindings, Send, Source
from router.sip.core import SipCore
from router.sip.forward import Local
from router.sip.message import parse

POLICY = """
domain: pbx.test
listen: [{address: 127.0.0.1, port: 5070}]
trusted_peers: [{name: acd, address: 10.9.9.9}]
registrar: {keepalive_interval: 20, keepalive_max_missed: 3, source_failures_per_minute: 3}
routing: {fallback: []}
edge: {address: 198.51.100.7, internal_address: 127.0.0.2, internal_port: 5062}
users:
  - id: minh
    receive_method: all_devices
    fallback: [ip_phone]
    devices:
      - {id: minh-web, kind: web, password: w}
      - {id: minh-desk, kind: ip_phone, password: d}
  - id: lan
    receive_method: ip_phone
    devices:
      - {id: lan-desk, kind: ip_phone, password: l}
"""
EDGE = Source("127.0.0.2", 5062)
PATH = "<sip:127.0.0.2:5062;lr;received=sip:203.0.113.50:51000%3Btransport%3Dws>"
ACD = Source("10.9.9.9", 5060)
_n = itertools.count()


@pytest.fixture
def core(tmp_path):
    policy = parse_policy(POLICY, str(tmp_path / "r.yaml"))
    return SipCore(policy, [], 1000.0, secret=b"s" * 32, local=Local("127.0.0.1", 5070))


def sent(commands, host=None, port=None):
    return [parse(c.data) for c in commands if isinstance(c, Send)
            and (host is None or c.host == host) and (port is None or c.port == port)]


def auth(core, user, password, now, method="REGISTER", header="Authorization"):
    nonce = core.auth.nonces.issue(now)
    ha1 = digest.ha1("MD5", user, "pbx.test", password)
    resp = digest.response("MD5", ha1, nonce, method, "sip:pbx.test", "auth", "00000001", "cn")
    return (f'{header}: Digest username="{user}", realm="pbx.test", nonce="{nonce}", uri="sip:pbx.test", '
            f'response="{resp}", algorithm=MD5, qop=auth, nc=00000001, cnonce="cn"')


def register(core, source, *, user="minh-web", password="w", aor="minh", contact="sip:x7@df7.invalid;transport=ws",
             via="127.0.0.2:5062", extra=(), now=1000.0, good=True):
    lines = ["REGISTER sip:pbx.test SIP/2.0", f"Via: SIP/2.0/UDP {via};branch=z9hG4bK{next(_n)};rport",
             f"From: <sip:{aor}@pbx.test>;tag=f{next(_n)}", f"To: <sip:{aor}@pbx.test>",
             f"Call-ID: reg-{user}-{next(_n)}", "CSeq: 1 REGISTER", f"Contact: <{contact}>", "Expires: 600",
             *extra]
    lines.append(auth(core, user, password if good else "wrong", now))
    out = core.on_request(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode(), source, now)
    return out


def through_edge(client="203.0.113.50:51000", transport="wss"):
    return ("Path: " + PATH, f"X-Edge-Client: {client};transport={transport}", "Supported: path, outbound")


def invite(user="minh", via="10.9.9.9:5060", extra=(), call_id="call-1"):
    lines = [f"INVITE sip:{user}@pbx.test SIP/2.0", f"Via: SIP/2.0/UDP {via};branch=z9hG4bK{next(_n)}",
             "From: <sip:customer@pbx.test>;tag=cust", f"To: <sip:{user}@pbx.test>", f"Call-ID: {call_id}",
             "CSeq: 1 INVITE", "Contact: <sip:acd@10.9.9.9>", "Max-Forwards: 70", *extra]
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def bindings_of(core, device):
    return list(core.location.of_device(device))


# ---------------------------------------------------------------------------- the edge
def test_a_browser_registering_through_the_edge_gets_its_path_back_and_supported_path(core):
    out = register(core, EDGE, extra=through_edge())
    (ok,) = sent(out)
    assert ok.status == 200 and ok.header("supported") == "path" and ok.all("path") == [PATH]
    (b,) = bindings_of(core, "minh-web")
    assert b.path == (PATH,) and b.via_edge and b.device_transport == "wss"
    assert b.device_address == "203.0.113.50:51000"
    log = next(c for c in out if isinstance(c, Log) and c.event == "register.ok")
    assert ("via_edge", True) in log.fields and ("transport", "wss") in log.fields


def test_a_ua_that_does_not_say_it_supports_path_is_not_sent_the_path(core):
    (ok,) = sent(register(core, EDGE, extra=through_edge()[:2]))
    assert ok.status == 200 and ok.all("path") == [] and ok.header("supported") == "path"


def test_a_call_for_a_browser_goes_to_the_edge_with_the_path_as_route_and_the_contact_as_uri(core):
    register(core, EDGE, extra=through_edge())
    out = core.on_request(invite(), ACD, 1001.0)
    (branch,) = sent(out, "127.0.0.2", 5062)
    assert branch.method == "INVITE" and branch.uri == "sip:x7@df7.invalid;transport=ws"
    assert branch.all("route") == [PATH] and branch.header("x-edge-client") is None


def test_the_client_address_is_believed_only_from_the_edge(core):
    forged = Source("203.0.113.9", 40000)
    out = register(core, forged, via="203.0.113.9:40000", contact="sip:minh@203.0.113.9:40000",
                   extra=("X-Edge-Client: 10.9.9.9:5060;transport=tls",))
    assert sent(out)[0].status == 200
    (b,) = bindings_of(core, "minh-web")
    assert b.client == "" and b.device_transport == "udp" and b.device_address == "203.0.113.9:40000"


def test_the_edge_is_not_a_trusted_peer_a_device_behind_it_is_challenged(core):
    register(core, EDGE, extra=through_edge())
    out = core.on_request(invite(user="lan", via="127.0.0.2:5062",
                                 extra=("X-Edge-Client: 203.0.113.50:51000;transport=wss",)), EDGE, 1001.0)
    assert [m.status for m in sent(out)] == [407]


def test_a_trusted_peer_may_come_through_the_edge(core):
    register(core, Source("10.1.1.7", 5060), user="lan-desk", password="l", aor="lan",
             contact="sip:lan@10.1.1.7:5060", via="10.1.1.7:5060")
    out = core.on_request(invite(user="lan", via="127.0.0.2:5062",
                                 extra=("X-Edge-Client: 10.9.9.9:5060;transport=tls",)), EDGE, 1001.0)
    assert [m.method for m in sent(out, "10.1.1.7", 5060)] == ["INVITE"]


def test_bad_passwords_through_the_edge_throttle_that_client_not_everyone_behind_the_edge(core):
    for i in range(4):
        register(core, EDGE, extra=through_edge("203.0.113.66:4000"), good=False, now=1000.0 + i)
    (refused,) = sent(register(core, EDGE, extra=through_edge("203.0.113.66:4000"), now=1005.0))
    assert refused.status == 403
    (ok,) = sent(register(core, EDGE, extra=through_edge("203.0.113.50:51000"), now=1005.0))
    assert ok.status == 200


def _answered_by_browser(core):
    register(core, EDGE, extra=through_edge())
    out = core.on_request(invite(), ACD, 1001.0)
    (branch,) = sent(out, "127.0.0.2", 5062)
    ok = (f"SIP/2.0 200 OK\r\n{''.join(f'Via: {v}' + chr(13) + chr(10) for v in branch.all('via'))}"
          f"From: {branch.header('from')}\r\nTo: {branch.header('to')};tag=browser\r\n"
          f"Call-ID: call-1\r\nCSeq: 1 INVITE\r\nContact: <sip:x7@df7.invalid;transport=ws>\r\n"
          f"Content-Length: 0\r\n\r\n").encode()
    core.on_response(ok, EDGE, 1002.0)


def bye(client, to_tag="cust", from_tag="browser"):
    return (f"BYE sip:acd@10.9.9.9 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK{next(_n)}\r\n"
            f"From: <sip:minh@pbx.test>;tag={from_tag}\r\nTo: <sip:customer@pbx.test>;tag={to_tag}\r\n"
            f"Call-ID: call-1\r\nCSeq: 2 BYE\r\nMax-Forwards: 70\r\nX-Edge-Client: {client};transport=wss\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def test_another_client_behind_the_edge_cannot_hang_up_the_browsers_call(core):
    _answered_by_browser(core)
    out = core.on_request(bye("203.0.113.99:5555"), EDGE, 1003.0)
    assert [m.status for m in sent(out)] == [403] and sent(out, "10.9.9.9") == []
    out = core.on_request(bye("203.0.113.50:51000"), EDGE, 1004.0)
    (forwarded,) = sent(out, "10.9.9.9", 5060)
    assert forwarded.method == "BYE" and forwarded.header("x-edge-client") is None


def test_a_gone_connection_430_from_the_edge_runs_the_fallback_at_once(core):
    register(core, EDGE, extra=through_edge())
    register(core, Source("10.1.1.8", 5060), user="minh-desk", password="d", contact="sip:minh@10.1.1.8:5060",
             via="10.1.1.8:5060")
    core.policy = parse_policy(POLICY.replace("receive_method: all_devices", "receive_method: app"),
                               core.policy.source)
    out = core.on_request(invite(), ACD, 1001.0)
    (branch,) = sent(out, "127.0.0.2", 5062)
    flow_failed = (f"SIP/2.0 430 Flow Failed\r\n{''.join(f'Via: {v}' + chr(13) + chr(10) for v in branch.all('via'))}"
                   f"From: {branch.header('from')}\r\nTo: {branch.header('to')};tag=edge\r\n"
                   f"Call-ID: call-1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
    out = core.on_response(flow_failed, EDGE, 1001.1)
    assert [m.method for m in sent(out, "10.1.1.8", 5060)] == ["INVITE"]      # the desk phone, now


# ---------------------------------------------------------------------------- NAT
def test_a_phone_behind_nat_with_a_private_contact_is_reached_at_its_source(core):
    src = Source("203.0.113.20", 40123)
    register(core, src, user="lan-desk", password="l", aor="lan", contact="sip:lan@192.168.1.50:5060",
             via="192.168.1.50:5060")
    (b,) = bindings_of(core, "lan-desk")
    assert not b.at_contact
    out = core.on_request(invite(user="lan"), ACD, 1001.0)
    assert [m.method for m in sent(out, "203.0.113.20", 40123)] == ["INVITE"]
    # only the mapping its REGISTER opened (to the shared port, with workers) reaches it
    assert [c.own_port for c in out if isinstance(c, Send) and c.host == "203.0.113.20"] == [False]


def test_a_contact_reachable_as_written_is_used_as_written(core):
    """A third-party registration: sent from one socket, naming another."""
    register(core, Source("198.51.100.30", 40000), user="lan-desk", password="l", aor="lan",
             contact="sip:lan@198.51.100.31:5090", via="198.51.100.30:40000")
    (b,) = bindings_of(core, "lan-desk")
    assert b.at_contact
    out = core.on_request(invite(user="lan"), ACD, 1001.0)
    assert [m.method for m in sent(out, "198.51.100.31", 5090)] == ["INVITE"]
    # no NAT in between: the INVITE may leave from the worker's own port, where the answers come
    assert [c.own_port for c in out if isinstance(c, Send) and c.host == "198.51.100.31"] == [True]
    assert not any(c.own_port for c in out if isinstance(c, Send) and c.host != "198.51.100.31")


def test_a_via_that_is_not_the_source_means_nat(core):
    register(core, Source("198.51.100.30", 40000), user="lan-desk", password="l", aor="lan",
             contact="sip:lan@198.51.100.31:5090", via="198.51.100.31:5090")
    (b,) = bindings_of(core, "lan-desk")
    assert not b.at_contact


def _nat_phone(core):
    register(core, Source("203.0.113.20", 40123), user="lan-desk", password="l", aor="lan",
             contact="sip:lan@192.168.1.50:5060", via="192.168.1.50:5060")


def _answer(ping, status=200):
    return (f"SIP/2.0 {status} OK\r\nVia: {ping.header('via')}\r\nFrom: {ping.header('from')}\r\n"
            f"To: {ping.header('to')};tag=p\r\nCall-ID: {ping.call_id}\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def test_a_nat_phone_is_pinged_at_its_source_and_stays_while_it_answers(core):
    _nat_phone(core)
    for i in range(5):
        now = 1000.0 + 20 * (i + 1)
        (ping,) = sent(core.handle_timer(now), "203.0.113.20", 40123)
        assert ping.method == "OPTIONS" and ping.uri == "sip:lan@192.168.1.50:5060"
        core.on_response(_answer(ping), Source("203.0.113.20", 40123), now + 0.05)
    assert len(bindings_of(core, "lan-desk")) == 1


def test_a_nat_phone_that_stops_answering_is_dropped_after_the_missed_pings(core):
    _nat_phone(core)
    out = []
    for i in range(4):
        out = core.handle_timer(1000.0 + 20 * (i + 1))
        if i < 3:
            assert [m.method for m in sent(out)] == ["OPTIONS"]
    assert bindings_of(core, "lan-desk") == []
    assert any(isinstance(c, SaveBindings) and c.device_id == "lan-desk" and c.bindings == () for c in out)
    assert any(isinstance(c, Log) and c.event == "register.keepalive.dropped" for c in out)


def test_a_phone_reached_at_its_contact_is_not_pinged(core):
    register(core, Source("198.51.100.30", 40000), user="lan-desk", password="l", aor="lan",
             contact="sip:lan@198.51.100.30:40000", via="198.51.100.30:40000")
    assert sent(core.handle_timer(1100.0)) == []


def test_a_browser_on_a_websocket_is_left_to_the_edge_to_keep_alive(core):
    register(core, EDGE, extra=through_edge())
    assert sent(core.handle_timer(1100.0)) == []


def test_a_browser_softphone_is_challenged_with_md5_alone_on_register_and_invite(core):
    """JsSIP keeps only the last challenge and gives up unless it is MD5."""
    register_401 = (b"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bKj1\r\n"
                    b"From: <sip:minh@pbx.test>;tag=j\r\nTo: <sip:minh@pbx.test>\r\nCall-ID: j1\r\n"
                    b"CSeq: 1 REGISTER\r\nContact: <sip:x@y.invalid;transport=ws>\r\nUser-Agent: JsSIP 3.11.1\r\n"
                    b"Content-Length: 0\r\n\r\n")
    (challenge,) = sent(core.on_request(register_401, EDGE, 1000.0))
    assert [v.count("algorithm=MD5") for v in challenge.all("www-authenticate")] == [1]
    out = core.on_request(invite(user="lan", via="127.0.0.2:5062",
                                 extra=("User-Agent: JsSIP 3.11.1",
                                        "X-Edge-Client: 203.0.113.50:51000;transport=wss")), EDGE, 1001.0)
    (proxy_challenge,) = sent(out)
    assert proxy_challenge.status == 407
    assert [v.count("algorithm=MD5") for v in proxy_challenge.all("proxy-authenticate")] == [1]


# ---------------------------------------------------------------------------- what only the edge may do
def test_a_path_from_anyone_but_the_edge_is_ignored_calls_go_where_the_contact_says(core):
    src = Source("198.51.100.30", 40000)
    out = register(core, src, user="lan-desk", password="l", aor="lan", contact="sip:lan@198.51.100.30:40000",
                   via="198.51.100.30:40000", extra=("Path: " + PATH, "Supported: path"))
    (ok,) = sent(out)
    assert ok.status == 200 and ok.all("path") == []
    (b,) = bindings_of(core, "lan-desk")
    assert b.path == () and not b.via_edge
    out = core.on_request(invite(user="lan"), ACD, 1001.0)
    (branch,) = sent(out, "198.51.100.30", 40000)
    assert branch.all("route") == []


@pytest.mark.parametrize("path", ["garbage", "<mailto:x@y>", "<sip:a@b;lr>, " * 5 + "<sip:c@d;lr>",
                                  "<sip:127.0.0.2:5062;lr;x=" + "y" * 600 + ">"])
def test_a_malformed_or_oversized_path_from_the_edge_is_refused_with_400_and_nothing_is_stored(core, path):
    extra = ("Path: " + path, "X-Edge-Client: 203.0.113.50:51000;transport=wss")
    (reply,) = sent(register(core, EDGE, extra=extra))
    assert reply.status == 400 and "Path" in reply.header("warning")
    assert bindings_of(core, "minh-web") == []


def test_the_edge_stamp_over_tcp_from_the_edge_address_is_not_believed(core):
    tcp = Source("127.0.0.2", 5062, "tcp", conn=7)
    register(core, tcp, extra=through_edge(), contact="sip:minh@127.0.0.2:5062;transport=tcp")
    (b,) = bindings_of(core, "minh-web")
    assert b.client == "" and b.path == ()


def test_a_cancel_through_the_edge_is_accepted_only_from_the_client_that_called(core):
    register(core, Source("10.1.1.7", 5060), user="lan-desk", password="l", aor="lan",
             contact="sip:lan@10.1.1.7:5060", via="10.1.1.7:5060")
    stamp = "X-Edge-Client: 10.9.9.9:5060;transport=tls"     # the ACD, through the edge
    data = invite(user="lan", via="127.0.0.2:5062", extra=(stamp,), call_id="c-cancel")
    core.on_request(data, EDGE, 1001.0)
    cancel = (data.decode().replace("INVITE sip:", "CANCEL sip:", 1).replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL"))
    other = cancel.replace(stamp, "X-Edge-Client: 203.0.113.99:4444;transport=wss")
    assert [m.status for m in sent(core.on_request(other.encode(), EDGE, 1001.5))] == [403]
    out = core.on_request(cancel.encode(), EDGE, 1002.0)
    assert sorted(m.status for m in sent(out, "127.0.0.2", 5062)) == [200, 487]   # the CANCEL's 200, then 487


def test_a_ping_the_edge_answers_for_a_silent_device_counts_as_missed(core):
    register(core, EDGE, extra=through_edge(transport="udp"))
    dropped = []
    for i in range(1, 6):
        out = core.handle_timer(1000.0 + 20 * i)
        dropped += [c for c in out if isinstance(c, Log) and c.event == "register.keepalive.dropped"]
        for ping in sent(out, "127.0.0.2", 5062):
            assert ping.all("route") == [PATH]
            core.on_response(_answer(ping, 408), EDGE, 1000.0 + 20 * i + 0.1)   # the edge: nobody answered
    assert len(dropped) == 1 and bindings_of(core, "minh-web") == []


def test_turning_keepalive_on_by_reload_pings_phones_already_registered(core):
    off = POLICY.replace("keepalive_interval: 20", "keepalive_interval: 0")
    core.set_policy(parse_policy(off, core.policy.source), 1000.0)
    _nat_phone(core)
    assert sent(core.handle_timer(1100.0)) == []
    core.set_policy(parse_policy(POLICY, core.policy.source), 1100.0)
    assert [m.method for m in sent(core.handle_timer(1125.0))] == ["OPTIONS"]
