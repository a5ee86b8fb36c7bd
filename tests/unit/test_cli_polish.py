"""The CLI as scripts and people meet it: options anywhere, exit codes, one-line errors, a
state database it never creates, no-op changes, and the running router's control socket
(answered here by a small fake router on a real Unix socket)."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import shlex
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import textwrap
import threading

import pytest

from router import cli
from router.cli import main
from router.store.sqlite import SCHEMA_VERSION, connect

from .conftest import BASE


def write_config(directory, state_dir) -> str:
    path = directory / "router.yaml"
    path.write_text(textwrap.dedent(BASE).format(state_dir=state_dir))
    return str(path)


@pytest.fixture
def bare(tmp_path):
    """A valid config whose state database does not exist yet."""
    return write_config(tmp_path, tmp_path)


@pytest.fixture
def config(tmp_path, bare):
    connect(str(tmp_path / "router.db")).close()       # as the router makes it when it starts
    return bare


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ options, version, usage

def test_global_options_work_after_the_command_too(capsys, config):
    code, out, _ = run(capsys, "registrations", "minh", "--json", "-c", config)
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, "users", "--config", config, "--json")
    assert code == 0 and {u["user"] for u in json.loads(out)} == {"lan", "minh"}
    code, out, _ = run(capsys, "check", "-c", config)
    assert code == 0 and f"{config}: OK" in out


def test_options_before_the_command_are_not_undone_by_the_command(capsys, config):
    code, out, _ = run(capsys, "--json", "-c", config, "users")
    assert code == 0 and isinstance(json.loads(out), list)


def test_version_prints_the_package_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"sip-router {importlib.metadata.version('sip-router')}"


def test_a_mistyped_command_line_exits_2(capsys, config):
    code, _, err = run(capsys, "-c", config, "set-method", "minh")
    assert code == 2 and "the following arguments are required" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_help_names_the_default_config_paths_and_the_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "/etc/sip-router/router.yaml" in out and "config/router.yaml" in out and "/var/lib/sip-router" in out
    assert "exit status:" in out and "the router is not running" in out


def test_the_default_config_is_the_checkout_one_here_else_the_installed_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SIP_ROUTER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.default_config() == "/etc/sip-router/router.yaml"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "router.yaml").write_text("domain: x\n")
    assert cli.default_config() == "config/router.yaml"
    monkeypatch.setenv("SIP_ROUTER_CONFIG", "/srv/router.yaml")
    assert cli.default_config() == "/srv/router.yaml"


# ------------------------------------------------------------------ exit codes a script can trust

def test_an_unknown_user_is_an_error_for_every_command_that_names_one(capsys, config):
    for argv in (["explain", "nobody"], ["registrations", "nobody"], ["audit", "nobody"],
                 ["calls", "--user", "nobody"], ["set-method", "nobody", "app", "--as", "lan"]):
        code, out, err = run(capsys, "-c", config, *argv)
        assert code == 1 and "no user or extension 'nobody'" in err and out == "", argv


def test_a_known_user_with_no_history_is_not_an_error(capsys, config):
    code, out, _ = run(capsys, "-c", config, "--json", "audit", "1002")     # by extension
    assert code == 0 and json.loads(out) == []


def test_setting_a_value_already_in_force_writes_nothing_and_says_so(capsys, config):
    code, out, _ = run(capsys, "-c", config, "set-method", "minh", "ip_phone", "--as", "lan")
    assert code == 0 and out.strip() == "minh: receive_method is already ip_phone; nothing changed"
    code, out, _ = run(capsys, "-c", config, "--json", "set-phone", "minh", "84987654321", "--as", "minh")
    assert code == 0 and json.loads(out)["changed"] is False
    code, out, _ = run(capsys, "-c", config, "--json", "audit")
    assert json.loads(out) == []
    code, out, _ = run(capsys, "-c", config, "--json", "users")
    assert next(u for u in json.loads(out) if u["user"] == "minh")["source"] == "yaml"


def test_a_real_change_says_it_changed(capsys, config):
    code, out, _ = run(capsys, "-c", config, "--json", "set-method", "minh", "app", "--as", "lan")
    assert code == 0 and json.loads(out)["changed"] is True and json.loads(out)["new"] == "app"


def test_a_no_op_someone_may_not_make_is_still_refused(capsys, config):
    code, _, err = run(capsys, "-c", config, "set-method", "lan", "all_devices", "--as", "minh")
    assert code == 1 and "may change only their own settings" in err


def test_set_password_for_an_unknown_user_asks_for_no_password(capsys, config, monkeypatch):
    monkeypatch.setattr("sys.stdin", None)          # reading a password would fail loudly
    code, _, err = run(capsys, "-c", config, "set-password", "nobody", "--as", "lan")
    assert code == 1 and "no user or extension 'nobody'" in err


# ------------------------------------------------------------------ the state database

def test_the_cli_refuses_a_missing_database_and_creates_none(capsys, tmp_path):
    state_dir = tmp_path / "not-here"
    config = write_config(tmp_path, state_dir)
    for argv in (["users"], ["set-method", "minh", "app", "--as", "lan"], ["registrations"], ["audit"],
                 ["calls"], ["explain", "minh"]):
        code, out, err = run(capsys, "-c", config, *argv)
        assert code == 4 and out == "", argv
        assert err == (f"error: no state database at {state_dir}/router.db (no such file): start the router "
                       f"once (sip-router run), or check state_dir in {config}\n")
    assert not state_dir.exists()


def test_an_empty_file_is_not_taken_for_a_database(capsys, tmp_path, bare):
    (tmp_path / "router.db").write_bytes(b"")
    code, _, err = run(capsys, "-c", bare, "users")
    assert code == 4 and "the file is empty" in err
    assert (tmp_path / "router.db").read_bytes() == b""


def test_a_garbage_database_is_one_line_and_check_notices_it(capsys, tmp_path, bare):
    (tmp_path / "router.db").write_bytes(b"these are not the bytes you are looking for\n" * 100)
    code, out, err = run(capsys, "-c", bare, "users")
    assert code == 4 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: state database {tmp_path}/router.db: file is not a database: restore it")
    code, out, err = run(capsys, "check", bare)
    assert code == 4 and f"{bare}: OK" in out
    assert f"{tmp_path}/router.db: file is not a database" in err


def test_a_database_damaged_past_its_first_page_is_one_line(capsys, tmp_path, config):
    conn = sqlite3.connect(str(tmp_path / "router.db"))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(tmp_path / "router.db", "r+b") as handle:
        handle.seek(page)                                  # keep the header and the schema page
        handle.write(b"\xff" * (os.path.getsize(tmp_path / "router.db") - page))
    code, out, err = run(capsys, "-c", config, "audit")
    assert code == 4 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: state database {tmp_path}/router.db: ")


def test_a_database_from_a_newer_sip_router_is_refused(capsys, tmp_path, config):
    conn = sqlite3.connect(str(tmp_path / "router.db"))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    code, _, err = run(capsys, "-c", config, "users")
    assert code == 4 and f"schema version {SCHEMA_VERSION + 1} was written by a newer sip-router" in err
    code, _, err = run(capsys, "check", config)
    assert code == 4 and "newer sip-router" in err


def test_check_says_where_the_state_is_and_that_a_missing_one_is_made_at_start(capsys, tmp_path, bare):
    code, out, _ = run(capsys, "check", bare)
    assert code == 0 and f"state: {tmp_path}/router.db does not exist yet" in out
    assert not (tmp_path / "router.db").exists()
    connect(str(tmp_path / "router.db")).close()
    code, out, _ = run(capsys, "--json", "check", bare)
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["schema_version"] == SCHEMA_VERSION
    assert data["database"] == f"{tmp_path}/router.db"


def test_an_unreadable_config_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "-c", str(tmp_path), "users")
    assert code == 2 and "cannot read the file: Is a directory" in err


def test_a_closed_pipe_ends_the_command_quietly(capsys, config, monkeypatch):
    # `sip-router audit | head -1`: the reader has gone before the output is written
    reader, writer = os.pipe()
    os.close(reader)
    stdout = io.TextIOWrapper(io.FileIO(writer, "w"), encoding="utf-8")
    monkeypatch.setattr("sys.stdout", stdout)
    try:
        assert main(["-c", config, "audit"]) == 0
        stdout.write("x" * 100_000)
        stdout.flush()                   # what the interpreter does at exit: no second failure
    finally:
        monkeypatch.undo()
        stdout.close()
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ the running router's socket

class FakeRouter:
    """Answers one connection on ``path`` with ``reply`` and keeps the request it got."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)

    def answer(self, reply: bytes, *, delay: float = 0.0) -> threading.Thread:
        def serve() -> None:
            conn, _ = self.sock.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    data += conn.recv(4096)
                self.requests.append(json.loads(data))
                threading.Event().wait(delay)
                try:
                    conn.sendall(reply)
                except OSError:
                    pass                       # the client gave up first
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        return thread

    def reply(self, result: object) -> threading.Thread:
        return self.answer(json.dumps({"ok": True, "result": result}).encode() + b"\n")


