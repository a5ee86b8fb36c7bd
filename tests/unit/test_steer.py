"""Which worker owns a datagram that reached the shared port (``router.sip.steer``)."""

from __future__ import annotations

import dataclasses
import zlib

from hypothesis import given
from hypothesis import strategies as st

from router.sip.forward import Local, dialog_branch, is_loop, new_branch
from router.sip.message import parse
from router.sip.steer import Steering

ALIASES = {"1001": "lan", "1002": "minh"}
STEER = Steering(2, {5061: 0, 5062: 1}, frozenset({"10.0.0.2"}), lambda u: ALIASES.get(u, u))


def owner_of(user: str) -> int:
    return zlib.crc32(user.encode()) % 2


def request(start: str, *headers: str) -> bytes:
    return (start + "\r\n" + "".join(h + "\r\n" for h in headers) + "Content-Length: 0\r\n\r\n").encode()


def test_a_register_goes_to_the_worker_of_its_to_user_named_by_extension_or_id():
    for aor in ("1001", "lan"):
        data = request("REGISTER sip:pbx.test SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKa",
                       f"To: <sip:{aor}@pbx.test>", f"From: <sip:{aor}@pbx.test>;tag=1", "Call-ID: r1")
        assert STEER.owner(data) == owner_of("lan")


def test_a_first_register_without_credentials_is_challenged_wherever_it_lands_when_workers_share_nonces():
    sharing = dataclasses.replace(STEER, challenge_anywhere=True)
    head = ("REGISTER sip:pbx.test SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKa",
            "To: <sip:1001@pbx.test>", "From: <sip:1001@pbx.test>;tag=1", "Call-ID: r1")
    assert sharing.owner(request(*head)) is None                  # any worker answers the 401
    assert STEER.owner(request(*head)) == owner_of("lan")         # without a common secret: the owner
    for header in ('Authorization: Digest username="desk-1001", realm="pbx.test"',
                   'authorization : Digest username="desk-1001"'):
        assert sharing.owner(request(*head, header)) == owner_of("lan")   # credentials: the user's worker


def test_a_call_its_cancel_and_its_ack_go_to_the_worker_of_the_called_user():
    for method in ("INVITE", "CANCEL", "ACK"):
        data = request(f"{method} sip:1002@10.0.0.2:5060 SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKb",
                       "To: <sip:1002@pbx.test>", "Call-ID: c1", f"CSeq: 1 {method}")
        assert STEER.owner(data) == owner_of("minh")


def test_an_in_dialog_request_follows_the_worker_port_in_its_route():
    for worker, port in ((0, 5061), (1, 5062)):
        data = request("BYE sip:desk@10.0.0.7:5060 SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKc",
                       f"Route: <sip:10.0.0.2:{port};lr>, <sip:edge.example;lr>", "To: <sip:x@y>;tag=2",
                       "Call-ID: c2")
        assert STEER.owner(data) == worker


def test_a_route_to_someone_else_does_not_steer():
    data = request("BYE sip:1001@10.0.0.7 SIP/2.0", "Route: <sip:10.9.9.9:5061;lr>", "Call-ID: c3")
    assert STEER.owner(data) == owner_of("lan")          # falls back to the user


def test_a_response_goes_to_the_worker_whose_mark_ends_the_branch():
    invite = parse(request("INVITE sip:1002@10.0.0.2 SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKd",
                           "From: <sip:a@b>;tag=1", "To: <sip:1002@pbx.test>", "Call-ID: c4", "CSeq: 1 INVITE"))
    for worker in (0, 1):
        branch = new_branch(invite, Local("10.0.0.2", 5061 + worker, worker))
        data = request("SIP/2.0 180 Ringing", f"Via: SIP/2.0/UDP 10.0.0.2:{5061 + worker};branch={branch};rport",
                       "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKd", "Call-ID: c4")
        assert STEER.owner(data) == worker


def test_the_answer_to_a_bye_the_router_forwarded_goes_back_to_the_worker_holding_the_dialog():
    for worker in (0, 1):
        local = Local("10.0.0.2", 5061 + worker, worker)
        branch = dialog_branch(local)
        data = request("SIP/2.0 200 OK", f"Via: SIP/2.0/UDP 10.0.0.2:{5061 + worker};branch={branch};rport",
                       "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKd", "Call-ID: c5")
        assert STEER.owner(data) == worker
        # the branch carries no loop hash, and a request that passed us with it is no loop
        bye = parse(request("BYE sip:1002@10.0.0.7 SIP/2.0",
                            f"Via: SIP/2.0/UDP 10.0.0.2:{5061 + worker};branch={branch}",
                            "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKd", "From: <sip:a@b>;tag=1",
                            "To: <sip:1002@pbx.test>;tag=2", "Call-ID: c5", "CSeq: 2 BYE"))
        assert not is_loop(bye, local)


def test_a_response_to_someone_elses_branch_stays_where_it_landed():
    data = request("SIP/2.0 200 OK", "Via: SIP/2.0/UDP 10.0.0.2:5061;branch=z9hG4bKPj.w1", "Call-ID: x")
    assert STEER.owner(data) is None


def test_a_request_without_a_user_goes_by_call_id():
    data = request("OPTIONS sip:10.0.0.2 SIP/2.0", "Call-ID: probe-7")
    assert STEER.owner(data) == zlib.crc32(b"probe-7") % 2


@given(st.binary(max_size=600))
def test_garbage_never_raises(data):
    assert STEER.owner(data) in (None, 0, 1)


def test_compact_and_lower_case_header_names_steer_the_same():
    data = request("REGISTER sip:pbx.test SIP/2.0", "v: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKe",
                   "t: <sip:1001@pbx.test>", "i: r2")
    assert STEER.owner(data) == owner_of("lan")
    data = request("BYE sip:desk@10.0.0.7 SIP/2.0", "ROUTE: <sip:10.0.0.2:5062;lr>", "i: c5")
    assert STEER.owner(data) == 1
    data = request("SIP/2.0 200 OK", "via:SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKsr1.2.w1", "i: c6")
    assert STEER.owner(data) == 1
