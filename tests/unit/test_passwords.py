"""Web app passwords: argon2id hashes, who may set whose, and which one is in force."""

from __future__ import annotations

import io
import json
import textwrap
from dataclasses import replace

import pytest

from router.cli import main
from router.config import parse_policy
from router.errors import Forbidden, InvalidChange
from router.runtime import PolicyState
from router.store.sqlite import SqlitePolicyStore, connect
from router.web.passwords import WeakPassword, hash_password, verify_password

from .conftest import BASE


def test_a_password_verifies_against_its_hash_and_nothing_else():
    hashed = hash_password("correct horse")
    assert hashed.startswith("$argon2id$") and "correct horse" not in hashed
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "correct hors")
    assert not verify_password(None, "correct horse")
    assert not verify_password("$argon2id$garbage", "correct horse")      # a broken hash is just "no"
    assert not verify_password(hashed, "x" * 10_000)


@pytest.mark.parametrize("password", ["", "short", "x" * 300])
def test_a_password_too_short_or_too_long_is_refused_with_the_reason(password):
    with pytest.raises(WeakPassword, match="characters"):
        hash_password(password)


def test_a_plain_password_in_the_yaml_is_refused_with_file_and_line(tmp_path):
    text = textwrap.dedent(BASE).format(state_dir=tmp_path).replace(
        "    receive_method: ip_phone\n", "    receive_method: ip_phone\n    password_hash: hunter22\n", 1)
    with pytest.raises(Exception) as caught:
        parse_policy(text, "router.yaml")
    assert any("password_hash: is not an argon2id hash" in p and "sip-router hash-password" in p
               for p in caught.value.problems)


@pytest.fixture
def state(tmp_path, make_policy):
    return PolicyState(make_policy(), SqlitePolicyStore(connect(str(tmp_path / "state.db"))), 1000.0)


def test_an_agent_sets_their_own_password_and_an_admin_anyones_but_not_the_other_way(state):
    state.change("minh", "minh", "password_hash", hash_password("minh-new-pass"), "api", 1001.0)
    assert verify_password(state.view.policy.user("minh").password_hash, "minh-new-pass")
    state.change("lan", "minh", "password_hash", hash_password("reset-by-admin"), "cli", 1002.0)
    assert verify_password(state.view.policy.user("minh").password_hash, "reset-by-admin")
    with pytest.raises(Forbidden):
        state.change("minh", "lan", "password_hash", hash_password("takeover!"), "api", 1003.0)
    with pytest.raises(InvalidChange):
        state.change("lan", "minh", "password_hash", "plain-text-password", "api", 1004.0)


def test_a_later_yaml_password_wins_over_an_older_run_time_one(state, make_policy):
    state.change("minh", "minh", "password_hash", hash_password("runtime-pass"), "api", 1001.0)
    policy = make_policy()                           # the operator then writes a hash into the YAML
    users = tuple(replace(u, password_hash=hash_password("yaml-pass1")) if u.id == "minh" else u
                  for u in policy.users)
    state.reload(replace(policy, users=users), 2000.0)
    assert verify_password(state.view.policy.user("minh").password_hash, "yaml-pass1")
    assert state.view.sources[("minh", "password_hash")].source == "yaml"


def test_set_password_reads_stdin_and_audit_shows_only_that_it_was_set(capsys, tmp_path, monkeypatch):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent(BASE).format(state_dir=tmp_path))
    connect(str(tmp_path / "router.db")).close()        # the CLI opens the router's database, never makes one
    monkeypatch.setattr("sys.stdin", io.StringIO("a-good-password\n"))
    assert main(["-c", str(path), "set-password", "minh", "--as", "lan"]) == 0
    capsys.readouterr()
    assert main(["-c", str(path), "--json", "audit", "minh"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["field"], row["new"], row["by"], row["via"]) == ("password_hash", "(set)", "lan", "cli")
    assert "argon2" not in json.dumps(row)


def test_set_password_refuses_a_short_one_and_writes_nothing(capsys, tmp_path, monkeypatch):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent(BASE).format(state_dir=tmp_path))
    connect(str(tmp_path / "router.db")).close()        # the CLI opens the router's database, never makes one
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["-c", str(path), "set-password", "minh", "--as", "lan"]) == 1
    assert "at least 8 characters" in capsys.readouterr().err
    assert main(["-c", str(path), "--json", "audit", "minh"]) == 0
    assert json.loads(capsys.readouterr().out) == []
