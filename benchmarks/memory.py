#!/usr/bin/env python3
"""The router's memory and start-up time with N users and a binding for each.

Writes a YAML of N users (one ip_phone each) and, into the state database, one
binding per device (as if every phone had registered), then starts the router
and, once every worker answers, waits a second and reads each process's memory
from /proc: RSS, PSS (shared pages divided among the processes that map them)
and the anonymous part.  The figure the scale target speaks of is the sum of
PSS over all the router's processes (with one worker: its RSS).

    .venv/bin/python benchmarks/memory.py --users 100000 --workers 2

Loopback only; the router is stopped by its PID.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare import RouterServer, byte_compile  # noqa: E402
from benchmarks.policy_changes import write_bindings  # noqa: E402
from tests.support import free_port, free_port_run, private_cache, write_users_config  # noqa: E402


def memory_of(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup (Rss, Pss, Anonymous ...)."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        lines = rollup.read().splitlines()[1:]
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if line.endswith("kB")}


def role(pid: int, router_pid: int, workers: int) -> str:
    """The supervisor (the process started), its workers (forked from it), or a router alone."""
    if workers == 1:
        return "router"
    return "supervisor" if pid == router_pid else "worker"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100000)
    parser.add_argument("--workers", type=int, default=1, help="the router's `workers:`")
    parser.add_argument("--no-bindings", action="store_true", help="start with an empty state database")
    args = parser.parse_args()
    byte_compile()                           # as installed: no start compiles the modules again
    with tempfile.TemporaryDirectory(prefix="sip-router-memory-") as tmp:
        private_cache(tmp)
        port = free_port() if args.workers == 1 else free_port_run(args.workers + 1)
        config, _ = write_users_config(tmp, port, args.users)
        if args.workers > 1:
            with open(config, "a") as out:
                out.write(f"workers: {args.workers}\n")
        RouterServer(Path(config), port, args.users).stop()          # makes the state database
        if not args.no_bindings:
            write_bindings(str(Path(tmp) / "router.db"), args.users)
        started = time.monotonic()
        server = RouterServer(Path(config), port, args.users)
        try:
            took = time.monotonic() - started
            time.sleep(1.0)                  # settled: the parse child gone, the first tick done
            rows = [(pid, role(pid, server.router.pid, args.workers), memory_of(pid)) for pid in server.pids()]
        finally:
            server.stop()
    bindings = 0 if args.no_bindings else args.users
    print(f"{args.users} users, {bindings} bindings, workers: {args.workers}; "
          f"start until every process answered: {took:.1f} s")
    for pid, kind, mem in rows:
        print(f"  pid {pid} {kind:10}  RSS {mem['Rss'] / 1024:6.1f} MiB  PSS {mem['Pss'] / 1024:6.1f} MiB  "
              f"anonymous {mem['Anonymous'] / 1024:6.1f} MiB")
    total_pss = sum(mem["Pss"] for _, _, mem in rows) / 1024
    total_rss = sum(mem["Rss"] for _, _, mem in rows) / 1024
    print(f"total: PSS {total_pss:.1f} MiB, RSS {total_rss:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
