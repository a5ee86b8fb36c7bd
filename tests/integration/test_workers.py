"""Several workers on one host (``workers: 2``): one router to phones, callers and the CLI."""

from __future__ import annotations

import os
import signal
import time
import zlib
from collections.abc import Iterator

import pytest

from tests.integration.calllab import CallLab
from tests.integration.rawsip import UdpPeer, answer, fast_pings, invite

pytestmark = pytest.mark.integration


def owner(user: str) -> int:
    return zlib.crc32(user.encode()) % 2


@pytest.fixture
def two(make_lab) -> Iterator[CallLab]:
    world = CallLab(make_lab(workers=2))
    try:
        yield world
    finally:
        world.stop()


def worker_pids(world: CallLab) -> list[int]:
    status = world.lab.cli("status")
    return [int(w["pid"]) for w in status["workers"]]  # type: ignore[index]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:          # a zombie is gone too
        return stat.read().split(") ")[1][0] != "Z"


def test_two_workers_route_agents_whose_users_belong_to_different_workers(two):
    assert {owner("lan"), owner("minh")} == {0, 1}, "the two users must land on different workers"
    lan_desk = two.phone("lan-desk", "answer")
    minh_desk = two.phone("minh-desk", "answer")
    minh_app = two.phone("minh-app", "answer")
    for user, phone in (("1001", lan_desk), ("1002", minh_desk)):
        result, log = two.call(user, 200, name=f"caller-{user}")
        assert result.returncode == 0, log
        assert phone.wait_received("BYE"), "the caller's BYE must pass through the worker holding the call"
    assert minh_app.received("INVITE") == [], "minh is on ip_phone: only the desk phone rings"
    records = {r["user"]: r for r in two.lab.calls()}       # type: ignore[index]
    assert records["lan"]["answered_by"] == "lan-desk" and records["minh"]["answered_by"] == "minh-desk"


def test_status_adds_up_every_worker_and_names_each(two):
    two.phone("lan-desk", "answer")
    two.phone("minh-desk", "answer")
    status = two.lab.cli("status")
    workers = status["workers"]                              # type: ignore[index]
    assert [w["worker"] for w in workers] == [0, 1]
    assert sum(status["registrations"].values()) == 2        # type: ignore[index, union-attr]
    assert sorted(w["registrations"] for w in workers) == [1, 1]
    assert status["pid"] == two.lab.router.pid               # type: ignore[index]
    for worker in workers:                                   # forked by the router itself
        with open(f"/proc/{worker['pid']}/stat") as stat:
            assert int(stat.read().split(") ")[1].split()[1]) == two.lab.router.pid
    # whichever worker the kernel gave a REGISTER to, the user's own worker answered it
    registered = {e["user"]: e["worker"] for e in two.lab.router.events("register.ok")}
    assert registered == {"lan": owner("lan"), "minh": owner("minh")}


def test_reload_and_unregister_reach_every_worker(two):
    two.phone("lan-desk", "answer")
    two.phone("minh-desk", "answer")
    assert two.lab.cli("reload")["reloaded"] is True         # type: ignore[index]
    assert two.lab.cli("unregister", "minh-desk")["removed"] == 1   # type: ignore[index]
    assert [b["device"] for b in two.lab.registrations()] == ["lan-desk"]


def test_stopping_the_router_stops_every_worker(two):
    pids = worker_pids(two)
    assert two.lab.router.stop() == 0
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_a_worker_that_dies_takes_the_router_down_so_systemd_restarts_it_whole(two):
    pids = worker_pids(two)
    os.kill(pids[1], signal.SIGKILL)
    proc = two.lab.router.proc
    assert proc is not None
    proc.wait(15)
    assert proc.returncode != 0
    assert two.lab.router.events("worker.exited")[0]["worker"] == 1
    assert not alive(pids[0])


def test_workers_whose_supervisor_was_killed_outright_stop_and_free_the_ports(two):
    pids = worker_pids(two)
    proc = two.lab.router.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)                  # no chance to stop them itself
    proc.wait(5)
    try:
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), "orphaned workers would keep the SIP port"
    finally:
        for pid in pids:                               # this test's processes, whatever happened
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    gone = two.lab.router.events("router.supervisor.gone")
    assert sorted(e["worker"] for e in gone) == [0, 1]


def test_status_still_answers_when_one_worker_is_stuck_and_names_it(two):
    two.phone("lan-desk", "answer")
    two.phone("minh-desk", "answer")
    pids = worker_pids(two)
    stuck = owner("minh")
    os.kill(pids[stuck], signal.SIGSTOP)
    try:
        status = two.lab.cli("status")
    finally:
        os.kill(pids[stuck], signal.SIGCONT)
    workers = status["workers"]                                         # type: ignore[index]
    assert "error" in workers[stuck] and "error" not in workers[1 - stuck]
    assert status["partial"] is True and sum(status["registrations"].values()) == 1   # type: ignore[index, union-attr]


def test_a_desk_phone_reached_at_its_contact_is_called_from_the_worker_port_it_answers_to(make_lab):
    lab = make_lab(workers=2, edit=lambda text: fast_pings(text, missed=5))   # the NAT phone stays
    with UdpPeer(lab.port) as desk, UdpPeer(lab.port) as behind_nat, UdpPeer(lab.port) as acd:
        assert desk.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
        assert behind_nat.register_with("MD5", "1001", "lan-desk", "desk-secret",
                                        contact="sip:1001@192.168.77.10:5060",
                                        sent_by="192.168.77.10:5060").status == 200
        own = lab.port + 1 + owner("minh")
        acd.send(invite(acd, lab.port, "1002", "own-port-1"))
        ringing, sender = desk.wait_request_from("INVITE")
        assert sender == ("127.0.0.1", own), "the INVITE leaves from the port the call's worker names in its Via"
        assert (ringing.top_via.host, ringing.top_via.port) == ("127.0.0.1", own)
        desk.sock.sendto(answer(ringing, 200), sender)
        answered = acd.recv()
        while answered.status < 200:
            answered = acd.recv()
        assert answered.status == 200 and answered.call_id == ringing.call_id
        # behind a NAT, only the mapping its REGISTER opened reaches the phone: the shared port
        acd.send(invite(acd, lab.port, "1001", "own-port-2"))
        _, sender = behind_nat.wait_request_from("INVITE")
        assert sender == ("127.0.0.1", lab.port)
