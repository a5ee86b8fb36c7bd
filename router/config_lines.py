"""Read a machine-written users list without composing it: one user per line, in flow style.

Theory of operation.  A list of 100,000 users is seldom typed by hand: an export writes
it, one user per line, ``  - {id: u1, extension: '10001', devices: [{id: d1, ...}]}``.
Composing that with libyaml makes a node and two position marks per value (two million
of them), and reading them back costs as much again.  Here each line is first matched
against a small grammar (``_BODY``): a flow mapping of keys to scalars, lists of
scalars, or lists of flow mappings of keys to scalars or lists of scalars, where

- a scalar is a plain word run (``\\w`` and ``. @ + -``, words joined by single spaces)
  or a single-quoted text without quotes, backslashes, any of ``, : { } [ ]``, or a
  character YAML reads as a line break or refuses (controls, surrogates, BOM);
- the separators are written as a YAML writer writes them: ``: `` after a key, ``, ``
  between entries, no space inside the brackets.

In that language every scalar's value is its text (a plain scalar on one line has no
folding, a single-quoted one without quotes no escapes), and its characters cannot be
mistaken for the structure's.  So a handful of string replacements turn all the matched
lines into JSON at once (quotes around the plain scalars, double for single quotes), and
``json.loads`` builds the same dicts and lists libyaml's tree holds.  Three things YAML
does that JSON would hide are checked on the result: a key given twice in one mapping
(JSON keeps the last; the YAML reader refuses it), the null words ``null``/``Null``/
``NULL`` (null in YAML, text in JSON), and a value of the wrong kind.

Each user is then built as ``config._user`` builds it, for the keys this reader knows
and values that pass every check; anything else -- another key, a value the reader
would refuse, a number that is not valid -- and that user is *declined*.  A declined
user, or a line outside the grammar, is read by libyaml as usual: the users read here
are handed to ``config_reuse`` as if they had been kept from an earlier parse, which
composes a skeleton of the file with them replaced by placeholders, confirms that each
of their lines is one item of the list, reads the others and cross-checks them all.
The policy and every message are those of a whole-file parse.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass

from router.config import _HEX32, _HEX64, _KIND, _METHOD, _ROLE, _TOKEN, compose, country_of
from router.config_items import CHUNK, Chunks, Items, items_of, write_all
from router.config_reuse import MIN_KEPT, Previous, parse_reusing, skeleton_of_all
from router.errors import ConfigError, InvalidNumber
from router.policy.model import Device, Policy, User, build_device, build_user
from router.policy.numbers import canonical

_QUOTED = r"'[^'\"\\,:{}\[\]\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]+'"
_PLAIN = r"\w[\w.@+\-]*(?: \w[\w.@+\-]*)*"
_SCALAR = f"(?:{_QUOTED}|{_PLAIN})"
_SCALARS = rf"\[{_SCALAR}(?:, {_SCALAR})*\]"
_INNER = rf"\{{{_SCALAR}: (?:{_SCALAR}|{_SCALARS})(?:, {_SCALAR}: (?:{_SCALAR}|{_SCALARS}))*\}}"
_INNERS = rf"\[{_INNER}(?:, {_INNER})*\]"
_VALUE = f"(?:{_SCALAR}|{_SCALARS}|{_INNERS})"
_BODY = re.compile(rf"\{{{_SCALAR}: {_VALUE}(?:, {_SCALAR}: {_VALUE})*\}}")

MIN_USERS = 1000            # below this, the usual reading is quick enough
MIN_SPLIT = 2000            # users in each half: below that, one core is quick enough
_NULLS = frozenset({"null", "Null", "NULL"})
_USER_KEYS = frozenset({"id", "display_name", "extension", "role", "receive_method", "agent_phone",
                        "default_queue", "devices"})
_DEVICE_KEYS = frozenset({"id", "kind", "username", "password", "ha1", "ha1_sha256"})


def parse_lines(text: str, filename: str, items: Items | None = None,
                min_users: int = MIN_USERS) -> tuple[Policy, Chunks, Previous] | None:
    """The policy of ``text`` with the users that are one line each read here, its users
    in chunks, and what to keep of it (as ``config_reuse.parse_reusing``); None when too
    few users are one line each, or anything fails to confirm: then read the file the
    usual way, as for a list shorter than ``min_users``.  ``ConfigError`` as for the whole
    file.  ``items``: ``items_of(text)``."""
    items = items if items is not None else items_of(text)
    if items is None or len(items.starts) < min_users:
        return None
    try:
        previous = read_lines(text, filename, items)
        return None if previous is None else parse_reusing(text, filename, previous, items=items)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 -- any fault here: read the file the usual way
        return None


def read_lines(text: str, filename: str, items: Items) -> Previous | None:
    """The users of ``text`` (its list found as ``items``) that are one line each and
    read here, as a ``Previous`` for ``config_reuse.parse_reusing``; None when fewer
    than half of them are, or the file's country cannot be read without them.
    A long list is read on two cores: call this only in a process without threads."""
    try:
        country = country_of(compose(skeleton_of_all(text, items), filename))
    except ConfigError:
        return None
    if country is None:
        return None
    texts = items.texts(text)
    runs = _in_two(texts, f"{items.indent}- ", country)
    if runs is None or sum(run.end - run.start for run in runs) < MIN_KEPT * len(texts):
        return None
    return Previous(country, tuple((run.pickled, tuple(texts[run.start:run.end])) for run in runs),
                    tuple(run.users for run in runs))


@dataclass(frozen=True, slots=True)
class Run:
    """Users ``start`` to ``end`` (not included) of the list, read here."""
    start: int
    end: int
    pickled: bytes
    users: list[User | None] | None         # when read in this process; not pickled


def _in_two(texts: list[str], prefix: str, country: str) -> list[Run] | None:
    """``_part`` of every text, the second half in a forked process."""
    middle = len(texts) // 2
    if middle < MIN_SPLIT:
        return _part(texts, 0, prefix, country)
    try:
        answer_read, answer_write = os.pipe()
    except OSError:
        return _part(texts, 0, prefix, country)                 # out of descriptors: one core
    try:
        pid = os.fork()
    except OSError:
        os.close(answer_read)
        os.close(answer_write)
        return _part(texts, 0, prefix, country)                 # no process to spare: one core
    if pid == 0:                                                # the second half
        status = 1
        try:
            os.close(answer_read)
            runs = _part(texts[middle:], middle, prefix, country)
            sent = None if runs is None else [(run.start, run.end, run.pickled) for run in runs]
            write_all(answer_write, pickle.dumps(sent, protocol=pickle.HIGHEST_PROTOCOL))
            status = 0
        finally:
            os._exit(status)        # at once: nothing of this process is wanted any more
    os.close(answer_write)
    try:
        # Opened first: should this half fail, closing it ends the other half's write
        # (which no pipe buffer holds) before it is waited for.
        with os.fdopen(answer_read, "rb") as answer:
            mine = _part(texts[:middle], 0, prefix, country)
            data = answer.read()
    finally:
        _, status = os.waitpid(pid, 0)
    if status != 0 or mine is None:
        return None
    theirs = pickle.loads(data)     # our own fork's answer, never another process's
    return None if theirs is None else mine + [Run(start, end, pickled, None) for start, end, pickled in theirs]


def _part(texts: list[str], first: int, prefix: str, country: str) -> list[Run] | None:
    """The runs of consecutive users among ``texts`` (the list's from ``first`` on) that
    are read here, at most ``CHUNK`` in each; None when the JSON does not load."""
    bodies = [_body(text, prefix) for text in texts]
    users = _users([body for body in bodies if body is not None], country)
    if users is None:
        return None
    found: list[User | None] = []
    read = iter(users)
    for body in bodies:
        found.append(None if body is None else next(read))
    runs: list[Run] = []
    start = 0
    while start < len(found):
        if found[start] is None:
            start += 1
            continue
        end = start
        while end < len(found) and end - start < CHUNK and found[end] is not None:
            end += 1
        those = found[start:end]
        runs.append(Run(first + start, first + end, pickle.dumps(those, protocol=pickle.HIGHEST_PROTOCOL), those))
        start = end
    return runs


def _body(item: str, prefix: str) -> str | None:
    """The flow mapping of an item that is one line in the grammar, else None."""
    if not item.startswith(prefix):
        return None
    body = item[len(prefix):-1] if item.endswith("\n") else item[len(prefix):]
    if "\n" in body or _BODY.fullmatch(body) is None:
        return None
    return body


def _users(bodies: list[str], country: str) -> list[User | None] | None:
    """Each body's user, None for one declined; None when the JSON does not load (which
    the grammar should rule out: then nothing is read here)."""
    loaded = _loaded(bodies)
    if loaded is None:
        return None
    return [_user(value, keys, country) for value, keys in loaded]


def _loaded(bodies: list[str]) -> list[tuple[object, int]] | None:
    """Each body (in the grammar) as JSON reads it, with how many keys it writes."""
    if not bodies:
        return []
    joined = "\n".join(bodies).replace("'", '"')
    for old, new in (("{", '{"'), ("[", '["'), (", ", '", "'), (": ", '": "'), ("}", '"}'), ("]", '"]'),
                     ('"{', "{"), ('}"', "}"), ('"[', "["), (']"', "]"), ('""', '"')):
        joined = joined.replace(old, new)
    try:
        loaded = json.loads(f"[{joined.replace(chr(10), ',')}]")
    except ValueError:
        return None
    lines = joined.split("\n")
    if not isinstance(loaded, list) or len(loaded) != len(lines):
        return None
    return [(value, line.count('": ')) for value, line in zip(loaded, lines, strict=True)]


def _user(value: object, keys: int, country: str) -> User | None:
    """As ``config._user`` reads a user without problems; None for anything else."""
    if not isinstance(value, dict) or not value.keys() <= _USER_KEYS:
        return None
    seen = len(value)
    for key, item in value.items():
        if key != "devices" and (not isinstance(item, str) or item in _NULLS):
            return None
    uid = value.get("id")
    if uid is None or not _TOKEN.match(uid):
        return None
    devices: list[Device] = []
    for entry in value.get("devices", ()):
        device = _device(entry)
        if device is None:
            return None
        devices.append(device)
        seen += len(entry)
    if seen != keys:
        return None                      # a key given twice: the YAML reader refuses it
    method = _METHOD.get(value.get("receive_method", "all_devices"))
    role = _ROLE.get(value.get("role", "agent"))
    if method is None or role is None:
        return None
    phone = value.get("agent_phone")
    if phone is not None:
        try:
            phone = canonical(phone, country)
        except InvalidNumber:
            return None
    display = str(value.get("display_name", uid))      # a str: checked above
    return build_user(uid, display, value.get("extension"), role, method, phone,
                      value.get("default_queue"), tuple(devices), None, None, None)


def _device(value: object) -> Device | None:
    """As ``config._device`` reads a device without problems; None for anything else."""
    if not isinstance(value, dict) or not value.keys() <= _DEVICE_KEYS:
        return None
    for item in value.values():
        if not isinstance(item, str) or item in _NULLS:
            return None
    did, kind = value.get("id"), _KIND.get(value.get("kind", ""))
    username = value.get("username", did)
    if did is None or kind is None or username is None or not _TOKEN.match(username):
        return None
    password, ha1, ha1_256 = value.get("password"), value.get("ha1"), value.get("ha1_sha256")
    if (password is None and ha1 is None) or (password is not None and (ha1 is not None or ha1_256 is not None)):
        return None
    if (ha1 is not None and not _HEX32.match(ha1)) or (ha1_256 is not None and not _HEX64.match(ha1_256)):
        return None
    if username == did:
        username = did          # one string object for both, as config does
    return build_device(did, kind, username, password, ha1.lower() if ha1 else None,
                        ha1_256.lower() if ha1_256 else None)
