"""The CLI as an operator's shell runs it: a real process, its exit status, what it prints
on stdout and stderr, and never a traceback for a person's mistake."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from router.policy.effective import Change
from router.store.sqlite import SqlitePolicyStore, connect
from tests.support import ROOT

pytestmark = pytest.mark.integration

CONFIG = """\
domain: pbx.test
state_dir: {state_dir}
trunk: {{address: 127.0.0.1, port: 5080}}
queues:
  - {{id: support, hotline: "842873001234"}}
users:
  - id: lan
    extension: "1001"
    role: admin
    receive_method: all_devices
    devices:
      - {{id: lan-desk, kind: ip_phone, password: p1}}
  - id: minh
    extension: "1002"
    receive_method: ip_phone
    devices:
      - {{id: minh-desk, kind: ip_phone, password: p2}}
"""

CLI = [sys.executable, "-m", "router"]


def sip_router(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent(CONFIG).format(state_dir=tmp_path))
    return path


@pytest.fixture
def database(tmp_path: Path, config: Path) -> Path:
    """The state database, as the router makes it when it starts."""
    connect(str(tmp_path / "router.db")).close()
    return tmp_path / "router.db"


def test_options_after_the_command(config: Path, database: Path) -> None:
    result = sip_router("registrations", "minh", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    result = sip_router("check", "-c", str(config))
    assert result.returncode == 0 and f"{config}: OK" in result.stdout


def test_version_from_the_installed_command() -> None:
    command = Path(sys.executable).parent / "sip-router"
    argv = [str(command)] if command.exists() else CLI
    result = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
    import router
    assert result.returncode == 0 and result.stdout.strip() == f"sip-router {router.__version__}"


def test_explaining_an_unknown_user_fails_with_one_line(config: Path, database: Path) -> None:
    result = sip_router("-c", str(config), "explain", "nobody")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: no user or extension 'nobody'\n"


def test_a_closed_pipe_is_not_a_traceback(config: Path, database: Path) -> None:
    # more audit rows than a pipe holds, so the CLI is still writing when `head` has gone
    store = SqlitePolicyStore(connect(str(database)))
    for i in range(4000):
        store.record_change(Change("minh", "receive_method", "ip_phone", "app", "lan", "cli", 1000.0 + i))
    line = " ".join(shlex.quote(a) for a in [*CLI, "-c", str(config), "audit", "--limit", "4000"])
    result = subprocess.run(["bash", "-c", f"{line} | head -1; echo \"status=${{PIPESTATUS[0]}}\" >&2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["ID", "AT", "USER", "FIELD", "OLD", "NEW", "BY", "VIA"]
    assert result.stderr == "status=0\n"


def test_a_missing_database_is_refused_and_not_created(tmp_path: Path) -> None:
    state_dir = tmp_path / "elsewhere"
    config = tmp_path / "router.yaml"
    config.write_text(textwrap.dedent(CONFIG).format(state_dir=state_dir))
    result = sip_router("-c", str(config), "set-method", "minh", "app", "--as", "lan")
    assert result.returncode == 4 and result.stdout == ""
    assert result.stderr == (f"error: no state database at {state_dir}/router.db (no such file): start the "
                             f"router once (sip-router run), or check state_dir in {config}\n")
    assert not state_dir.exists()


def test_a_garbage_database_is_one_line_and_check_notices(config: Path, tmp_path: Path) -> None:
    (tmp_path / "router.db").write_bytes(b"\x00\x01garbage\xff" * 500)
    result = sip_router("-c", str(config), "users")
    no_traceback(result)
    assert result.returncode == 4 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: state database {tmp_path}/router.db: file is not a database")
    result = sip_router("check", str(config))
    no_traceback(result)
    assert result.returncode == 4 and "OK" in result.stdout and "file is not a database" in result.stderr


def test_a_change_to_the_value_in_force_writes_nothing(config: Path, database: Path) -> None:
    result = sip_router("-c", str(config), "set-method", "minh", "ip_phone", "--as", "lan")
    assert result.returncode == 0
    assert result.stdout == "minh: receive_method is already ip_phone; nothing changed\n"
    assert json.loads(sip_router("-c", str(config), "--json", "audit").stdout) == []


def test_check_lists_errors_in_file_order_with_columns_and_suggestions(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(CONFIG).format(state_dir=tmp_path)
                   .replace("    receive_method: ip_phone", "    recieve_method: ip_phone")
                   .replace('hotline: "842873001234"', "hotline: 12"))
    result = sip_router("check", "-c", str(bad))
    no_traceback(result)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "configuration has 2 error(s):"
    assert lines[1].startswith(f"  {bad}:5:")
    assert lines[2].startswith(f"  {bad}:15:5: users[1].recieve_method: unknown key; did you mean "
                               "'receive_method'?")


def test_a_config_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    result = sip_router("-c", str(tmp_path), "users")
    no_traceback(result)
    assert result.returncode == 2 and "cannot read the file: Is a directory" in result.stderr


def test_asking_a_router_that_is_not_running(config: Path, tmp_path: Path) -> None:
    for argv in (["status"], ["calls", "--live"], ["unregister", "minh-desk"], ["reload"]):
        result = sip_router("-c", str(config), *argv)
        assert result.returncode == 5, argv
        assert result.stderr == f"error: the router is not running (no socket at {tmp_path}/control.sock)\n"
