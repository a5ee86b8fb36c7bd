"""``sip-router run``: which process this is: a router alone, a supervisor, or one of its workers.

The file is parsed in a child process (``config_child``), while this process
imports the SIP stack.  With ``workers`` above 1 this process becomes the
supervisor (``router.workers``), which forks the workers (they start with the
stack loaded) and then only watches and asks them: it never starts PJSIP, and
keeps neither the users nor the parsed file once the workers have it (about 20 MB
less per supervisor with 100,000 users).  A worker, or a router running alone,
goes on to ``router.app``.
"""

from __future__ import annotations

import time

from router import log
from router.config_child import load_policy_apart, parse_apart, policy_of
from router.sip.sharing import SharingError, inherited
from router.workers import inherited_policy, policy_file, supervise, supervisor_gone

EXIT_START_FAILED = 1         # as router.app's


def run(config_path: str) -> int:
    began = time.monotonic()
    try:
        channels = inherited()
    except SharingError as exc:
        log.configure("info", "auto")
        log.get("router").error("router.start.failed", detail=str(exc))
        return EXIT_START_FAILED
    if channels is not None and supervisor_gone():       # it died while this worker started
        log.configure("info", "auto")
        log.get("router").error("router.supervisor.gone", detail="the supervisor ended before this worker started")
        return EXIT_START_FAILED
    # The SIP stack is imported while the child parses the file (on the other core): a
    # router alone needs it next, and workers are forked with it already loaded.  Nothing
    # runs a thread yet, so the child may be a fork of this process.
    parsed = (inherited_policy() if channels is not None
              else parse_apart(config_path, meanwhile=_sip_stack, fork=True))
    if channels is None and parsed is not None:
        head = policy_of(parsed, users=False)
        if head is not None and head.workers > 1:
            log.configure(head.log.level, head.log.format)
            policy_fd = policy_file(parsed)
            del parsed                   # the workers read it from the file
            return supervise(config_path, head, policy_fd)
    found = policy_of(parsed) if parsed is not None else None
    del parsed
    policy = found if found is not None else load_policy_apart(config_path)
    from router.app import run as run_router  # the SIP stack: only a router process loads it
    return run_router(config_path, policy, channels, began)


def _sip_stack() -> None:
    import router.app  # noqa: F401 -- loaded now, used after the parse
