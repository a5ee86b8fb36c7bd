"""The long-running processes parse the YAML in a child process and get the same policy,
or the same errors, as the in-process loader (the CLI's ``check``)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import sys
import threading
import time

import pytest

from router import config_child, config_items
from router.config import load_policy
from router.errors import ConfigError
from router.policy.model import Device, DeviceKind, ReceiveMethod, Role, User

from .conftest import BASE
from .test_config_split import centre


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(BASE.format(state_dir=tmp_path))
    return str(path)


def test_a_policy_parsed_in_the_child_equals_the_one_parsed_here(good):
    apart = config_child.load_policy_apart(good)
    assert apart == load_policy(good)
    assert apart.user("1002").devices[0].id == "minh-desk"      # its lookups work after the trip


def test_a_long_users_list_read_on_two_cores_comes_through_the_child_whole(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(centre())                   # long enough to be read on two cores
    parsed = config_child.parse_apart(str(path))
    assert parsed is not None, "the child must answer, not leave it to the in-process fallback"
    apart = config_child.policy_of(parsed)
    assert apart is not None and apart == load_policy(str(path))


def test_a_bad_file_gives_the_same_file_line_errors(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(BASE.format(state_dir=tmp_path).replace("receive_method: ip_phone", "receive_method: phone"))
    with pytest.raises(ConfigError) as here:
        load_policy(str(path))
    with pytest.raises(ConfigError) as apart:
        config_child.load_policy_apart(str(path))
    assert apart.value.problems == here.value.problems
    assert f"{path}:" in apart.value.problems[0] and "'phone' is not one of" in apart.value.problems[0]


def test_a_missing_file_is_refused_like_the_cli_refuses_it(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        config_child.load_policy_apart(str(tmp_path / "absent.yaml"))


def test_when_no_child_can_run_the_policy_is_parsed_here(good, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    assert config_child.load_policy_apart(good) == load_policy(good)


def test_users_and_devices_survive_the_trip_whole(good):
    apart = config_child.load_policy_apart(good)
    here = load_policy(good)
    for a, b in zip(apart.users, here.users, strict=True):
        assert a == b and a.devices == b.devices and type(a.role) is type(b.role)


def test_an_answer_written_in_parts_arrives_whole():
    """A signal or a profiler's pause can cut a big write to a pipe short: the child
    writes what is left until all of its answer is out."""
    def short(fd, data):
        return os.write(fd, bytes(data[:4096]))         # at most one page per call
    read_end, write_end = os.pipe()
    answer = b"".join(bytes([i % 251]) * 1000 for i in range(300))      # 300 kB, more than a pipe holds
    received = bytearray()

    def drain():
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)
    reader = threading.Thread(target=drain)
    reader.start()
    try:
        config_items.write_all(write_end, answer, write=short)
    finally:
        os.close(write_end)
        reader.join(10)
        os.close(read_end)
    assert bytes(received) == answer


def test_a_user_with_every_field_set_comes_back_with_each_field_in_its_place():
    desk = Device(id="minh-desk", kind=DeviceKind.IP_PHONE, auth_username="minh.d", password="pw",
                  ha1_md5="0" * 32, ha1_sha256="1" * 64)
    user = User(id="minh", display_name="Minh", extension="1002", role=Role.ADMIN,
                receive_method=ReceiveMethod.AGENT_PHONE, agent_phone="+84901234567", default_queue="sales",
                devices=(desk,), fallback=(ReceiveMethod.APP,), ring_timeout=12.5, password_hash="$argon2id$x")
    back = pickle.loads(pickle.dumps(user, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == user and type(back) is User and type(back.devices[0]) is Device
    assert {f.name: getattr(back, f.name) for f in dataclasses.fields(User)} == \
        {f.name: getattr(user, f.name) for f in dataclasses.fields(User)}
    assert {f.name: getattr(back.devices[0], f.name) for f in dataclasses.fields(Device)} == \
        {f.name: getattr(desk, f.name) for f in dataclasses.fields(Device)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.display_name = "changed"           # type: ignore[misc]


def test_an_answer_this_version_cannot_read_is_no_answer_and_the_file_is_parsed_here():
    """During an upgrade a process of the old version may get the new child's answer,
    naming what it does not have: it parses the file itself instead of failing."""
    foreign = b"crouter.policy.model\n_made_by_another_version\n)R."       # a pickle calling a missing name
    assert config_child.policy_of(foreign) is None
    assert config_child.policy_of(pickle.dumps(("ok", ("not", "a", "policy", "answer")))) is None


def test_at_start_the_child_may_be_a_fork_and_answers_exactly_what_a_new_interpreter_answers(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(centre())
    calls: list[str] = []
    forked = config_child.parse_apart(str(path), meanwhile=lambda: calls.append("meanwhile"), fork=True)
    assert calls == ["meanwhile"]
    assert forked is not None and config_child.policy_of(forked) == load_policy(str(path))
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.format(state_dir=tmp_path).replace("receive_method: ip_phone", "receive_method: phone"))
    answer = config_child.parse_apart(str(bad), fork=True)
    assert answer is not None
    with pytest.raises(ConfigError, match="'phone' is not one of"):
        config_child.policy_of(answer)


def test_a_forked_child_that_takes_too_long_is_killed_and_the_start_reads_the_file_itself(good, monkeypatch):
    def stuck(_path: str, _out: int | None = None) -> int:
        time.sleep(30)
        return 0

    monkeypatch.setattr(config_child, "_child", stuck)
    began = time.monotonic()
    assert config_child.parse_apart(good, timeout=0.3, fork=True) is None
    assert time.monotonic() - began < 5


def test_when_no_process_can_be_forked_the_start_parses_in_a_new_interpreter(good, monkeypatch):
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(config_child.os, "fork", no_fork)
    calls: list[str] = []
    answer = config_child.parse_apart(good, meanwhile=lambda: calls.append("meanwhile"), fork=True)
    assert calls == ["meanwhile"]
    assert answer is not None and config_child.policy_of(answer) == load_policy(good)


def test_a_forked_child_reaped_by_someone_else_still_gives_its_whole_answer(good):
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)     # children reaped by the kernel
    try:
        answer = config_child.parse_apart(good, fork=True)
    finally:
        signal.signal(signal.SIGCHLD, before)
    assert answer is not None and config_child.policy_of(answer) == load_policy(good)