@pytest.fixture
def live(tmp_path):
    """A config whose state_dir is short enough for a Unix socket path, no database in it,
    and a fake router on its control socket."""
    state_dir = tempfile.mkdtemp(prefix="sr-", dir="/tmp")
    router = FakeRouter(os.path.join(state_dir, "control.sock"))
    yield write_config(tmp_path, state_dir), router
    router.sock.close()
    shutil.rmtree(state_dir)


STATUS = {"version": "0.1.0", "pid": 4242, "uptime_s": 3725.4, "config": "/etc/sip-router/router.yaml",
          "policy_marker": 7, "registrations": {"web": 1, "app": 2, "ip_phone": 3},
          "registrations_by_transport": {"udp": 3, "wss": 1, "tls": 2},
          "calls": {"ringing": 2, "answered": 5},
          "trunk": {"configured": True, "registered": True, "detail": "200 OK, expires in 300 s"},
          "counters": {"requests": 120, "responses": 80}}


def test_status_asks_the_router_and_prints_a_summary(capsys, live):
    config, router = live
    router.reply(STATUS)
    code, out, _ = run(capsys, "-c", config, "status")
    assert code == 0 and router.requests == [{"command": "status", "args": {}}]
    assert out.splitlines() == [
        "sip-router 0.1.0, pid 4242, up 1 h 2 min",
        "config: /etc/sip-router/router.yaml (policy marker 7)",
        "registrations: 6 (app 2, ip_phone 3, web 1); by transport: tls 2, udp 3, wss 1",
        "calls now: 2 ringing, 5 answered",
        "trunk: registered (200 OK, expires in 300 s)",
        "counters: requests 120, responses 80",
    ]


