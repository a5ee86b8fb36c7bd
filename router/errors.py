"""The router's error hierarchy and the one table that maps it to SIP status.

Every refusal the router makes -- a bad config edit, a forbidden change, an
invalid phone number, a malformed request -- is one of these.  Code raises the
error; the edge that talks to a person or a peer looks the status up here.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the router raises on purpose."""


class ConfigError(RouterError):
    """The YAML policy is invalid; ``problems`` holds every ``file:line: msg``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class InvalidNumber(RouterError):
    """A phone number is not in canonical form or not valid for the country."""


class Forbidden(RouterError):
    """The actor may not make this change or this request."""


class NotFound(RouterError):
    """A user, queue or device does not exist."""


class InvalidChange(RouterError):
    """A requested change is well-formed but cannot be applied."""


class MalformedMessage(RouterError, ValueError):
    """A SIP message cannot be parsed or violates a MUST of RFC 3261.

    Also a ``ValueError``: the message layer's parse helpers raise it, and code
    that parses a header value catches one type whichever helper it called.
    """


class Unsupported(RouterError):
    """A SIP method or feature the router does not implement."""


# One table: error class -> (SIP status, reason phrase).  Looked up by MRO, so a
# subclass inherits its parent's status unless it has its own row.
SIP_STATUS: dict[type[RouterError], tuple[int, str]] = {
    RouterError: (500, "Server Internal Error"),
    ConfigError: (500, "Server Internal Error"),
    InvalidNumber: (400, "Bad Request"),
    Forbidden: (403, "Forbidden"),
    NotFound: (404, "Not Found"),
    InvalidChange: (409, "Conflict"),
    MalformedMessage: (400, "Bad Request"),
    Unsupported: (501, "Not Implemented"),
}


def sip_status(error: RouterError) -> tuple[int, str]:
    """The SIP status code and reason phrase for ``error``."""
    for cls in type(error).__mro__:
        if issubclass(cls, RouterError) and cls in SIP_STATUS:
            return SIP_STATUS[cls]
    return SIP_STATUS[RouterError]
