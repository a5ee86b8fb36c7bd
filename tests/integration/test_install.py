"""scripts/install into a temporary root: a venv that is not editable and has no test
tools, whose `sip-router` runs and accepts the installed policy; the units, sysusers.d and
tmpfiles.d files; the example policy with its state in /var/lib/sip-router, mode 0640.
Run again it changes nothing, and an edited policy is kept with the new example beside it.

The install runs from a copy of the checkout, so that edits made to the tree meanwhile do
not change what the runs compare.  The first run builds the venv (pip, from its index or
cache: about 20 s here); later runs only compare.  The tests of this module share that
root and run in file order: the last ones edit it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.integration

TEST_TOOLS = {"pytest", "hypothesis", "ruff", "mypy", "playwright", "types-pyyaml"}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules")


@dataclass
class Installed:
    src: Path
    root: Path
    output: str

    @property
    def venv(self) -> Path:
        return self.root / "opt/sip-router/.venv"

    @property
    def policy(self) -> Path:
        return self.root / "etc/sip-router/router.yaml"

    def install(self, root: Path | None = None) -> str:
        out = subprocess.run([str(self.src / "scripts/install"), "--root", str(root or self.root)],
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0 and "need Python 3.11 or 3.12" in out.stderr:
            pytest.skip(f"no Python for the service's venv: {out.stderr.strip()}")
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr


def _copy_checkout(dst: Path) -> Path:
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("router", "deploy", "config"):
        shutil.copytree(ROOT / name, dst / name, ignore=IGNORED)
    (dst / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts/install", dst / "scripts/install")
    return dst


def _tree(root: Path) -> dict[str, tuple[int, int, int, int, int, str]]:
    """Every path under ``root`` with its mode, owner, size, mtime and link target."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                                  target)
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    result = Installed(src=_copy_checkout(src), root=base / "root", output="")
    result.output = result.install()
    yield result


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # not from the checkout: `python -c` would import its router/ instead of the venv's
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_installed_cli_runs_and_accepts_the_installed_policy(installed: Installed) -> None:
    cli = installed.venv / "bin/sip-router"
    out = _run([str(cli), "--help"], installed.root)
    assert out.returncode == 0 and "check" in out.stdout, out.stderr
    out = _run([str(cli), "check", str(installed.policy)], installed.root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout


def test_venv_is_not_editable_and_has_no_test_tools(installed: Installed) -> None:
    python = str(installed.venv / "bin/python")
    listed = _run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"], installed.root)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "sip-router" in names and "pjsua2-python" in names
    assert not names & TEST_TOOLS, f"test tools in the service's venv: {sorted(names & TEST_TOOLS)}"
    editable = _run([python, "-m", "pip", "list", "--editable", "--format=json", "--disable-pip-version-check"],
                    installed.root)
    assert json.loads(editable.stdout) == []
    where = _run([python, "-c", "import router; print(router.__file__)"], installed.root).stdout.strip()
    assert where.startswith(str(installed.venv / "lib")), where
    # the interpreter is one the service can see (ProtectHome=yes hides /home and /root)
    base = os.path.realpath(installed.venv / "bin/python")
    assert not base.startswith(("/home/", "/root/")), base


def test_policy_is_the_example_with_the_state_in_var_lib(installed: Installed) -> None:
    example = (ROOT / "config/router.yaml").read_text().splitlines()
    ours = installed.policy.read_text().splitlines()
    assert len(ours) == len(example)
    changed = [(a, b) for a, b in zip(example, ours, strict=True) if a != b]
    assert [b.split("#")[0].strip() for a, b in changed if a.startswith("state_dir:")] == \
        ["state_dir: /var/lib/sip-router"]
    assert all(a.startswith(("state_dir:", "# Check an edit")) for a, _ in changed), changed
    assert stat.S_IMODE(installed.policy.stat().st_mode) == 0o640
    assert stat.S_IMODE(installed.policy.parent.stat().st_mode) == 0o755
    state = installed.root / "var/lib/sip-router"
    assert stat.S_IMODE(state.stat().st_mode) == 0o751


def test_units_and_system_files_are_installed(installed: Installed) -> None:
    for unit in (ROOT / "deploy").glob("*.service"):
        copy = installed.root / "usr/lib/systemd/system" / unit.name
        assert copy.read_bytes() == (installed.src / "deploy" / unit.name).read_bytes()
        assert stat.S_IMODE(copy.stat().st_mode) == 0o644
        # every program the unit runs from /opt/sip-router is there
        for line in copy.read_text().splitlines():
            if line.startswith("Exec") and "/opt/sip-router/" in line:
                program = line.split("=", 1)[1].lstrip("-@:+!").split()[0]
                assert os.access(installed.root / program.lstrip("/"), os.X_OK), program
    assert (installed.root / "usr/lib/sysusers.d/sip-router.conf").read_bytes() == \
        (installed.src / "deploy/sip-router.sysusers").read_bytes()
    assert (installed.root / "usr/lib/tmpfiles.d/sip-router.conf").read_bytes() == \
        (installed.src / "deploy/sip-router.tmpfiles").read_bytes()
    # no /etc/passwd in this root: nothing to give the files to, and it says so
    assert "no-user" in installed.output
    assert "systemctl enable --now sip-router sip-router-web" in installed.output


def test_agent_page_phone_is_installed_when_npm_is_there(installed: Installed) -> None:
    jssip = next((installed.venv / "lib").glob("python3*/site-packages/router/web/jssip"))
    assert (jssip / "package-lock.json").is_file()
    if shutil.which("npm") is None:
        assert "no npm" in installed.output
    else:
        assert (jssip / "node_modules/jssip/dist/jssip.min.js").is_file(), installed.output


def test_second_run_changes_nothing_and_an_edited_policy_is_kept(installed: Installed) -> None:
    before = _tree(installed.root)
    output = installed.install()
    assert _tree(installed.root) == before
    assert not re.search(r"^scripts/install: (installed|updated)", output, re.MULTILINE), output

    first = installed.policy.read_text()
    edited = first.replace("domain: pbx.example.com", "domain: pbx.customer.example")
    assert edited != first
    installed.policy.write_text(edited)
    output = installed.install()
    assert installed.policy.read_text() == edited
    dist = installed.policy.with_name("router.yaml.dist")
    assert dist.read_text() == first and stat.S_IMODE(dist.stat().st_mode) == 0o640
    assert "kept" in output and "router.yaml.dist" in output, output

    before = _tree(installed.root)
    installed.install()
    assert _tree(installed.root) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_a_root_with_an_etc_passwd_gets_the_user_and_the_owners(installed: Installed, tmp_path: Path) -> None:
    # A copy of the first root: its venv is up to date, so this run only does the files.
    root = tmp_path / "root"
    shutil.copytree(installed.root, root, symlinks=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    output = installed.install(root)
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("sip-router:"))
    uid, gid = int(user[2]), int(user[3])
    policy = (root / "etc/sip-router/router.yaml").stat()
    assert (policy.st_uid, policy.st_gid, stat.S_IMODE(policy.st_mode)) == (0, gid, 0o640)
    state = (root / "var/lib/sip-router").stat()
    assert (state.st_uid, state.st_gid, stat.S_IMODE(state.st_mode)) == (uid, gid, 0o751)
    assert "unchanged" in output and "sip-router (" in output
