from __future__ import annotations

import textwrap

import pytest

from router import policy_cache
from router.config import parse_policy
from router.policy.model import Binding, DeviceKind, Policy

BASE = """
domain: pbx.test
state_dir: {state_dir}
trunk: {{address: 127.0.0.1, port: 5080}}
trusted_peers: [{{name: acd, address: 127.0.0.1}}]
routing: {{fallback: []}}
queues:
  - {{id: support, hotline: "842873001234", dids: ["842873001235"], ring_timeout: 12}}
  - {{id: sales, hotline: "842873009999"}}
  - {{id: nohotline}}
users:
  - id: lan
    extension: "1001"
    role: admin
    receive_method: all_devices
    agent_phone: "84912345678"
    default_queue: support
    devices:
      - {{id: lan-desk, kind: ip_phone, password: p1}}
      - {{id: lan-app, kind: app, password: p2}}
      - {{id: lan-web, kind: web, password: p3}}
  - id: minh
    extension: "1002"
    receive_method: ip_phone
    agent_phone: "84987654321"
    default_queue: sales
    devices:
      - {{id: minh-desk, kind: ip_phone, password: p4}}
"""


@pytest.fixture
def make_policy(tmp_path):
    def make(extra: str = "", base: str = BASE) -> Policy:
        text = textwrap.dedent(base).format(state_dir=tmp_path) + textwrap.dedent(extra)
        return parse_policy(text, str(tmp_path / "router.yaml"))
    return make


@pytest.fixture
def policy(make_policy) -> Policy:
    return make_policy()


def binding(device: str, kind: str, user: str = "lan", expires_at: float = 2000.0,
            q: float = 1.0) -> Binding:
    return Binding(user_id=user, device_id=device, kind=DeviceKind(kind),
                   contact=f"sip:{device}@127.0.0.1:{5100 + len(device)}", expires_at=expires_at, q=q)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory of the test's own, where even small files are kept."""
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(policy_cache, "MIN_SIZE", 0)        # these small files count as big
    return tmp_path / "cache" / "sip-router"
