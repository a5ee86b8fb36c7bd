"""``sip-router web`` as a child process for tests, and the YAML it needs.

Like ``RouterProcess``: started by the test, logging JSON to a file, and stopped by
its PID (SIGTERM, then SIGKILL) when the ``with`` block ends, also when a test fails.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from router.web.passwords import hash_password
from tests.support import ROOT, free_port, json_events, read_log, stop_process

PASSWORDS = {"lan": "lan-web-password", "minh": "minh-web-password"}


def web_section(port: int, max_login_failures: int = 5, address_failures_per_minute: int = 20) -> str:
    return (f"web: {{address: 127.0.0.1, port: {port}, max_login_failures: {max_login_failures}, "
            f"address_failures_per_minute: {address_failures_per_minute}}}\n")


def with_web(port: int, passwords: dict[str, str] | None = None, **limits: int) -> Callable[[str], str]:
    """A ``Lab`` edit: an argon2id ``password_hash`` for each user (made now, from ``passwords``)
    and a ``web:`` section on ``port``."""
    chosen = PASSWORDS if passwords is None else passwords

    def edit(text: str) -> str:
        for user, password in chosen.items():
            marker = f"  - id: {user}\n"
            assert marker in text, f"no user {user} in the lab's YAML"
            text = text.replace(marker, f"{marker}    password_hash: \"{hash_password(password)}\"\n")
        return text + web_section(port, **limits)
    return edit


def web_port() -> int:
    return free_port(socket.SOCK_STREAM)


class WebProcess:
    """``sip-router -c CONFIG web`` on 127.0.0.1:``port``."""

    def __init__(self, config: str | Path, port: int, tls: bool = False) -> None:
        self.config = str(config)
        self.port = port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.log_path = Path(self.config).with_suffix(f".web{port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> WebProcess:
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "router", "-c", self.config, "web"], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"sip-router web exited with {self.proc.returncode}:\n{self.log_text()}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sip-router web did not answer within {timeout} s:\n{self.log_text()}")

    def _answers(self) -> bool:
        # a test's HTTPS certificate is self-signed: only that the server answers matters here
        context = ssl._create_unverified_context() if self.url.startswith("https") else None
        try:
            with urllib.request.urlopen(f"{self.url}/login", timeout=0.5, context=context) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def __enter__(self) -> WebProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout)
        if not self._log.closed:
            self._log.close()
        return code

    def log_text(self) -> str:
        return read_log(self.log_path)

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        return json_events(self.log_text(), name)
