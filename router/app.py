"""Wires config, stores and the SIP engine together (the router process)."""

from __future__ import annotations

import time

from router import log
from router.config import load_policy
from router.runtime import PolicyState
from router.store.sqlite import SqlitePolicyStore, connect


def run(config_path: str) -> int:
    policy = load_policy(config_path)
    log.configure(policy.log.level, policy.log.format)
    state = PolicyState(policy, SqlitePolicyStore(connect(policy.database)), time.time())
    log.get().info("policy.loaded", source=config_path, users=len(state.view.policy.users))
    log.get().warning("sip.core.missing", detail="the SIP core is not built yet; exiting")
    return 0
