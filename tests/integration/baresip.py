"""baresip, a real softphone, as a child process with its own config directory."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support import free_port


class Baresip:
    def __init__(self, home: Path, user: str, username: str, password: str, router_port: int,
                 transport: str = "udp", regint: int = 600) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.sip_port = free_port()
        (home / "config").write_text(
            "poll_method epoll\n"
            f"sip_listen 127.0.0.1:{self.sip_port}\n"
            "module_path /usr/lib/baresip/modules\n"
            "module g711.so\n"
            "module_tmp uuid.so\n"
            "module_tmp account.so\n")
        # The AOR names the router by address: this machine has no DNS for a SIP
        # domain, and baresip resolves the domain even with an outbound proxy.
        params = ";transport=tcp" if transport == "tcp" else ""
        (home / "accounts").write_text(
            f"<sip:{user}@127.0.0.1:{router_port}{params}>;auth_user={username};"
            f"auth_pass={password};regint={regint};answermode=auto\n")
        self.log_path = home / "baresip.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Baresip:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["baresip", "-f", str(self.home)], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            time.sleep(0.1)
        return False
