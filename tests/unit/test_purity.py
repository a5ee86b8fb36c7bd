"""The sans-IO core imports no SIP binding, socket or database module."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "router"
FORBIDDEN = {"pjsua2", "ctypes", "socket", "sqlite3", "asyncio", "selectors", "select",
             "threading", "subprocess", "http", "urllib", "router.store", "router.sip.engine",
             "router.sip.pjsip_module"}
PURE = sorted((ROOT / "policy").glob("*.py")) + [
    ROOT / "sip" / name for name in ("message.py", "digest.py", "ids.py", "registrar.py", "transaction.py", "core.py",
                                    "proxy.py", "branch.py", "forward.py", "admission.py",
                                    "uac_auth.py", "commands.py", "auth.py", "location.py", "dialogs.py",
                                    "pstn.py", "callrules.py", "reach.py", "keepalive.py", "steer.py",
                                    "pacing.py")]


def test_every_module_of_the_core_is_checked():
    """A new module of router/sip/ is either pure or one of the I/O side's, never unlisted."""
    io_side = {"engine.py", "pjsip_module.py", "commit.py", "writer.py", "sharing.py", "__init__.py"}
    listed = {p.name for p in PURE if p.parent.name == "sip"}
    assert {p.name for p in (ROOT / "sip").glob("*.py")} == listed | io_side


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports_no_io(path):
    bad = {m for m in imported_modules(path)
           if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_policy_never_imports_the_sip_package():
    for path in (ROOT / "policy").glob("*.py"):
        assert not any(m.startswith("router.sip") for m in imported_modules(path)), path.name


def test_the_check_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import sqlite3\nfrom socket import socket\n")
    assert {"sqlite3", "socket"} <= imported_modules(sample)


def test_only_the_sip_package_imports_pjsua2_or_ctypes():
    for path in ROOT.rglob("*.py"):
        if path.parent.name == "sip":
            continue
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("pjsua2", "ctypes")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_one_module_holds_the_raw_pointers():
    users = [p.name for p in (ROOT / "sip").glob("*.py") if "ctypes" in imported_modules(p)]
    assert users == ["pjsip_module.py"]


def test_the_supervisor_of_several_workers_never_loads_the_sip_core():
    """``sip-router run`` decides which process it is in ``router.launch``; the supervisor
    stays there and in ``router.workers``, so it holds no copy of the SIP stack's modules."""
    import subprocess
    import sys
    probe = ("import sys, router.launch; "
             "print(' '.join(m for m in ('router.app', 'router.sip.core', 'router.sip.engine', "
             "'router.sip.proxy', 'router.metrics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT.parent, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == ""
