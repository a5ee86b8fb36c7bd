"""Load the YAML policy in a short-lived child process, for the long-running processes.

Composing YAML keeps a node and two position marks per scalar: about 600 MB of
short-lived objects for 100,000 users.  Built in the router's own heap, the frozen
policy ends up interleaved with them, and the allocator can hand none of those
arenas back: the router would keep the parse's peak (~800 MB) for its whole life.
The child parses and validates, then sends the policy (a few tens of MB) back
pickled; the parent unpickles it into compact, contiguous memory.  The child is the
same interpreter running this module, so the pickle never crosses a trust boundary.

``check`` and the other short CLI commands load in-process: they exit straight away.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

from router.config import load_policy, paused_gc
from router.errors import ConfigError
from router.policy.model import Policy


def load_policy_apart(path: str, timeout: float = 300.0) -> Policy:
    """Like ``load_policy`` (same result, same ``ConfigError``), parsed in a child."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        done = subprocess.run([sys.executable, "-m", "router.config_child", path],
                              capture_output=True, env=env, timeout=timeout, check=False)
        if done.returncode != 0:
            raise ValueError(done.returncode)
        with paused_gc():
            kind, payload = pickle.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, pickle.UnpicklingError, EOFError, ValueError):
        kind, payload = "failed", None
    if kind == "ok" and isinstance(payload, Policy):
        return payload
    if kind == "error" and isinstance(payload, list):
        raise ConfigError(payload)
    return load_policy(path)      # the child could not run (killed, no interpreter): not the file's fault


def _child(path: str) -> int:
    try:
        result: tuple[str, object] = ("ok", load_policy(path))
    except ConfigError as exc:
        result = ("error", exc.problems)
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
