"""Drive the browser softphone page (softphone.html, JsSIP) in headless Chromium for integration tests.

    with Browser() as browser:          # serves tests/browser/ on 127.0.0.1 while it runs
        phone = browser.softphone().open("wss://127.0.0.1:7443", "sip:lan-web@pbx.test", "lan-web", "web-secret",
                                         instance="0c5bd1c4-3f0e-4d0a-9a52-6f1f1b7e2a01")
        phone.wait_registered()
        ...                              # a caller calls the agent through the router
        incoming = phone.wait_incoming()
        phone.answer()
        phone.wait_in_call()
        phone.wait_media()               # RTP both ways (received=0 for a caller that sends none)
        ...                              # the caller hangs up
        assert phone.wait_ended()["endCause"] == "Terminated"
        phone.screenshot(tmp_path / "softphone.png")

Chromium is Debian's (/usr/bin/chromium), driven through Playwright; Playwright's own browser download is not
used. Every browser started here is stopped when the ``with`` block ends, by PID if closing it hangs.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAGE = "softphone.html"
JSSIP_BUNDLE = HERE / "node_modules" / "jssip" / "dist" / "jssip.min.js"
CHROMIUM = os.environ.get("SIP_ROUTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    # root in a container: Chromium's sandbox needs user namespaces it does not get here
    "--no-sandbox",
    "--disable-dev-shm-usage",
    # the edge's WSS certificate is self-signed
    "--ignore-certificate-errors",
    # getUserMedia without a prompt, from a fake microphone (a beep)
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    # ICE with rtpengine (or another page) on 127.0.0.1 needs loopback candidates, which Chromium leaves out by
    # default; and real host addresses rather than mDNS names, which nothing here could resolve
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # nothing but loopback is reachable: no update checks, sync, or QUIC probes that could only time out
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--disable-quic",
    # the page plays the remote audio, as a web phone does, with no click to allow it
    "--autoplay-policy=no-user-gesture-required",
)
CLOSE_TIMEOUT = 10.0
POLL = 0.1


def ensure_jssip() -> Path:
    """The JsSIP bundle the page loads, installing tests/browser's npm packages first when it is missing.

    Uses ``npm ci`` (the versions in package-lock.json). Fails with a clear message when npm is not installed or the
    npm registry cannot be reached, rather than leaving a page that never registers.
    """
    if JSSIP_BUNDLE.is_file():
        return JSSIP_BUNDLE
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"{JSSIP_BUNDLE} is missing and npm is not installed: run scripts/test as root "
                           "(it installs Debian's nodejs and npm), or `npm ci` in tests/browser")
    try:
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, capture_output=True, text=True,
                             timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError("`npm ci` in tests/browser took over 5 minutes: is the npm registry reachable?") from exc
    if out.returncode != 0 or not JSSIP_BUNDLE.is_file():
        raise RuntimeError(f"`npm ci` in tests/browser failed (is the npm registry reachable?), so {JSSIP_BUNDLE} "
                           f"is missing:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return JSSIP_BUNDLE


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        # Each test loads the page afresh; a cached softphone.js from an older run would test old code.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class PageServer:
    """tests/browser/ over HTTP on 127.0.0.1, on a free port, in a thread.

    http://127.0.0.1 is a secure context for Chromium, so the page may use getUserMedia without HTTPS.
    """

    def __init__(self, directory: Path = HERE) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="softphone-page-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> PageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _identity(pid: int) -> tuple[str, str] | None:
    """The executable and start time of ``pid``: together they tell our Chromium from a process that later got the
    same PID."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return exe, started


