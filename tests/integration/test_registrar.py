"""The registrar, end to end: the real router process on loopback, SIPp as the phones."""

from __future__ import annotations

import signal
import time

import pytest

from tests.integration.rawsip import UdpPeer
from tests.integration.sippgen import register_flow

pytestmark = pytest.mark.integration


def test_a_desk_phone_registers_with_md5_digest_and_gets_its_contact_back(lab):
    scenario = register_flow(lab.tmp / "reg.xml", "1002", [200], expect_in_200="minh-desk-phone@127.0.0.1")
    result = lab.sipp(scenario, user="minh-desk", password="minh-secret", service="minh-desk-phone")
    assert result.returncode == 0, lab.sipp_log(scenario)
    (binding,) = lab.registrations("minh")
    assert binding["device"] == "minh-desk" and binding["kind"] == "ip_phone"
    assert binding["contact"].startswith("sip:minh-desk-phone@127.0.0.1:")
    assert binding["transport"] == "udp" and binding["user_agent"] == "sipp-phone"
    assert 290 <= binding["expires_in"] <= 300


def test_a_softphone_registers_with_sha256_digest(lab):
    with UdpPeer(lab.port) as phone:
        reply = phone.register_with("SHA-256", "1002", "minh-desk", "minh-secret")
    assert reply.status == 200
    assert any(f"1002-raw@127.0.0.1:{phone.port}" in c for c in reply.all("contact"))
    (binding,) = lab.registrations("minh")
    assert binding["device"] == "minh-desk"


def test_the_challenge_offers_md5_and_sha256(lab):
    with UdpPeer(lab.port) as phone:
        challenge = phone.register("1002", 1, "offers@127.0.0.1")
    offered = [v for v in challenge.all("www-authenticate")]
    assert challenge.status == 401
    assert "algorithm=MD5" in offered[0] and "algorithm=SHA-256" in offered[1]
    assert all('qop="auth"' in v and 'realm="pbx.test"' in v for v in offered)


def test_a_wrong_password_is_challenged_again_then_forbidden_and_nothing_is_stored(lab):
    scenario = register_flow(lab.tmp / "bad.xml", "1002", [401, 403])
    result = lab.sipp(scenario, user="minh-desk", password="wrong")
    assert result.returncode == 0, lab.sipp_log(scenario)
    assert lab.registrations() == []
    assert lab.router.events("register.auth")


def test_a_device_cannot_register_another_users_aor(lab):
    scenario = register_flow(lab.tmp / "steal.xml", "lan", [403])
    result = lab.sipp(scenario, user="minh-desk", password="minh-secret")
    assert result.returncode == 0, lab.sipp_log(scenario)
    assert "may register only that user" in lab.sipp_log(scenario)
    assert lab.registrations() == []


def test_two_devices_of_one_user_are_registered_at_once_with_their_kinds(lab):
    for device, password in (("lan-desk", "desk-secret"), ("lan-app", "app-secret")):
        scenario = register_flow(lab.tmp / f"{device}.xml", "1001", [200])
        assert lab.sipp(scenario, user=device, password=password, service=device).returncode == 0
    kinds = {b["device"]: b["kind"] for b in lab.registrations("lan")}
    assert kinds == {"lan-desk": "ip_phone", "lan-app": "app"}
    # the second 200 OK listed both bindings of the user
    assert "lan-desk@" in lab.sipp_log(lab.tmp / "lan-app.xml").split("SIP/2.0 200 OK")[-1]


def test_unregister_with_expires_zero_removes_the_binding(lab):
    contact = "<sip:minh-phone@127.0.0.1:5999>"
    register = register_flow(lab.tmp / "up.xml", "1002", [200], contact=contact)
    assert lab.sipp(register, user="minh-desk", password="minh-secret").returncode == 0
    assert len(lab.registrations("minh")) == 1
    down = register_flow(lab.tmp / "down.xml", "1002", [200], contact=contact, expires="0")
    assert lab.sipp(down, user="minh-desk", password="minh-secret").returncode == 0
    assert lab.registrations("minh") == []


