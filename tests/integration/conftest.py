"""Integration fixtures: the real router process on loopback, SIPp and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, RouterProcess, free_port, free_port_run

pytestmark = pytest.mark.integration

POLICY = """\
domain: pbx.test
state_dir: {state}
listen:
  - {{address: 127.0.0.1, port: {port}, transport: udp}}
{tcp}registrar:
  min_expires: {min_expires}
  max_expires: 3600
  default_expires: 600
  max_auth_failures: 2
  source_failures_per_minute: 1000
  algorithms: {algorithms}
trunk: {{address: 127.0.0.1, port: {trunk_port}}}
trusted_peers: [{{name: acd, address: 127.0.0.1}}]
queues:
  - {{id: support, hotline: "842873001234"}}
users:
  - id: lan
    extension: "1001"
    role: admin
    receive_method: all_devices
    agent_phone: "84912345678"
    default_queue: support
    devices:
      - {{id: lan-desk, kind: ip_phone, username: lan-desk, password: desk-secret}}
      - {{id: lan-app, kind: app, username: lan-app, password: app-secret}}
      - {{id: lan-web, kind: web, username: lan-web, password: web-secret}}
  - id: minh
    extension: "1002"
    receive_method: ip_phone
    agent_phone: "84987654321"
    default_queue: support
    devices:
      - {{id: minh-desk, kind: ip_phone, username: minh-desk, password: minh-secret}}
      - {{id: minh-app, kind: app, username: minh-app, password: minh-app-secret}}
log: {{level: {log_level}, format: json, pjsip_level: {pjsip_level}}}
"""


class Lab:
    """One router with its config, and ways to talk to it."""

    def __init__(self, tmp: Path, tcp: bool = False, min_expires: int = 60,
                 algorithms: str = "[MD5, SHA-256]", edit: Callable[[str], str] = lambda t: t,
                 workers: int = 1) -> None:
        self.tmp = tmp
        self.workers = workers
        self.port = free_port() if workers == 1 else free_port_run(workers + 1)
        if workers > 1:
            first_edit = edit
            edit = lambda t: first_edit(t) + f"workers: {workers}\n"  # noqa: E731
        self.trunk_port = free_port()
        self.config = tmp / "router.yaml"
        tcp_line = f"  - {{address: 127.0.0.1, port: {self.port}, transport: tcp}}\n" if tcp else ""
        self.config.write_text(edit(POLICY.format(state=tmp / "state", port=self.port, tcp=tcp_line,
                                                  min_expires=min_expires, algorithms=algorithms,
                                                  trunk_port=self.trunk_port,
                                                  pjsip_level=os.environ.get("SIP_ROUTER_TEST_PJSIP_LEVEL", "2"),
                                                  log_level=os.environ.get("SIP_ROUTER_TEST_LOG_LEVEL", "info"))))
        self.router = RouterProcess(str(self.config), self.port)

    def cli(self, *args: str) -> object:
        out = subprocess.run([sys.executable, "-m", "router", "-c", str(self.config), "--json", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def registrations(self, user: str | None = None, settle: float = 0.3) -> list[dict[str, object]]:
        time.sleep(settle)          # the router flushes bindings to SQLite every 50 ms
        return self.cli("registrations", *([user] if user else []))  # type: ignore[return-value]

    def sipp(self, scenario: Path, *, user: str = "", password: str = "", service: str = "phone",
             transport: str = "u1", timeout: float = 10.0, local_ip: str = "127.0.0.1",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        cmd = ["sipp", "-sf", str(scenario), "-i", local_ip, "-p", str(free_port()), *extra,
               "-m", "1", "-nostdin", "-t", transport, "-s", service,
               "-timeout", str(int(timeout)), "-timeout_error", "-trace_err", "-trace_msg"]
        if user:
            cmd += ["-au", user, "-ap", password]
        cmd.append(f"127.0.0.1:{self.port}")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 15, cwd=self.tmp)

    def calls(self, user: str | None = None) -> list[dict[str, object]]:
        time.sleep(0.2)
        return self.cli("calls", *(["--user", user] if user else []))  # type: ignore[return-value]

    def sipp_log(self, scenario: Path) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.tmp.glob(f"{scenario.stem}_*messages.log"))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if shutil.which("sipp") is None:
        pytest.fail("sipp is not installed: run scripts/test, which installs Debian's sip-tester")
    lab = Lab(tmp_path)
    lab.router.start()
    try:
        yield lab
    finally:
        lab.router.stop()


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[object]:
    labs: list[Lab] = []

    def make(start: bool = True, **kwargs: object) -> Lab:
        sub = tmp_path / f"lab{len(labs)}"
        sub.mkdir()
        lab = Lab(sub, **kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        if start:
            lab.router.start()
        return lab
    try:
        yield make
    finally:
        for lab in labs:
            lab.router.stop()


def dedent(text: str) -> str:
    return textwrap.dedent(text).replace("\n", "\r\n")
