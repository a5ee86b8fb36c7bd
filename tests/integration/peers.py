"""SIPp processes that play the phones and the PSTN trunk in call tests."""

from __future__ import annotations

import socket
import subprocess
import threading
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
           behaviour: str = "answer", answer_delay_ms: int = 200) -> SippPeer:
    """A registered phone: registers as ``device_id``, then answers/rings/is busy.

    ``answer_delay_ms``: how long an answering phone rings before its 200 OK.
    """
    csv = directory / f"{device_id}.csv"
    csv.write_text(f"SEQUENTIAL\n{aor};{device_id};[authentication username={device_id} password={password}]\n")
    return SippPeer(device_id, directory, [
        "-sf", str(SCENARIOS / "device_register.xml"), "-oocsf", str(SCENARIOS / f"uas_{behaviour}.xml"),
        "-inf", str(csv), "-m", "1", "-d", str(answer_delay_ms), "-s", device_id, f"127.0.0.1:{router_port}"])


def trunk(directory: Path, port: int, behaviour: str = "answer") -> SippPeer:
    peer = SippPeer("trunk", directory, ["-sf", str(SCENARIOS / f"uas_{behaviour}.xml"), "-d", "200"])
    peer.port = port
    return peer


class SippFarm(SippPeer):
    """One SIPp process registering many devices of a generated config (``write_fork_config``):
    device ``<prefix><i>`` of user ``u<i>``, password ``p<i>``; each then answers or rings.
    No message trace (a soak would write gigabytes); errors only."""

    def __init__(self, directory: Path, router_port: int, users: int, prefix: str, behaviour: str,
                 rate: int = 200) -> None:
        rows = ["SEQUENTIAL"] + [f"u{i};{prefix}{i};[authentication username={prefix}{i} password=p{i}]"
                                 for i in range(users)]
        data = directory / f"farm-{prefix}.csv"
        data.write_text("\n".join(rows) + "\n")
        super().__init__(f"farm-{prefix}", directory, [
            "-sf", str(SCENARIOS / "device_register.xml"), "-oocsf", str(SCENARIOS / f"uas_{behaviour}.xml"),
            "-inf", str(data), "-m", str(users), "-l", str(users), "-r", str(rate), "-d", "0",
            "-buff_size", str(4 * 1024 * 1024), "-max_socket", "1000",
            "-watchdog_minor_threshold", "5000", "-watchdog_major_threshold", "10000",
            f"127.0.0.1:{router_port}"])

    def start(self) -> SippFarm:
        cmd = ["sipp", *self.args, "-i", "127.0.0.1", "-p", str(self.port), "-nostdin",
               "-trace_err", "-error_file", str(self.log.with_suffix(".errors"))]
        self._out = open(self.out, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=self.log.parent)
        return self


class SilentUdp:
    """A UDP peer that receives and never answers: a trunk or phone that has gone away
    without closing anything.  ``provisional=True`` answers each INVITE with 100 Trying
    once, then nothing (a carrier that accepted the call and never rings).  A thread
    records what arrives; ``stop`` ends it (also on failure, from a ``finally``)."""

    def __init__(self, port: int = 0, provisional: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.provisional = provisional
        self.messages: list[tuple[float, bytes]] = []
        self._answered: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SilentUdp:
        self._thread.start()
        return self

    def __enter__(self) -> SilentUdp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            self.messages.append((time.monotonic(), data))
            if self.provisional and data.startswith(b"INVITE "):
                head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                keep = [line for line in head[1:] if line.split(b":", 1)[0].strip().lower()
                        in (b"via", b"v", b"from", b"f", b"to", b"t", b"call-id", b"i", b"cseq")]
                call_id = next((line for line in keep if line.lower().startswith((b"call-id", b"i:"))), b"")
                if call_id not in self._answered:
                    self._answered.add(call_id)
                    self.sock.sendto(b"\r\n".join([b"SIP/2.0 100 Trying", *keep, b"Content-Length: 0"])
                                     + b"\r\n\r\n", source)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.sock.close()

    def received(self, method: str) -> list[tuple[float, bytes]]:
        return [(at, data) for at, data in list(self.messages) if data.startswith(f"{method} ".encode())]
