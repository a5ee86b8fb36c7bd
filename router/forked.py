"""Worker processes forked from the supervisor, as Kamailio forks its children (and the
parse child at start, ``config_child``).

A worker started as a new interpreter (``python -m router run``) spent ~0.25 s of a
start loading Python and importing the modules the supervisor already holds, before
it read a byte of the policy.  A fork starts from the supervisor's memory, so the
worker begins with those modules loaded (shared, copy-on-write, until it writes
them) and goes straight to reading its channels and the policy.

What a fork inherits that a new interpreter would not have is put right in the child
before anything else runs:

- descriptors: every one is closed but stdin, stdout, stderr and those handed to this
  worker (its channels and the policy file), as ``subprocess``'s ``pass_fds`` would;
- signals: SIGTERM and SIGHUP back to their default, SIGINT to Python's
  KeyboardInterrupt, until the worker installs its own (the supervisor's handlers
  would only set the supervisor's flags, in the child's copy);
- the environment: the worker's own variables set, systemd's removed (it talks to the
  supervisor only);
- output: the supervisor's buffers are flushed before the fork, so no line is
  written twice.

The supervisor forks before it starts any thread (its control server comes after):
a fork copies only the calling thread, and a lock held by another would stay locked
in the child for good.  The random identifiers (``router.sip.ids``) and Python's
``random`` start afresh in each child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping

EXIT_FAILED = 1
_HELD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class ThreadsRunning(RuntimeError):
    """A fork was asked for while another thread runs."""


class Forked:
    """A forked child, watched as ``subprocess.Popen`` watches one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.lost = False          # reaped by someone else (SIGCHLD ignored): its status is unknown

    def poll(self) -> int | None:
        """Its exit status once it has ended (minus the signal that ended it), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:            # reaped already: nothing more to learn
                self.returncode, self.lost = EXIT_FAILED, True
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status; ``subprocess.TimeoutExpired`` if it is still running after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code


def fork(main: Callable[[], int], env: Mapping[str, str], keep: Iterable[int],
         drop_env: Iterable[str] = ()) -> Forked:
    """Run ``main`` in a forked child with ``env`` added to its environment, ``drop_env``
    removed, and only the descriptors in ``keep`` (and 0, 1, 2) open."""
    if threading.active_count() > 1:
        raise ThreadsRunning("a process is forked before any thread starts: another thread could hold a lock")
    sys.stdout.flush()
    sys.stderr.flush()
    kept = {0, 1, 2, *keep}
    # Held back over the fork: one arriving in the child before its handlers are reset
    # would run the supervisor's (setting a flag nobody reads) and be lost.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return Forked(pid)
    code = EXIT_FAILED
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _close_all_but(kept)
        for name in drop_env:
            os.environ.pop(name, None)
        os.environ.update(env)
        code = main()
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:               # as the interpreter ends on one
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            os.write(2, f"{exc.code}\n".encode(errors="replace"))
    except BaseException:  # noqa: BLE001 -- as an interpreter would: the traceback, then a failed exit
        try:
            os.write(2, traceback.format_exc().encode(errors="replace"))     # straight to the journal
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)          # never back into the supervisor's code


def _close_all_but(kept: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in kept:
            try:
                os.close(fd)
            except OSError:         # the listing's own descriptor, closed already
                pass
