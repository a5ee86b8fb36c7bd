#!/usr/bin/env python3
"""The same registration benchmark against Kamailio, for a side-by-side figure.

Kamailio (Debian's `kamailio` and `kamailio-sqlite-modules`, installed by this
script when missing) runs on loopback as a registrar with digest against a
SQLite subscriber table: the same users, the same SIPp scenario and rate as
`register_rate.py`.  Its config is written here at run time: it is the usual
minimal REGISTER route (auth_check / auth_challenge / save).  Bindings are kept
in memory (usrloc db_mode 0) -- sip-router writes them to SQLite -- and it runs
with `--children` UDP worker processes.  Every process is stopped by its PID.

    .venv/bin/python benchmarks/kamailio_register.py --rate 4000 --count 40000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import DOMAIN, free_port, options_ping  # noqa: E402

MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
CONFIG = """#!KAMAILIO
debug=1
log_stderror=yes
fork=yes
children={children}
listen=udp:127.0.0.1:{port}
mpath="{modules}"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "db_sqlite.so"
loadmodule "auth.so"
loadmodule "auth_db.so"
modparam("usrloc", "db_mode", 0)
modparam("auth_db", "db_url", "sqlite://{db}")
modparam("auth_db", "calculate_ha1", 1)
modparam("auth_db", "password_column", "password")
modparam("auth_db", "load_credentials", "")
modparam("auth", "qop", "auth")
loadmodule "htable.so"
modparam("htable", "db_url", "sqlite://{db}")
modparam("htable", "htable", "creds=>size=16;dbtable=htable;")

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("OPTIONS")) {{ sl_send_reply("200", "OK"); exit; }}
    if (is_method("REGISTER")) {{
        {check}
        if (!save("location")) {{ sl_reply_error(); }}
        exit;
    }}
    sl_send_reply("404", "Not Found");
}}
"""
CHECKS = {
    # credentials looked up in SQLite on every request (auth_db)
    "sqlite": 'if (!auth_check("$fd", "subscriber", "0")) { auth_challenge("$fd", "0"); exit; }',
    # credentials loaded into shared memory at start (htable), like sip-router's YAML users
    "memory": 'if (!pv_www_authenticate("$fd", "$sht(creds=>$au)", "0")) { www_challenge("$fd", "0"); exit; }',
}


def ensure_kamailio() -> None:
    if shutil.which("kamailio") and os.path.exists(MODULES + "db_sqlite.so"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "kamailio", "kamailio-sqlite-modules"],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=4000)
    parser.add_argument("--count", type=int, default=40000)
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--children", type=int, default=2, help="Kamailio UDP worker processes")
    parser.add_argument("--credentials", choices=sorted(CHECKS), default="memory",
                        help="where Kamailio finds passwords: SQLite per request, or memory")
    args = parser.parse_args()
    ensure_kamailio()
    with tempfile.TemporaryDirectory(prefix="kamailio-bench-") as name:
        tmp = Path(name)
        db = tmp / "kamailio.db"
        with sqlite3.connect(db) as conn:
            conn.executescript(
                "CREATE TABLE version (table_name TEXT PRIMARY KEY, table_version INTEGER);"
                "INSERT INTO version VALUES ('subscriber', 7);"
                "INSERT INTO version VALUES ('htable', 2);"
                "CREATE TABLE subscriber (id INTEGER PRIMARY KEY, username TEXT, domain TEXT,"
                " password TEXT, ha1 TEXT, ha1b TEXT);"
                "CREATE TABLE htable (id INTEGER PRIMARY KEY, key_name TEXT, key_type INTEGER DEFAULT 0,"
                " value_type INTEGER DEFAULT 0, key_value TEXT, expires INTEGER DEFAULT 0);")
            conn.executemany("INSERT INTO subscriber (username, domain, password, ha1, ha1b) VALUES (?, ?, ?, '', '')",
                             [(f"d{i}", DOMAIN, f"pw{i}") for i in range(args.users)])
            conn.executemany("INSERT INTO htable (key_name, key_value) VALUES (?, ?)",
                             [(f"d{i}", f"pw{i}") for i in range(args.users)])
        port = free_port()
        config = tmp / "kamailio.cfg"
        config.write_text(CONFIG.format(children=args.children, port=port, modules=MODULES, db=db,
                                        check=CHECKS[args.credentials]))
        csv = tmp / "users.csv"
        csv.write_text("SEQUENTIAL\n" + "\n".join(
            f"u{i};d{i};[authentication username=d{i} password=pw{i}];{DOMAIN}" for i in range(args.users)) + "\n")
        pidfile = tmp / "kamailio.pid"
        log = open(tmp / "kamailio.log", "wb")
        proc = subprocess.Popen(["kamailio", "-f", str(config), "-P", str(pidfile), "-DD", "-E",
                                 "-m", "256", "-M", "32"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not options_ping(port) and time.monotonic() < deadline:
                if proc.poll() is not None:
                    print((tmp / "kamailio.log").read_text()[-2000:], file=sys.stderr)
                    return 1
            started = time.monotonic()
            result = subprocess.run(
                ["sipp", "-sf", str(ROOT / "tests/scenarios/register_digest.xml"), "-inf", str(csv),
                 "-i", "127.0.0.1", "-p", str(free_port()), "-r", str(args.rate), "-m", str(args.count),
                 "-l", str(args.rate * 4), "-timeout", "60", "-timeout_error", "-nostdin",
                 "-buff_size", str(4 * 1024 * 1024), f"127.0.0.1:{port}"],
                cwd=tmp, capture_output=True, text=True, timeout=900)
            elapsed = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
        from benchmarks.register_rate import _total
        ok, failed = _total(result.stdout, "Successful call"), _total(result.stdout, "Failed call")
        print(f"kamailio, {args.children} UDP workers, credentials in {args.credentials}: "
              f"{ok} ok, {failed} failed, in {elapsed:.2f} s")
        print(f"offered rate:  {args.rate}/s   achieved: {ok / elapsed:.0f} registrations/s with digest")
        return 0 if failed == 0 and ok == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
