"""sd_notify(3) without a dependency: datagrams to ``$NOTIFY_SOCKET``.

Only when systemd set ``NOTIFY_SOCKET`` (a ``Type=notify`` unit); otherwise
every call does nothing.  The socket is non-blocking: the PJSIP thread sends
the watchdog ping, and a systemd that is slow to read must cost it a lost
datagram, never a wait.  ``WATCHDOG=1`` is sent only when the unit asked for it
(``WATCHDOG_USEC``, for this process when ``WATCHDOG_PID`` says so).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path     # "@": the abstract namespace
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        self.watchdog_on = bool(path) and usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid()))
        self.sock: socket.socket | None = None
        if path:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
            except OSError:
                self.sock = None

    def send(self, *assignments: str) -> None:
        """One datagram of ``NAME=value`` lines (READY=1, STATUS=..., RELOADING=1...)."""
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError:
            pass        # systemd gone or its queue full: a status line is not worth a wait

    def watchdog(self) -> None:
        if self.watchdog_on:
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
