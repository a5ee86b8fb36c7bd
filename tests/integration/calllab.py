"""A lab router with phones, a trunk and callers, shared by the call and fault tests.

Every peer it starts is stopped by its PID in ``stop`` (the fixtures call it in a
``finally``, also when the test fails); every wait is bounded.
"""

from __future__ import annotations

import subprocess
import time

from tests.integration.conftest import Lab
from tests.integration.peers import SilentUdp, SippPeer, device, trunk
from tests.integration.sippgen import invite_flow

PASSWORDS = {"lan-desk": "desk-secret", "lan-app": "app-secret", "lan-web": "web-secret",
             "minh-desk": "minh-secret", "minh-app": "minh-app-secret"}
AOR = {"lan": "1001", "minh": "1002"}


class CallLab:
    register_timeout = 10.0          # seconds for a phone's registration to show in the state database
    call_timeout = 20.0              # seconds a caller's SIPp may take

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.peers: list[SippPeer | SilentUdp] = []

    def phone(self, device_id: str, behaviour: str = "answer", answer_delay_ms: int = 200) -> SippPeer:
        user = device_id.split("-")[0]
        peer = device(self.lab.tmp, self.lab.port, AOR[user], device_id, PASSWORDS[device_id], behaviour,
                      answer_delay_ms=answer_delay_ms)
        self.peers.append(peer.start())
        deadline = time.monotonic() + self.register_timeout
        while time.monotonic() < deadline:
            if any(b["device"] == device_id for b in self.lab.registrations(user, settle=0.1)):
                return peer
        raise AssertionError(f"{device_id} did not register: {peer.messages()[-2000:]}")

    def trunk(self, behaviour: str = "answer") -> SippPeer:
        peer = trunk(self.lab.tmp, self.lab.trunk_port, behaviour)
        self.peers.append(peer.start())
        time.sleep(0.3)
        return peer

    def call(self, user: str, expect: int, name: str = "caller", timeout: float | None = None,
             **kwargs: object) -> tuple[subprocess.CompletedProcess[str], str]:
        scenario = invite_flow(self.lab.tmp / f"{name}.xml", user, expect, **kwargs)  # type: ignore[arg-type]
        result = self.lab.sipp(scenario, timeout=self.call_timeout if timeout is None else timeout)
        return result, self.lab.sipp_log(scenario)

    def stop(self) -> None:
        for peer in self.peers:
            peer.stop()
