"""How a refusal reaches a web client: the HTTP status of each router error, and
the field a person must fix with the value to type instead.

The rules themselves (authz, number checks) raise the router's own errors; this
module only says how those look over HTTP.  Looked up by MRO, like ``SIP_STATUS``.
"""

from __future__ import annotations

import re

from router.errors import ConfigError, Forbidden, InvalidChange, InvalidNumber, NotFound, RouterError
from router.policy.model import ReceiveMethod
from router.store.sqlite import StateError

HTTP_STATUS: dict[type[RouterError], int] = {
    RouterError: 500,
    ConfigError: 500,
    Forbidden: 403,
    NotFound: 404,
    InvalidNumber: 422,
    InvalidChange: 422,
    StateError: 503,          # the database is locked or unwritable: try again later
}


def http_status(error: RouterError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


class FieldRefused(RouterError):
    """A value of one form or API field was refused; ``error`` says why."""

    def __init__(self, field: str, error: RouterError) -> None:
        self.field = field
        self.error = error
        super().__init__(str(error))

    @property
    def status(self) -> int:
        return http_status(self.error)

    @property
    def hint(self) -> str | None:
        return hint_of(self.field, self.error)


_QUOTED = re.compile(r"'[^']*'")
_DIGITS = re.compile(r"\d{6,}")


def hint_of(field: str, error: RouterError) -> str | None:
    """What to type instead: the canonical number the refusal names (``84987654321``),
    or the receive methods there are."""
    if isinstance(error, InvalidNumber):
        # the refusal quotes what was typed, then names the canonical form or an example
        found = _DIGITS.findall(_QUOTED.sub("", str(error)))
        return found[-1] if found else None
    if field == "method" and "is not a receive method" in str(error):
        return ", ".join(m.value for m in ReceiveMethod)
    return None
