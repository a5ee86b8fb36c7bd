"""The systemd units of deploy/ as systemd reads them: `systemd-analyze verify` accepts each
one, `systemd-analyze security` rates each 2.5 or better, the router's unit keeps the
promises the README makes (its own user, notify and watchdog, no restart on a
configuration or layout error, a reload that validates first), and the sysusers.d and
tmpfiles.d files make the user and the modes the units expect.

systemd need not run: `verify` loads the files, `security --offline=yes` rates the file,
and sysusers/tmpfiles work on a temporary root.  `verify` insists that every command
exists, so a program not installed on this host (/opt/sip-router/..., kamailio, rtpengine)
is pointed at a stand-in script in a temporary directory; nothing else in the unit changes.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.integration

DEPLOY = ROOT / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")
EXEC_KEYS = {"ExecCondition", "ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload",
             "ExecStop", "ExecStopPost"}
MAX_EXPOSURE = 2.5


def _systemd_version() -> int:
    if ANALYZE is None:
        return 0
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.match(r"systemd (\d+)", out)
    return int(found.group(1)) if found else 0


needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian: the "
                                                           "systemd package): the units are not checked")


def _entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; comments and blank lines skipped."""
    section = ""
    entries = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in _entries(path) if k == key]


def _value(path: Path, key: str) -> str:
    values = _values(path, key)
    assert len(values) == 1, f"{path.name}: expected one {key}=, found {values}"
    return values[0]