def test_unregister_all_with_star_removes_every_binding_of_the_device(lab):
    for contact in ("<sip:a@[local_ip]:[local_port]>", "<sip:b@[local_ip]:[local_port]>"):
        scenario = register_flow(lab.tmp / "up.xml", "1002", [200], contact=contact)
        assert lab.sipp(scenario, user="minh-desk", password="minh-secret").returncode == 0
    assert len(lab.registrations("minh")) == 2
    star = register_flow(lab.tmp / "star.xml", "1002", [200], contact="*", expires="0")
    assert lab.sipp(star, user="minh-desk", password="minh-secret").returncode == 0
    assert lab.registrations("minh") == []


def test_star_without_expires_zero_is_a_bad_request(lab):
    star = register_flow(lab.tmp / "star.xml", "1002", [400], contact="*", expires="300")
    assert lab.sipp(star, user="minh-desk", password="minh-secret").returncode == 0, lab.sipp_log(star)


def test_a_too_short_expiry_gets_423_with_min_expires(lab):
    scenario = register_flow(lab.tmp / "short.xml", "1002", [423], expires="10")
    assert lab.sipp(scenario, user="minh-desk", password="minh-secret").returncode == 0
    assert "Min-Expires: 60" in lab.sipp_log(scenario)
    assert lab.registrations() == []


def test_a_huge_expiry_is_clamped_to_the_maximum(lab):
    scenario = register_flow(lab.tmp / "huge.xml", "1002", [200], expires="4294967295",
                             expect_in_200="expires=3600")
    assert lab.sipp(scenario, user="minh-desk", password="minh-secret").returncode == 0, lab.sipp_log(scenario)


def test_expiry_removes_the_binding(make_lab):
    lab = make_lab(min_expires=1)
    scenario = register_flow(lab.tmp / "brief.xml", "1002", [200], expires="1")
    assert lab.sipp(scenario, user="minh-desk", password="minh-secret").returncode == 0
    deadline = time.monotonic() + 6
    while lab.registrations("minh", settle=0.2) and time.monotonic() < deadline:
        pass
    assert lab.registrations("minh") == []


def test_a_restart_even_kill_9_keeps_the_bindings(lab):
    scenario = register_flow(lab.tmp / "up.xml", "1002", [200])
    assert lab.sipp(scenario, user="minh-desk", password="minh-secret").returncode == 0
    time.sleep(0.3)
    lab.router.kill()
    lab.router.start()
    (binding,) = lab.registrations("minh")
    assert binding["device"] == "minh-desk"
    with UdpPeer(lab.port) as phone:                  # the restarted router still lists it
        reply = phone.register_with("MD5", "1002", "minh-desk", "minh-secret")
    assert len(reply.all("contact")) == 2


def test_a_retransmitted_register_gets_the_same_answer_not_a_second_processing(lab):
    with UdpPeer(lab.port) as phone:
        first = phone.register_with("MD5", "1002", "minh-desk", "minh-secret")
        phone.send(phone.last_sent)                   # the phone did not hear the 200: same bytes again
        again = phone.recv()
    assert first.status == again.status == 200
    assert again.header("to") == first.header("to")   # the stored response, same To tag
    assert len(lab.router.wait_for("register.ok")) == 1


