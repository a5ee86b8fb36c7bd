"""structlog set-up: console lines on a terminal, JSON lines otherwise.

Under systemd stdout is the journal, not a TTY, so the router logs one JSON
object per line there; an operator at a terminal gets readable colour lines.

When the output *is* the journal -- ``JOURNAL_STREAM`` names the device and
inode of the stream systemd connected, and they match ours -- each line starts
with its sd-daemon priority (``<3>`` error, ``<4>`` warning, ``<6>`` info,
``<7>`` debug), so ``journalctl -p err -u sip-router`` shows the errors.  The
device and inode are compared, not merely the variable's presence: a process
started from a unit inherits ``JOURNAL_STREAM`` even when its output goes to a
pipe or a file, where a ``<6>`` would be noise.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}
# sd-daemon(3) priorities, by the level structlog's add_log_level writes.
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
              "info": 6, "debug": 7}


def is_journal(stream: object, environ: Mapping[str, str] = os.environ) -> bool:
    """Is ``stream`` the journal stream systemd gave this process?"""
    expected = environ.get("JOURNAL_STREAM", "")
    device, _, inode = expected.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _with_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    def render(logger: object, method_name: str, event_dict: structlog.typing.EventDict) -> str:
        priority = PRIORITIES.get(str(event_dict.get("level", method_name)), 6)
        line = renderer(logger, method_name, event_dict)
        return f"<{priority}>" + (line.decode() if isinstance(line, bytes) else str(line))
    return render


_enabled: frozenset[str] = frozenset(_LEVELS)   # the levels that write a line (``configure``)


def enabled(level: str) -> bool:
    """Does a line at ``level`` get written?  Lets a hot path skip building a line's
    fields when its level is filtered out."""
    return level in _enabled


_PROCESS: dict[str, object] = {}      # fields every line of this process carries (the worker)


def bind(**fields: object) -> None:
    """Put ``fields`` on every log line this process writes, from any thread."""
    _PROCESS.update(fields)


def _process_fields(_logger: object, _name: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    for key, value in _PROCESS.items():
        event_dict.setdefault(key, value)
    return event_dict


def configure(level: str = "info", fmt: str = "auto", stream: object = None) -> None:
    global _enabled
    out = stream if stream is not None else sys.stderr
    floor = _LEVELS.get(level, logging.INFO)
    _enabled = frozenset(name for name, number in _LEVELS.items() if number >= floor)
    use_json = fmt == "json" or (fmt == "auto" and not getattr(out, "isatty", lambda: False)())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json
        else structlog.dev.ConsoleRenderer(colors=getattr(out, "isatty", lambda: False)()))
    if is_journal(out):
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(floor),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def get(name: str = "sip-router") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