class Browser:
    """Headless Debian Chromium under Playwright, stopped when the ``with`` block ends, also when a test fails."""

    def __init__(self, server: PageServer | None = None, executable: str = CHROMIUM,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.executable = executable
        self.args = (*CHROMIUM_ARGS, *extra_args)
        self._own_server = server is None
        self._server = server
        self._playwright: Any = None
        self._browser: Any = None
        self.pids: dict[int, tuple[str, str]] = {}
        self.phones: list[Softphone] = []

    def __enter__(self) -> Browser:
        # Imported here so that a test module importing the driver is collected, and fails with a clear message,
        # where playwright is missing.
        from playwright.sync_api import sync_playwright

        if not Path(self.executable).exists():
            raise RuntimeError(f"{self.executable} not found: run scripts/test as root, which installs Debian's "
                               "chromium")
        ensure_jssip()
        try:
            if self._server is None:
                self._server = PageServer().__enter__()
            before = set(_descendants(os.getpid()))
            self._playwright = sync_playwright().start()
            self._browser = self._playwright.chromium.launch(executable_path=self.executable, headless=True,
                                                             args=list(self.args))
            # Chromium runs under Playwright's driver, itself our child: what is new under us and is Chromium is
            # this browser, the processes to kill should closing it hang.
            for pid in _descendants(os.getpid()):
                ident = _identity(pid)
                if pid not in before and ident and os.path.basename(ident[0]).startswith("chrom"):
                    self.pids[pid] = ident
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def server(self) -> PageServer:
        assert self._server is not None, "use Browser in a with block"
        return self._server

    @property
    def version(self) -> str:
        return str(self._browser.version)

    def softphone(self) -> Softphone:
        """A new page in its own browser context (its own cookies and storage), not yet loaded."""
        context = self._browser.new_context(ignore_https_errors=True, viewport={"width": 1100, "height": 760})
        phone = Softphone(context, self.server)
        self.phones.append(phone)
        return phone

    def new_context(self, **options: Any) -> Any:
        """A new browser context (its own cookies and storage) for any other page, such as the web app's; it is
        closed with the browser."""
        return self._browser.new_context(**options)

    def close(self) -> None:
        # A watchdog kills Chromium by PID when closing it hangs: Playwright's close then returns, as it sees the
        # browser's pipe close.
        watchdog = threading.Timer(CLOSE_TIMEOUT, self._kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            if self._browser is not None:
                try:
                    self._browser.close()
                except Exception:  # a browser that is gone is what we want here
                    pass
            if self._playwright is not None:
                self._playwright.stop()
        finally:
            watchdog.cancel()
            self._browser = self._playwright = None
            self._kill()
            if self._own_server and self._server is not None:
                self._server.stop()
                self._server = None

    def _kill(self) -> None:
        for pid, ident in self.pids.items():
            if _identity(pid) != ident:
                continue            # gone already, or the PID now belongs to someone else
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class Softphone:
    """One softphone page: loads softphone.html with its settings in the query and reads window.softphone."""

    def __init__(self, context: Any, server: PageServer) -> None:
        self.context = context
        self.server = server
        self.page: Any = context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def url(self, wss_url: str, uri: str, user: str = "", password: str = "", *, display_name: str = "",
            instance: str = "", expires: int = 0, debug: bool = False, register: bool = True) -> str:
        params = {"wss": wss_url, "uri": uri, "user": user, "password": password, "name": display_name,
                  "instance": instance, "expires": str(expires) if expires else "", "debug": "1" if debug else "",
                  "register": "" if register else "0"}
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
        return f"{self.server.base_url}{PAGE}?{query}"

    def open(self, wss_url: str, uri: str, user: str = "", password: str = "", *, display_name: str = "",
             instance: str = "", expires: int = 0, debug: bool = False, register: bool = True,
             timeout: float = 10.0) -> Softphone:
        """Load the page, which connects to ``wss_url`` and registers ``uri`` with digest ``user``/``password``.

        ``instance`` (a UUID) is sent as +sip.instance, so a page loaded again replaces its own binding; without it
        JsSIP makes up a new one on each load, as a browser without stored settings would.
        ``debug`` writes JsSIP's log to the browser console, kept in ``self.console``.
        """
        self.page.goto(self.url(wss_url, uri, user, password, display_name=display_name, instance=instance,
                                expires=expires, debug=debug, register=register), timeout=timeout * 1000)
        self.page.wait_for_function("() => window.softphone !== undefined", timeout=timeout * 1000)
        return self

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.page.evaluate("() => window.softphone.state()")
        return state

    def media(self) -> dict[str, Any]:
        """RTP counters and ICE state of the current call (after it ended: its last sample; zeros: no call yet)."""
        stats: dict[str, Any] = self.page.evaluate("() => window.softphone.media()")
        return stats

    def answer(self) -> None:
        self.page.evaluate("() => window.softphone.answer()")

    def hangup(self) -> None:
        self.page.evaluate("() => window.softphone.hangup()")

    def call(self, target: str) -> None:
        self.page.evaluate("t => window.softphone.call(t)", target)

    def unregister(self) -> None:
        self.page.evaluate("() => window.softphone.unregister()")

    def stop(self) -> None:
        """Stop the user agent: JsSIP unregisters when registered, then closes the WebSocket."""
        self.page.evaluate("() => window.softphone.stop()")

    def close(self) -> None:
        """Close the page and its context without a word to the server, as a browser tab that is closed or dies."""
        self.context.close()

    def screenshot(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def describe(self, state: dict[str, Any] | None = None) -> str:
        """The page's state, its event log (SIP first lines included) and the console, for a failure message."""
        try:
            state = state or self.state()
        except Exception as exc:  # a page that is gone is described as such
            return f"(page state unavailable: {exc})\nconsole:\n" + "\n".join(self.console[-40:])
        events = "\n".join(f"  {e['t']:8.3f} {e['type']}: {e['detail']}" for e in state.get("events", []))
        brief = {k: v for k, v in state.items() if k not in ("events", "sip", "remoteSdp", "localSdp")}
        text = f"state: {json.dumps(brief)}\nevents:\n{events}"
        if self.console:
            text += "\nconsole:\n" + "\n".join(self.console[-40:])
        return text

    def wait_for(self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float,
                 fail: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
        """Poll the page's state until ``check`` holds; AssertionError with the event log at ``timeout`` or as soon
        as ``fail`` names a reason."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if check(state):
                return state
            reason = fail(state) if fail else None
            if reason:
                raise AssertionError(f"softphone: {what} failed: {reason}\n{self.describe(state)}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"softphone: no {what} within {timeout:g} s\n{self.describe(state)}")
            time.sleep(POLL)

    def wait_registered(self, timeout: float = 10.0) -> dict[str, Any]:
        """Registered; fails at once on a final registration error (a SIP answer such as 403, not a lost
        connection, which JsSIP retries)."""
        return self.wait_for("registration", lambda s: bool(s["registered"]), timeout,
                             fail=lambda s: s["configError"] or (
                                 s["registrationError"] if s["registrationError"] != s["connectionError"] else None))

    def wait_registration_failed(self, timeout: float = 10.0) -> str:
        """The registration error (or connection failure) the page shows."""
        state = self.wait_for("registration failure", lambda s: bool(s["registrationError"] or s["configError"]),
                              timeout)
        return str(state["registrationError"] or state["configError"])

    def wait_unregistered(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_for("unregistration", lambda s: not s["registered"], timeout)

    def wait_incoming(self, timeout: float = 10.0) -> dict[str, Any]:
        """An incoming call ringing (not yet answered); returns its ``incoming`` ({from, uri, displayName})."""
        state = self.wait_for("incoming call", lambda s: s["incoming"] is not None and not s["ended"], timeout)
        incoming: dict[str, Any] = state["incoming"]
        return incoming

    def wait_in_call(self, timeout: float = 10.0) -> dict[str, Any]:
        """The call is confirmed (the ACK went or came); fails at once when it ended instead."""
        return self.wait_for("call", lambda s: bool(s["inCall"]), timeout,
                             fail=lambda s: f"call ended ({s['endCause']})" if s["ended"] else None)

    def wait_ended(self, timeout: float = 10.0) -> dict[str, Any]:
        """The call ended (hung up, cancelled or failed); the state has ``endCause`` and ``endOriginator``."""
        return self.wait_for("end of call", lambda s: bool(s["ended"]), timeout)

    def wait_media(self, timeout: float = 10.0, sent: int = 10, received: int = 10) -> dict[str, Any]:
        """RTP on the current call: at least ``sent`` packets sent and ``received`` received (0: not waited for,
        as with a caller that sends no RTP)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.media()
            if stats["packetsSent"] >= sent and stats["packetsReceived"] >= received:
                return stats
            if time.monotonic() >= deadline:
                raise AssertionError(f"softphone: no media within {timeout:g} s: {stats}\n{self.describe()}")
            time.sleep(POLL)