@pytest.mark.parametrize("trunk, line", [
    ({"configured": False, "registered": None, "detail": "no trunk configured"}, "trunk: not configured"),
    ({"configured": True, "registered": None, "detail": "10.0.0.9:5060 without registration"},
     "trunk: 10.0.0.9:5060 without registration"),
    ({"configured": True, "registered": False, "detail": "403 Forbidden"}, "trunk: NOT registered (403 Forbidden)"),
])
def test_status_says_how_the_trunk_stands(trunk, line):
    from router import control_client
    assert line in control_client.render_status({**STATUS, "trunk": trunk}).splitlines()


def test_status_json_is_the_routers_answer_as_it_is(capsys, live):
    config, router = live
    router.reply(STATUS)
    code, out, _ = run(capsys, "status", "--json", "-c", config)
    assert code == 0 and json.loads(out) == STATUS


def test_live_calls_come_from_the_router_and_filter_by_user(capsys, live):
    config, router = live
    calls = [{"call_id": "a1", "user": "minh", "queue": "sales", "method": "ip_phone", "state": "ringing",
              "branches": ["minh-desk"], "started_at": 1_700_000_000.0, "answered_by": None},
             {"call_id": "b2", "user": "lan", "queue": "support", "method": "all_devices", "state": "answered",
              "branches": ["lan-desk", "lan-app"], "started_at": 1_700_000_001.0, "answered_by": "lan-app"}]
    router.reply({"calls": calls})
    code, out, _ = run(capsys, "-c", config, "calls", "--live")
    assert code == 0 and router.requests == [{"command": "calls", "args": {}}]
    header, *rows = out.splitlines()
    assert header.split() == ["STARTED", "FOR", "USER", "QUEUE", "METHOD", "STATE", "BRANCHES", "ANSWERED_BY",
                              "CALL_ID"]
    assert len(rows) == 2 and "lan-desk,lan-app" in rows[1] and rows[1].rstrip().endswith("b2")
    router.reply({"calls": calls})
    code, out, _ = run(capsys, "-c", config, "--json", "calls", "--live", "--user", "minh")
    assert code == 0 and json.loads(out) == calls[:1]


