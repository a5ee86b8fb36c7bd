#!/usr/bin/env python3
"""What run-time changes and reloads cost the SIP loop with 100,000 users and bindings.

Starts the router with N generated users and a binding for each (written to its
state database before it starts, as if the phones had registered), then, while
SIPp sends OPTIONS at a steady rate as a probe of responsiveness:

  changes   run-time changes of receive methods, written to the database as the
            CLI or the web app write them (another process); the router picks
            each up on its once-a-second refresh
  reload    `sip-router reload` of an edited YAML (one user's method changed)

and prints how long each reload took, and the SIP loop's pass-time histogram
from the router's own metrics (a stall shows as passes of tens of milliseconds
or more).  Loopback only; every process is stopped by its PID.

    .venv/bin/python benchmarks/policy_changes.py --users 100000 --changes 200 --reloads 3
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.register_rate import _loop_busy  # noqa: E402
from router.control_client import request  # noqa: E402
from router.policy.model import Binding, DeviceKind  # noqa: E402
from router.sip.commands import SaveBindings  # noqa: E402
from router.store.sqlite import SqliteBindingStore, connect  # noqa: E402
from tests.support import RouterProcess, free_port, private_cache, stop_process, write_users_config  # noqa: E402

OPTIONS_PROBE = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options probe">
  <send retrans="500"><![CDATA[
OPTIONS sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:probe@[local_ip]>;tag=[call_number]
To: <sip:[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 OPTIONS
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200" rtd="true"/>
</scenario>
"""


def write_bindings(database: str, users: int) -> None:
    now = time.time()
    conn = connect(database)
    try:
        SqliteBindingStore(conn).replace_many(
            SaveBindings(f"u{i}", f"d{i}", (Binding(
                f"u{i}", f"d{i}", DeviceKind.IP_PHONE, f"sip:d{i}@127.0.0.1:{20000 + i % 40000}",
                now + 3600, call_id=f"{i}@bench", cseq=2, source_host="127.0.0.1",
                source_port=20000 + i % 40000, user_agent="bench phone", registered_at=now,
                at_contact=True),)) for i in range(users))
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100000)
    parser.add_argument("--changes", type=int, default=200, help="run-time changes, 20 per second")
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--probe-rate", type=int, default=200, help="OPTIONS per second during the run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sip-router-changes-") as tmp:
        private_cache(tmp)
        port = free_port()
        config, _ = write_users_config(tmp, port, args.users)
        database = os.path.join(tmp, "router.db")
        router = RouterProcess(config, port, log_level="warning")
        router.start(timeout=max(15.0, args.users / 2000))          # makes the database
        router.stop()
        write_bindings(database, args.users)
        started = time.monotonic()
        router.start(timeout=max(15.0, args.users / 2000))
        print(f"start with {args.users} users and bindings: {time.monotonic() - started:.1f} s "
              f"(until it answered), RSS {router.rss_kib() / 1024:.0f} MiB")
        scenario = Path(tmp) / "probe.xml"
        scenario.write_text(OPTIONS_PROBE)
        duration = args.changes / 20 + args.reloads * 15 + 5
        probe = subprocess.Popen(
            ["sipp", "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(free_port()), "-r", str(args.probe_rate),
             "-m", str(int(args.probe_rate * duration)), "-nostdin", "-timeout", str(int(duration) + 60),
             f"127.0.0.1:{port}"], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            before = _loop_busy()
            change_times = run_changes(config, args.changes)
            reload_times = run_reloads(config, os.path.join(tmp, "control.sock"), args.reloads)
            out, _ = probe.communicate(timeout=duration + 120)
            after = _loop_busy()
        finally:
            stop_process(probe)                   # type: ignore[arg-type]
            router.stop()
    failed = _count(out, "Failed call")
    print(f"run-time changes: {len(change_times)}, written at 20/s (by another process)")
    print("reloads: " + ", ".join(f"{t:.2f} s" for t in reload_times) + " (sip-router reload, answer to answer)")
    print(f"OPTIONS probes during the run: {failed} failed")
    delta = [(le, n - dict(before).get(le, 0)) for le, n in after]
    print("SIP loop passes by busy time during the run (s): " + ", ".join(f"<={le}: {n}" for le, n in delta if n))
    return 0 if failed == 0 else 1


def run_changes(config: str, count: int) -> list[float]:
    from router.config import load_policy
    from router.runtime import PolicyState
    from router.store.sqlite import SqlitePolicyStore
    policy = load_policy(config)
    conn = connect(policy.database)
    times: list[float] = []
    try:
        state = PolicyState(policy, SqlitePolicyStore(conn), time.time())
        methods = ["app", "ip_phone", "all_devices"]
        for i in range(count):
            began = time.monotonic()
            user = f"u{(i * 7919) % len(policy.users)}"
            state.change(user, user, "receive_method", methods[i % 3], via="cli", now=time.time())
            times.append(time.monotonic() - began)
            time.sleep(max(0.0, 0.05 - (time.monotonic() - began)))
    finally:
        conn.close()
    time.sleep(2)                                # the router's refresh picks the last ones up
    return times


def run_reloads(config: str, control: str, count: int) -> list[float]:
    text = Path(config).read_text()
    times: list[float] = []
    for i in range(count):
        method = ("app", "ip_phone")[i % 2]
        Path(config).write_text(text.replace("{id: u1, extension: '10001', receive_method: ip_phone",
                                             f"{{id: u1, extension: '10001', receive_method: {method}", 1))
        began = time.monotonic()
        result = request(control, "reload", timeout=120)
        times.append(time.monotonic() - began)
        if not result.get("reloaded"):
            raise RuntimeError(f"reload refused: {result}")
        time.sleep(5)
    return times


def _count(out: str, label: str) -> int:
    match = re.search(rf"{label}\s+\|\s+\d+\s+\|\s+(\d+)", out)
    return int(match.group(1)) if match else 0


if __name__ == "__main__":
    sys.exit(main())
