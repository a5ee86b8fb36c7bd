"""Workers forked from the supervisor start clean: their own descriptors, environment and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from router.forked import fork


def answer_of(read_fd: int) -> dict[str, object]:
    with os.fdopen(read_fd, "rb") as answer:
        return json.loads(answer.read() or b"{}")


def test_a_forked_worker_keeps_only_its_own_descriptors_and_environment(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    mine_r, mine_w = os.pipe()              # handed to the worker
    other_r, other_w = os.pipe()            # another worker's: not for this one
    answer_r, answer_w = os.pipe()

    def main() -> int:
        report = {"fds": sorted(int(n) for n in os.listdir("/proc/self/fd")),
                  "env": os.environ.get("SIP_ROUTER_TEST"), "notify": os.environ.get("NOTIFY_SOCKET"),
                  "term": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}
        os.write(answer_w, json.dumps(report).encode())
        return 0

    child = fork(main, {"SIP_ROUTER_TEST": "worker 1"}, [mine_r, answer_w], drop_env=["NOTIFY_SOCKET"])
    for fd in (mine_w, other_r, other_w, answer_w):
        os.close(fd)
    report = answer_of(answer_r)
    os.close(mine_r)
    assert child.wait(5) == 0
    assert mine_r in report["fds"] and answer_w in report["fds"]
    assert other_r not in report["fds"] and other_w not in report["fds"] and mine_w not in report["fds"]
    assert report["env"] == "worker 1" and report["notify"] is None and report["term"] is True
    assert os.environ["NOTIFY_SOCKET"] == "/run/systemd/notify"          # the supervisor's own are untouched


def test_a_worker_that_fails_exits_1_with_its_traceback_and_one_stopped_by_sigterm_reports_it(capfd):
    def broken() -> int:
        raise ValueError("the policy file is damaged")

    assert fork(broken, {}, []).wait(5) == 1
    assert "ValueError: the policy file is damaged" in capfd.readouterr().err

    def waits() -> int:
        time.sleep(30)
        return 0

    child = fork(waits, {}, [])
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    child.send_signal(signal.SIGTERM)
    assert child.wait(5) == -signal.SIGTERM
    assert child.poll() == -signal.SIGTERM


def test_a_worker_returns_its_exit_status_and_is_not_forked_while_a_thread_runs():
    assert fork(lambda: 4, {}, []).wait(5) == 4
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="before any thread"):
            fork(lambda: 0, {}, [])
    finally:
        stop.set()
        thread.join()


def test_a_worker_that_calls_sys_exit_ends_with_that_status_as_an_interpreter_would(capfd):
    def exits(code: object) -> Callable[[], int]:
        def main() -> int:
            raise SystemExit(code)
        return main

    assert fork(exits(None), {}, []).wait(5) == 0
    assert fork(exits(3), {}, []).wait(5) == 3
    assert fork(exits("no state directory"), {}, []).wait(5) == 1
    assert "no state directory" in capfd.readouterr().err
