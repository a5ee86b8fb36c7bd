"""Phones behind NAT, and Contacts reachable as written: the real router, raw UDP peers.

A phone behind NAT writes its private address (192.168.77.10) in Via and
Contact while its packets arrive from the NAT's mapping (here: its loopback
socket).  The router reaches it at the mapping, pings it there every second
(the lab's interval), and drops it after two pings go unanswered.  A phone
that registers a Contact it can be reached at as written (a third-party
registration from another socket) is called there and never pinged.
"""

from __future__ import annotations

import pytest

from tests.integration.rawsip import UdpPeer, answer, fast_pings, invite

pytestmark = pytest.mark.integration

def _fast(text: str) -> str:
    return fast_pings(text, missed=2)


def test_a_phone_behind_nat_is_reached_at_its_source_and_kept_alive_by_pings(make_lab):
    lab = make_lab(edit=_fast)
    with UdpPeer(lab.port) as phone, UdpPeer(lab.port) as acd:
        ok = phone.register_with("MD5", "1002", "minh-desk", "minh-secret",
                                 contact="sip:1002@192.168.77.10:5060", sent_by="192.168.77.10:5060")
        assert ok.status == 200
        for _ in range(3):                               # pinged at its mapping, and it answers
            ping = phone.wait_request("OPTIONS", 3.0)
            assert ping.uri == "sip:1002@192.168.77.10:5060"
            phone.send(answer(ping))
        (row,) = lab.registrations("minh")
        assert row["contact"] == "sip:1002@192.168.77.10:5060" and row["reached_at"] == "source"
        assert row["source"] == f"127.0.0.1:{phone.port}" and row["via"] == "direct"
        acd.send(invite(acd, lab.port, "1002", "nat-call-1"))
        ringing = phone.wait_request("INVITE", 3.0)        # the call reaches the mapping, not 192.168.77.10
        assert ringing.uri == "sip:1002@192.168.77.10:5060"
    assert not lab.router.events("register.keepalive.dropped")


def test_a_phone_behind_nat_that_stops_answering_pings_is_dropped(make_lab):
    lab = make_lab(edit=_fast)
    with UdpPeer(lab.port) as phone:
        assert phone.register_with("MD5", "1002", "minh-desk", "minh-secret",
                                   contact="sip:1002@192.168.77.10:5060", sent_by="192.168.77.10:5060").status == 200
        assert len(lab.registrations("minh")) == 1
        (dropped,) = lab.router.wait_for("register.keepalive.dropped", timeout=8.0)   # silent: 2 pings missed
        assert dropped["device"] == "minh-desk" and dropped["missed"] == 2
        assert lab.registrations("minh") == []


def test_a_contact_reachable_as_written_is_called_there_and_not_pinged(make_lab):
    lab = make_lab(edit=_fast)
    with UdpPeer(lab.port) as registrar_client, UdpPeer(lab.port) as phone, UdpPeer(lab.port) as acd:
        # one socket registers, the phone listens on another: RFC 3261 third-party style
        assert registrar_client.register_with("MD5", "1002", "minh-desk", "minh-secret",
                                              contact=f"sip:1002@127.0.0.1:{phone.port}").status == 200
        acd.send(invite(acd, lab.port, "1002", "nat-call-2"))
        ringing = phone.wait_request("INVITE", 3.0)
        assert ringing.uri == f"sip:1002@127.0.0.1:{phone.port}"
        assert [r["reached_at"] for r in lab.registrations("minh")] == ["contact"]
        assert registrar_client.nothing_within(2.5)      # no pings: nothing to keep open
