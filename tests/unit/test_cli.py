"""The operator CLI, run in-process against a temporary policy file and SQLite state."""

from __future__ import annotations

import json
import textwrap

import pytest

from router.cli import main
from router.store.sqlite import connect

from .conftest import BASE


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent(BASE).format(state_dir=tmp_path))
    connect(str(tmp_path / "router.db")).close()        # as the router makes it when it starts
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_accepts_a_good_file(capsys, config):
    code, out, _ = run(capsys, "check", config)
    assert code == 0 and "OK (2 users, 4 devices, 3 queues, trunk yes)" in out


def test_check_lists_every_error_with_file_and_line_and_fails(capsys, config, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(config).read().replace('"84987654321"', '"0987654321"')
                   .replace("kind: web", "kind: browser"))
    code, _, err = run(capsys, "check", str(bad))
    assert code == 2
    assert "configuration has 2 error(s)" in err
    assert f"{bad}:21:29: users[0].devices[2].kind: 'browser'" in err
    assert (f"{bad}:25:18: users[1].agent_phone: '0987654321' starts with the trunk prefix 0; "
            "write it as 84987654321") in err
    assert err.index(":21:29:") < err.index(":25:18:")


def test_an_admin_sets_an_agents_method_and_the_audit_shows_it(capsys, config):
    code, out, _ = run(capsys, "-c", config, "set-method", "minh", "app", "--as", "lan")
    assert code == 0 and "minh: receive_method ip_phone -> app (by lan)" in out
    code, out, _ = run(capsys, "-c", config, "--json", "users")
    minh = next(u for u in json.loads(out) if u["user"] == "minh")
    assert (minh["method"], minh["source"]) == ("app", "runtime")
    code, out, _ = run(capsys, "-c", config, "--json", "audit", "minh")
    (entry,) = json.loads(out)
    assert (entry["old"], entry["new"], entry["by"], entry["via"]) == ("ip_phone", "app", "lan", "cli")


def test_an_agent_changing_someone_else_is_refused_with_exit_1(capsys, config):
    code, _, err = run(capsys, "-c", config, "set-method", "lan", "app", "--as", "minh")
    assert code == 1 and "may change only their own settings" in err
    code, out, _ = run(capsys, "-c", config, "--json", "audit")
    assert json.loads(out) == []


def test_set_phone_refuses_a_national_number_with_the_canonical_hint(capsys, config):
    code, _, err = run(capsys, "-c", config, "set-phone", "minh", "0911111111", "--as", "minh")
    assert code == 1 and "write it as 84911111111" in err


def test_explain_says_what_a_call_would_do_and_why(capsys, config):
    code, out, _ = run(capsys, "-c", config, "explain", "minh")
    assert code == 0
    assert out.startswith("REJECT 480: ip_phone: no ip_phone device registered")
    run(capsys, "-c", config, "set-method", "minh", "agent_phone", "--as", "minh")
    code, out, _ = run(capsys, "-c", config, "--json", "explain", "minh", "--queue", "support")
    data = json.loads(out)
    assert (data["action"], data["number"], data["caller_id"]) == ("pstn", "84987654321", "842873001234")
    assert "queue 'support' from the X-Queue header" in data["why"]