def _with_stand_ins(unit: Path, tmp: Path) -> Path:
    """A copy of ``unit`` whose commands that do not exist here run a stand-in script."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    lines = []
    for raw in unit.read_text().splitlines():
        key, sep, value = raw.partition("=")
        if sep and key.strip() in EXEC_KEYS and value.strip():
            command = value.strip().lstrip("-@:+!").split()[0]
            if command.startswith("/") and not os.access(command, os.X_OK):
                stand_in = bin_dir / Path(command).name
                stand_in.write_text("#!/bin/sh\nexit 0\n")
                stand_in.chmod(0o755)
                raw = raw.replace(command, str(stand_in), 1)
        lines.append(raw)
    copy = tmp / unit.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


def test_deploy_has_the_four_units() -> None:
    assert [u.name for u in UNITS] == ["sip-router-edge.service", "sip-router-rtpengine.service",
                                       "sip-router-web.service", "sip-router.service"]


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    copy = _with_stand_ins(unit, tmp_path)
    out = subprocess.run([str(ANALYZE), "verify", "--man=no", "--recursive-errors=no", str(copy)],
                         capture_output=True, text=True, timeout=60)
    # any line naming the unit is a warning systemd would log when loading it (lines about
    # this host's own units are not ours to judge)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if unit.name in line]
    assert out.returncode == 0 and not complaints, "\n".join(complaints) or f"exit status {out.returncode}"


@needs_analyze
@pytest.mark.skipif(_systemd_version() < 250, reason="`systemd-analyze security --offline=yes` needs systemd 250 "
                                                      "or later")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_security_rates_the_unit_ok(unit: Path) -> None:
    out = subprocess.run([str(ANALYZE), "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", text)
    assert found, text
    exposure = float(found.group(1))
    weak = "\n".join(line for line in text.splitlines() if line.startswith("✗"))
    assert exposure <= MAX_EXPOSURE, f"{unit.name}: exposure {exposure} {found.group(2)}:\n{weak}"


def test_router_unit_runs_sandboxed_as_its_own_user() -> None:
    unit = DEPLOY / "sip-router.service"
    assert _value(unit, "User") == _value(unit, "Group") == "sip-router"
    assert _value(unit, "ConfigurationDirectory") == _value(unit, "StateDirectory") == "sip-router"
    assert _value(unit, "CacheDirectory") == "sip-router" and _value(unit, "CacheDirectoryMode") == "0700"
    assert _value(unit, "UMask") == "0027"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges"):
        assert _value(unit, key) == "yes", key
    assert _value(unit, "ProtectSystem") == "strict"
    assert _value(unit, "CapabilityBoundingSet") == "" and _value(unit, "AmbientCapabilities") == ""
    assert set(_value(unit, "RestrictAddressFamilies").split()) <= {"AF_UNIX", "AF_INET", "AF_INET6",
                                                                    "AF_NETLINK"}
    assert "@system-service" in _values(unit, "SystemCallFilter")
    assert _value(unit, "SystemCallArchitectures") == "native"


def test_router_unit_notifies_reloads_and_stops_restarting_on_a_bad_configuration() -> None:
    unit = DEPLOY / "sip-router.service"
    assert _value(unit, "Type") == "notify" and _value(unit, "NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s?", _value(unit, "WatchdogSec"))
    assert _value(unit, "Restart") == "on-failure"
    # 2 invalid configuration, 3 PJSIP layout mismatch, 4 state database; 1 (port in use) is retried
    prevented = set(_value(unit, "RestartPreventExitStatus").split())
    assert {"2", "3", "4"} <= prevented and "1" not in prevented
    # RestartPreventExitStatus= looks at the main process only: a check in ExecStartPre
    # failing with 2 would be restarted for ever, so `run` does the checking itself
    assert _values(unit, "ExecStartPre") == []
    assert _value(unit, "ExecStart").endswith("/sip-router run")
    reload = _values(unit, "ExecReload")
    assert len(reload) == 2 and reload[0].endswith("sip-router check ${SIP_ROUTER_CONFIG}")
    assert reload[1] == "/bin/kill -HUP $MAINPID"


def test_web_unit_shares_the_user_and_the_state_directory() -> None:
    router, web = DEPLOY / "sip-router.service", DEPLOY / "sip-router-web.service"
    for key in ("User", "Group", "StateDirectory", "StateDirectoryMode", "ConfigurationDirectory", "UMask",
                "CacheDirectory", "CacheDirectoryMode",
                "ProtectSystem", "CapabilityBoundingSet", "AmbientCapabilities"):
        assert _value(web, key) == _value(router, key), key
    assert "2" in _value(web, "RestartPreventExitStatus").split()
    assert _values(web, "ExecStartPre") == []


def test_tmpfiles_modes_match_the_units() -> None:
    lines = [line.split() for line in (DEPLOY / "sip-router.tmpfiles").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    state = next(f for f in lines if f[1] == "/var/lib/sip-router")
    assert state[0] == "d" and state[3:5] == ["sip-router", "sip-router"]
    for name in ("sip-router.service", "sip-router-web.service"):
        assert _value(DEPLOY / name, "StateDirectoryMode") == state[2]
    policy = next(f for f in lines if f[1] == "/etc/sip-router/router.yaml")
    assert policy[0] == "z" and policy[2:5] == ["0640", "root", "sip-router"]


@pytest.mark.skipif(not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
                    reason="systemd-sysusers and systemd-tmpfiles are not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="setting owners in the temporary root needs root")
def test_sysusers_and_tmpfiles_make_the_user_and_the_modes(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "sip-router").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", etc / name)
    policy = etc / "sip-router" / "router.yaml"
    policy.write_text("domain: pbx.test\n")
    policy.chmod(0o644)
    sysusers = tmp_path / "usr/lib/sysusers.d/sip-router.conf"
    tmpfiles = tmp_path / "usr/lib/tmpfiles.d/sip-router.conf"
    for source, target in ((DEPLOY / "sip-router.sysusers", sysusers), (DEPLOY / "sip-router.tmpfiles", tmpfiles)):
        target.parent.mkdir(parents=True)
        shutil.copy(source, target)
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(sysusers)], check=True, capture_output=True,
                   timeout=60)
    user = next(line.split(":") for line in (etc / "passwd").read_text().splitlines()
                if line.startswith("sip-router:"))
    group = next(line.split(":") for line in (etc / "group").read_text().splitlines()
                 if line.startswith("sip-router:"))
    assert user[3] == group[2] and user[5] == "/var/lib/sip-router" and user[6].endswith("nologin")
    assert int(user[2]) < 1000, "a system user"
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(tmpfiles)], check=True,
                   capture_output=True, timeout=60)
    state = (tmp_path / "var/lib/sip-router").stat()
    assert stat.S_IMODE(state.st_mode) == 0o751 and (state.st_uid, state.st_gid) == (int(user[2]), int(group[2]))
    mode = policy.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o640 and (mode.st_uid, mode.st_gid) == (0, int(group[2]))