def test_unregister_sends_the_device_and_says_what_was_removed(capsys, live):
    config, router = live
    router.reply({"device": "minh-desk", "removed": 2})
    code, out, _ = run(capsys, "-c", config, "unregister", "minh-desk")
    assert code == 0 and out.strip() == "minh-desk: 2 registration(s) removed"
    assert router.requests == [{"command": "unregister", "args": {"device": "minh-desk"}}]
    router.reply({"device": "minh-desk", "removed": 0})
    code, out, _ = run(capsys, "-c", config, "unregister", "minh-desk")
    assert code == 0 and out.strip() == "minh-desk: was not registered; nothing removed"


def test_a_refusal_by_the_router_is_its_sentence_and_exit_1(capsys, live):
    config, router = live
    router.answer(b'{"ok": false, "error": "no device \'nope\' in the policy"}\n')
    code, out, err = run(capsys, "-c", config, "unregister", "nope")
    assert code == 1 and out == "" and err == "error: no device 'nope' in the policy\n"


def test_reload_prints_the_outcome_and_fails_when_refused(capsys, live):
    config, router = live
    router.reply({"reloaded": True, "errors": [], "users": 2})
    code, out, _ = run(capsys, "-c", config, "reload")
    assert code == 0 and out.strip() == "reloaded: 2 users"
    router.reply({"reloaded": False, "errors": ["router.yaml:3:1: not valid YAML: ..."], "users": 2})
    code, out, _ = run(capsys, "-c", config, "reload")
    assert code == 1
    assert out.splitlines() == ["not reloaded (1 error(s)); the router keeps the last good policy",
                                "  router.yaml:3:1: not valid YAML: ..."]


def test_no_router_running_is_exit_5_naming_the_socket(capsys, tmp_path):
    config = write_config(tmp_path, tmp_path)
    code, out, err = run(capsys, "-c", config, "status")
    assert code == 5 and out == ""
    assert err == f"error: the router is not running (no socket at {tmp_path}/control.sock)\n"


def test_a_socket_left_by_a_killed_router_is_not_running_either(capsys, live):
    config, router = live
    router.sock.close()                                   # the file stays; nobody listens
    assert os.path.exists(router.path)
    code, _, err = run(capsys, "-c", config, "reload")
    assert code == 5 and "the router is not running" in err


def test_a_router_that_does_not_answer_in_time_is_an_error_not_a_hang(live, monkeypatch):
    _, router = live
    router.answer(b"", delay=2.0)
    from router import control_client
    with pytest.raises(control_client.ControlError, match="did not answer 'status' within 0.2 s"):
        control_client.request(router.path, "status", timeout=0.2)


@pytest.mark.parametrize("reply, words", [
    (b"not json\n", "is not JSON"),
    (b"[1, 2]\n", 'has no "ok"'),
    (b"", "closed the connection without answering"),
])
def test_an_answer_that_is_not_the_protocol_is_an_error(live, reply, words):
    _, router = live
    router.answer(reply)
    from router import control_client
    with pytest.raises(control_client.ControlError, match=words):
        control_client.request(router.path, "status")


def test_status_still_finds_the_router_while_the_config_is_mid_edit(capsys, live):
    config, router = live
    with open(config, "a") as handle:
        handle.write("routing: {ring_timeout: 1}\n")     # invalid, but state_dir is still readable
    router.reply(STATUS)
    code, out, _ = run(capsys, "-c", config, "--json", "status")
    assert code == 0 and json.loads(out)["pid"] == 4242


# ------------------------------------------------------------------ bash completion

COMPLETION = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "completion", "sip-router.bash")


def complete(*words: str) -> list[str]:
    """What bash offers for the command line ``words`` (the last one being typed)."""
    script = (f"source {shlex.quote(COMPLETION)}\n"
              f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              "_sip_router; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True)
    return [w for w in out.stdout.split("\n") if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completion_offers_every_command_and_nothing_else():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    offered = complete("sip-router", "")
    assert {w for w in offered if not w.startswith("-")} == set(commands.choices)
    assert {"-c", "--config", "--json", "--version"} <= set(offered)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completion_knows_the_methods_and_each_commands_options():
    assert complete("sip-router", "set-method", "minh", "") == ["all_devices", "app", "ip_phone", "agent_phone"]
    assert complete("sip-router", "-c", "x.yaml", "calls", "--l") == ["--limit", "--live"]
    assert complete("sip-router", "explain", "minh", "--mode", "") == ["proxy", "redirect"]