def test_options_is_answered_200_for_keepalive(lab):
    with UdpPeer(lab.port) as peer:
        peer.send((f"OPTIONS sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK-o1\r\n"
                   "From: <sip:x@pbx.test>;tag=1\r\nTo: <sip:pbx.test>\r\nCall-ID: o1\r\nCSeq: 7 OPTIONS\r\n"
                   "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode())
        reply = peer.recv()
    assert reply.status == 200 and "REGISTER" in (reply.header("allow") or "")


def test_unknown_and_unsupported_methods_get_an_answer_not_silence(lab):
    with UdpPeer(lab.port) as peer:
        for method, status in (("FOO", 501), ("SUBSCRIBE", 405)):
            peer.send((f"{method} sip:pbx.test SIP/2.0\r\n"
                       f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK-{method}\r\n"
                       f"From: <sip:x@pbx.test>;tag=1\r\nTo: <sip:pbx.test>\r\nCall-ID: m-{method}\r\n"
                       f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode())
            reply = peer.recv()
            assert reply.status == status, method
            assert "REGISTER" in (reply.header("allow") or "")


MALFORMED = {
    "a q-value out of range": "Contact: <sip:x@127.0.0.1:5999>;q=7",
    "an Expires that is not a number": "Contact: <sip:x@127.0.0.1:5999>;expires=soon",
    "a Contact URI too long to list in a reply": "Contact: <sip:" + "x" * 300 + "@127.0.0.1:5999>",
}


@pytest.mark.parametrize("what", MALFORMED)
def test_a_malformed_register_gets_400_and_the_router_keeps_serving(lab, what):
    scenario = register_flow(lab.tmp / "bad.xml", "1002", [400],
                             contact=MALFORMED[what].removeprefix("Contact: "))
    assert lab.sipp(scenario, user="minh-desk", password="minh-secret").returncode == 0, lab.sipp_log(scenario)
    assert lab.registrations() == []
    good = register_flow(lab.tmp / "good.xml", "1002", [200])
    assert lab.sipp(good, user="minh-desk", password="minh-secret").returncode == 0


def test_a_folded_to_header_is_understood(lab):
    # SIPp trims the lines it sends, so this phone is a plain UDP socket.
    with UdpPeer(lab.port) as phone:
        reply = phone.register_with("MD5", "1002", "minh-desk", "minh-secret",
                                    to="\r\n   <sip:1002@pbx.test>")
    assert reply.status == 200
    assert lab.registrations("minh")


def test_a_tel_uri_in_to_is_understood(lab):
    tel = register_flow(lab.tmp / "tel.xml", "1002", [200], to="<tel:1002>")
    assert lab.sipp(tel, user="minh-desk", password="minh-secret").returncode == 0, lab.sipp_log(tel)


def test_bare_lf_line_ends_are_accepted(lab):
    with UdpPeer(lab.port) as peer:
        peer.send((f"OPTIONS sip:pbx.test SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK-lf\n"
                   "From: <sip:x@pbx.test>;tag=1\nTo: <sip:pbx.test>\nCall-ID: lf1\nCSeq: 1 OPTIONS\n"
                   "Max-Forwards: 70\nContent-Length: 0\n\n").encode())
        assert peer.recv().status == 200


def test_a_truncated_body_is_refused_with_400(lab):
    with UdpPeer(lab.port) as peer:
        peer.send((f"OPTIONS sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK-tr\r\n"
                   "From: <sip:x@pbx.test>;tag=1\r\nTo: <sip:pbx.test>\r\nCall-ID: tr1\r\nCSeq: 1 OPTIONS\r\n"
                   "Content-Type: application/sdp\r\nMax-Forwards: 70\r\nContent-Length: 500\r\n\r\nv=0\r\n").encode())
        reply = peer.recv()
    assert reply.status == 400 and "truncated" in (reply.header("warning") or "")


def test_a_brute_force_source_is_throttled(make_lab):
    lab = make_lab()
    lab.config.write_text(lab.config.read_text().replace("source_failures_per_minute: 1000",
                                                         "source_failures_per_minute: 3"))
    lab.router.signal(signal.SIGHUP)
    lab.router.wait_for("policy.reloaded")
    with UdpPeer(lab.port) as attacker:
        codes = [attacker.register_with("MD5", "1001", username, "guess").status
                 for username in ("lan-desk", "lan-app", "minh-desk")]
        blocked = attacker.register("1001", 1, "after@127.0.0.1")
    assert codes == [401, 401, 401]
    assert (blocked.status, blocked.reason) == (403, "Too Many Failed Attempts")
    with UdpPeer(lab.port) as phone:     # the same address is blocked for everyone, for a minute
        assert phone.register("1001", 1, "other@127.0.0.1").status == 403
