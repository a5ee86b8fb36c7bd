"""``workers:`` in the YAML, and how the supervisor adds up its workers' status."""

from __future__ import annotations

import os

import pytest

from router.config import parse_policy
from router.errors import ConfigError
from router.workers import SUPERVISOR_ENV, merge_status, own_ports, supervisor_gone, user_id_of, worker_socket

BASE = """\
domain: pbx.test
listen:
  - {address: 127.0.0.1, port: 5060}
users:
  - id: lan
    extension: "1001"
    devices: [{id: lan-desk, kind: ip_phone, password: s}]
"""


def test_one_worker_unless_the_yaml_asks_for_more():
    assert parse_policy(BASE, "router.yaml").workers == 1


def test_workers_auto_means_one_per_core():
    assert parse_policy(BASE + "workers: auto\n", "router.yaml").workers == min(32, os.cpu_count() or 1)


def test_worker_k_listens_on_port_plus_one_plus_k():
    policy = parse_policy(BASE + "workers: 3\n", "router.yaml")
    assert [own_ports(policy, k) for k in range(3)] == [(5061,), (5062,), (5063,)]
    assert worker_socket(policy.control_socket, 2) == policy.control_socket + ".2"
    assert worker_socket(policy.control_socket, None) == policy.control_socket


@pytest.mark.parametrize("value, fragment", [("0", "at least 1"), ("many", "whole number"),
                                             ("99", "at most 32")])
def test_a_bad_worker_count_names_the_line(value, fragment):
    with pytest.raises(ConfigError) as info:
        parse_policy(BASE + f"workers: {value}\n", "router.yaml")
    assert any(p.startswith("router.yaml:8") and fragment in p for p in info.value.problems)


def problems_with_a_second_listener(entry: str) -> list[str]:
    """The problems of BASE with ``entry`` as a second ``listen:`` item, and two workers."""
    text = BASE.replace("  - {address: 127.0.0.1, port: 5060}\n",
                        "  - {address: 127.0.0.1, port: 5060}\n  - " + entry + "\n")
    with pytest.raises(ConfigError) as info:
        parse_policy(text + "workers: 2\n", "router.yaml")
    return info.value.problems


def test_tcp_stays_with_one_worker():
    problems = problems_with_a_second_listener("{address: 127.0.0.1, port: 5070, transport: tcp}")
    assert any("tcp listener on port 5070 needs `workers: 1`" in p for p in problems)


def test_worker_ports_may_not_run_into_another_listen_port():
    problems = problems_with_a_second_listener("{address: '::1', port: 5062}")
    assert any("include listen port 5062" in p for p in problems)


def test_an_extension_steers_like_its_user_id():
    policy = parse_policy(BASE, "router.yaml")
    assert user_id_of(policy, "1001") == "lan" and user_id_of(policy, "lan") == "lan"
    assert user_id_of(policy, "84912345678") == "84912345678"


def test_status_adds_up_the_workers_counts_and_lists_each():
    def one(pid: int, desk: int, ringing: int) -> dict[str, object]:
        return {"version": "1", "pid": pid, "uptime_s": 5.0, "users": 2,
                "registrations": {"ip_phone": desk, "app": 0},
                "registrations_by_transport": {"udp": desk},
                "calls": {"ringing": ringing, "answered": 1},
                "counters": {"requests": 10 * pid, "handed_over": 1},
                "trunk": {"configured": False}}
    merged = merge_status([one(1, 2, 0), one(2, 3, 1)], pid=99)
    assert merged["pid"] == 99 and merged["users"] == 2
    assert merged["registrations"] == {"app": 0, "ip_phone": 5}
    assert merged["calls"] == {"answered": 2, "ringing": 1}
    assert merged["counters"] == {"handed_over": 2, "requests": 30}
    assert [(w["worker"], w["pid"], w["registrations"]) for w in merged["workers"]] == [(0, 1, 2), (1, 2, 3)]


def test_a_worker_that_does_not_answer_is_listed_with_why_and_the_others_still_count():
    answer = {"pid": 7, "uptime_s": 1.0, "registrations": {"ip_phone": 4}, "calls": {"ringing": 0},
              "counters": {"requests": 3}, "registrations_by_transport": {"udp": 4}}
    merged = merge_status(["the router did not answer 'status' within 2 s", answer], pid=1)
    assert merged["partial"] is True and merged["registrations"] == {"ip_phone": 4}
    assert merged["workers"][0] == {"worker": 0, "error": "the router did not answer 'status' within 2 s"}
    assert merged["workers"][1]["registrations"] == 4


def test_a_worker_knows_when_the_supervisor_that_started_it_is_gone(monkeypatch):
    monkeypatch.setenv(SUPERVISOR_ENV, str(os.getppid()))
    assert not supervisor_gone()                       # its parent is still the supervisor
    monkeypatch.setenv(SUPERVISOR_ENV, str(os.getppid() + 1))
    assert supervisor_gone()                           # the parent is someone else now
    monkeypatch.delenv(SUPERVISOR_ENV)
    assert not supervisor_gone()                       # no supervisor started this process
