"""Small rules of a forking proxy, kept apart from its state machine; pure.

Which failure to pass back (§16.7.6), what a summary line says, and how the
caller-ID rewrite and the CSeq step of an authenticated PSTN leg are undone on
the way back to the caller.
"""

from __future__ import annotations

import re

from router.records import CallRecord
from router.sip.message import SipMessage, parse_name_addr, parse_uri

MAX_CALLED = 64
# A number as a PBX writes it: digits with an optional "+" and visual separators,
# then URI parameters (phone-context); not a user id such as "minh".
_DIALLED = re.compile(r"^\+?[0-9().\-]*[0-9][0-9().\-]*(;|$)")


def best_response(failures: list[tuple[int, SipMessage | None]]) -> tuple[int, SipMessage | None]:
    """§16.7.6: a 6xx wins; else the lowest class; 503 is passed on as 500 by the caller's view."""
    if not failures:
        return 408, None
    six = [f for f in failures if 600 <= f[0] < 700]
    if six:
        return six[0]
    return min(failures, key=lambda f: (f[0] // 100, f[0] == 408, f[0] == 503))


def quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')[:200]


def summary(record: CallRecord) -> tuple[tuple[str, object], ...]:
    duration = (record.ended_at or record.started_at) - (record.answered_at or record.started_at)
    return (("call_id", record.call_id), ("caller", record.caller), ("user", record.user_id),
            ("queue", record.queue_id), ("method", record.method), ("branches", list(record.branches)),
            ("answered_by", record.answered_by), ("status", record.status), ("reason", record.reason),
            ("duration_s", round(duration, 3)))


def restore(msg: SipMessage, rewrite: tuple[str, str] | None, cseq: str | None = None,
             cseq_offset: int = 0) -> dict[str, str] | None:
    """Responses travelling back carry the caller's own From and CSeq again
    (the trunk saw a rewritten From, and the next CSeq after a challenge)."""
    out: dict[str, str] = {}
    if rewrite is not None and same_uri(msg.header("from") or "", rewrite[1]):
        out["from"] = rewrite[0]
    if cseq is not None and cseq != msg.header("cseq"):
        out["cseq"] = cseq
    elif cseq_offset:
        number, method = msg.cseq
        out["cseq"] = f"{number - cseq_offset} {method}"
    return out or None


def same_uri(a: str, b: str) -> bool:
    try:
        return parse_name_addr(a).uri == parse_name_addr(b).uri
    except ValueError:
        return False


def rewrite_headers(msg: SipMessage, rewrite: tuple[str, str] | None,
                     from_caller: bool) -> dict[str, str] | None:
    """In-dialog requests: the trunk side only ever sees the hotline From."""
    if rewrite is None:
        return None
    original, hotline = rewrite
    if from_caller:
        return {"from": hotline}
    return {"to": original} if same_uri(msg.header("to") or "", hotline) else None


def called_number(msg: SipMessage) -> str | None:
    """The dialled number, when the upstream PBX kept it in To; never raises.

    The number as written there -- the user part of a sip:/sips: URI
    (``+842873001234``, ``02873001234``, ``2873001234;phone-context=+84``) or
    the whole tel: URI -- for the policy core to read (``numbers.dialled``).
    None when To names no number (a user id, another scheme, a broken header).
    """
    try:
        uri = parse_name_addr(msg.header("to") or "").uri
        parsed = parse_uri(uri)
    except ValueError:
        return None
    written = uri.partition(":")[2] if parsed.scheme == "tel" else parsed.user
    if len(written) > MAX_CALLED or not _DIALLED.match(written):
        return None
    return uri if parsed.scheme == "tel" else written
