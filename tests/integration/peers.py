"""SIPp processes that play the phones and the PSTN trunk in call tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support import SCENARIOS, free_port


class SippPeer:
    """One long-running SIPp process, stopped by PID when the test ends."""

    def __init__(self, name: str, directory: Path, args: list[str]) -> None:
        self.name = name
        self.port = free_port()
        self.log = directory / f"{name}.messages.log"
        self.out = directory / f"{name}.out"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SippPeer:
        cmd = ["sipp", *self.args, "-i", "127.0.0.1", "-p", str(self.port), "-nostdin",
               "-trace_msg", "-message_file", str(self.log), "-trace_err",
               "-error_file", str(self.log.with_suffix(".errors"))]
        self._out = open(self.out, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=self.log.parent)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None:
            self._out.close()

    def messages(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def received(self, method: str) -> list[str]:
        """Each message of ``method`` this peer received (the text after the marker)."""
        out = []
        for chunk in self.messages().split("----------------------------------------------- ")[1:]:
            body = chunk.split("\n", 2)[-1] if "message received" in chunk.split("\n", 2)[1] else ""
            if body.strip().startswith(f"{method} "):
                out.append(body.lstrip())
        return out

    def wait_received(self, method: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received(method)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.received(method)


def device(directory: Path, router_port: int, aor: str, device_id: str, password: str,
           behaviour: str = "answer") -> SippPeer:
    """A registered phone: registers as ``device_id``, then answers/rings/is busy."""
    csv = directory / f"{device_id}.csv"
    csv.write_text(f"SEQUENTIAL\n{aor};{device_id};[authentication username={device_id} password={password}]\n")
    return SippPeer(device_id, directory, [
        "-sf", str(SCENARIOS / "device_register.xml"), "-oocsf", str(SCENARIOS / f"uas_{behaviour}.xml"),
        "-inf", str(csv), "-m", "1", "-d", "200", "-s", device_id, f"127.0.0.1:{router_port}"])


def trunk(directory: Path, port: int, behaviour: str = "answer") -> SippPeer:
    peer = SippPeer("trunk", directory, ["-sf", str(SCENARIOS / f"uas_{behaviour}.xml"), "-d", "200"])
    peer.port = port
    return peer
