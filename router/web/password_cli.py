"""``sip-router hash-password`` and ``set-password``: the operator's way to web app passwords.

The password is read without echo on a terminal (asked twice), else as one line of
standard input, so scripts can pipe it; it never appears on a command line.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable

from router.web.passwords import WeakPassword, hash_password


class PasswordInputError(ValueError):
    """No usable password was given."""


def read_password(prompt: str = "Password: ", confirm: bool = True,
                  ask: Callable[[str], str] = getpass.getpass) -> str:
    if sys.stdin.isatty():
        password = ask(prompt)
        if confirm and ask("Again: ") != password:
            raise PasswordInputError("the two passwords differ; nothing was changed")
    else:
        line = sys.stdin.readline()
        if not line:
            raise PasswordInputError("no password on standard input; nothing was changed")
        password = line.rstrip("\r\n")
    return password


def new_hash() -> str:
    """Read a new password and hash it; ``PasswordInputError`` with the reason otherwise."""
    try:
        return hash_password(read_password())
    except WeakPassword as exc:
        raise PasswordInputError(f"{exc}; nothing was changed") from None
