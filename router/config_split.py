"""Read a long users list on two cores.

Theory of operation.  Composing YAML and reading its users costs about 30 µs per user,
all in one thread: three seconds for 100,000 users.  When the users list is long, the
text is cut in two at the start of the middle user (a line with the list's ``-`` at the
list's own indentation):

- the *first half* is the whole file with the users after the cut blanked out;
- the *second half* is the line ``users:`` followed by the users after the cut.

Both keep every line where it was (a comment line and blank lines stand in for the
rest), so every node, and every problem found in it, has its line and column in the
real file.  A forked
process composes the second half while this one composes the first; it then waits for
the country (a top-level setting, needed to read phone numbers), reads its users and
sends them back pickled, with their places and problems.  This process reads the
rest of the file and cross-checks all the users together, as for the whole file.

The users travel in chunks of ``CHUNK`` pickled users, the form in which the parse
child hands them on (``config_child``).  Asked for them (``pickled``), this process
pickles its own half while the forked one finishes, and keeps the forked one's chunks
as they came: the whole list is pickled once, half on each core, not again at the end.

The cut is a guess made from lines, so it is trusted only when both halves confirm it:
each composes without error, ``users:`` is where the cut found it, each half holds
exactly the items counted, and no value of the last user before the cut runs on past
it.  Files with anchors or aliases are not cut at all.  Anything else -- a YAML error in either half, an item
counted wrong (a multi-line string, a flow list), the forked process failing -- and the
caller parses the whole file in one piece, so the policy and every message are those
of a whole-file parse.

The fork happens only in processes without other threads: the CLI and the parse child.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from router.config import compose, policy_from, read_users
from router.errors import ConfigError
from router.policy.model import Policy, User
from router.yamlnodes import Place, Problems

MIN_USERS = 4000                # below this, one core is quick enough and a fork is not
CHUNK = 1000                    # users per pickle: a few milliseconds to unpickle each

# Patterns that start with a newline, not ``^``: a literal first character lets the
# regex engine skip through 14 MB in a few milliseconds instead of trying every position.
_USERS_KEY = re.compile(r"\nusers:[ \t]*(?:#[^\n]*)?(?=\n|\Z)")
_CONTENT = re.compile(r"\n[ ]*[^ \n#]")                 # a line that is neither blank nor a comment
_ITEM = re.compile(r"\n( *)-(?=[ \t\n]|\Z)")             # a list item, with its indentation
_TOP_LEVEL = re.compile(r"\n[^ \t\n#-]")                 # a line that starts a top-level key
_OTHER_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
_ANCHOR_OR_ALIAS = re.compile(r"[\s\[{,][&*][^\s,\[\]{}]")  # ``&name`` or ``*name`` starting a value


class _NotConfirmed(Exception):
    """A half did not confirm the cut: parse the whole file instead."""


@dataclass(frozen=True, slots=True)
class Cut:
    first: str              # the whole file, the users from the cut on blanked out
    second: str             # ``users:`` and the users from the cut on, on their own lines
    users_line: int         # where ``users:`` is (0-based line)
    at: int                 # the line of the first user after the cut
    first_count: int        # users counted before the cut
    second_count: int       # users counted from the cut on


def cut(text: str) -> Cut | None:
    """Where to cut ``text`` in two, or None when its users list is short or its shape
    unusual: no ``users:`` key on its own line, several documents, line breaks other than
    LF (libyaml counts CR, NEL, LS and PS too), anchors or aliases (an anchor is known
    only in its half, and one defined twice is an error only in the whole file)."""
    text = "\n" + text                     # every line, the first too, follows a newline
    keys = list(_USERS_KEY.finditer(text))
    if (len(keys) != 1 or "\n---" in text or "\n..." in text
            or any(br in text for br in _OTHER_BREAKS)
            or (("&" in text or "*" in text) and _ANCHOR_OR_ALIAS.search(text))):
        return None
    begin = keys[0].end()
    content = _CONTENT.search(text, begin)             # the first line of the list
    if content is None:
        return None
    first_item = _ITEM.match(text, content.start())
    if first_item is None:
        return None                                    # not a block list
    top_key = _TOP_LEVEL.search(text, content.start())
    end = top_key.start() + 1 if top_key is not None else len(text)
    item = re.compile(rf"\n{first_item.group(1)}-(?=[ \t\n]|\Z)")   # at the list's own indentation
    starts = [found.start() + 1 for found in item.finditer(text, content.start(), end)]
    if len(starts) < MIN_USERS:
        return None
    middle = len(starts) // 2
    at = starts[middle]
    at_line = text.count("\n", 1, at)
    # A comment at column 0 where the cut user was ends whatever the user before it left
    # open, as that user's line did: a block scalar kept with ``|+`` gets no extra lines.
    blanked = "#" + "\n" * text.count("\n", at, end)
    return Cut(first=text[1:at] + blanked + text[end:],
               second="\n" * (at_line - 1) + "users:\n" + text[at:end],
               users_line=text.count("\n", 1, keys[0].start() + 1), at=at_line,
               first_count=middle, second_count=len(starts) - middle)


def pickle_users(users: Sequence[User | None]) -> list[bytes]:
    """``users`` pickled ``CHUNK`` at a time, in order."""
    return [pickle.dumps(users[i:i + CHUNK], protocol=pickle.HIGHEST_PROTOCOL)
            for i in range(0, len(users), CHUNK)]


def parse_split(text: str, filename: str, pickled: list[bytes] | None = None) -> Policy | None:
    """The policy, read on two cores; None when the file is not cut (the caller then
    parses it whole).  ``ConfigError`` as for the whole file.  ``pickled``: filled with
    the policy's users as ``pickle_users`` gives them, when a policy is returned."""
    where = cut(text)
    if where is None:
        return None
    try:
        country_read, country_write = os.pipe()
    except OSError:
        return None                                                # out of descriptors: one core
    try:
        result_read, result_write = os.pipe()
    except OSError:
        os.close(country_read)
        os.close(country_write)
        return None
    try:
        pid = os.fork()
    except OSError:
        for fd in (country_read, country_write, result_read, result_write):
            os.close(fd)
        return None                                                # no process to spare: one core
    if pid == 0:                                                   # the second half
        status = 1
        try:
            os.close(country_write)
            os.close(result_read)
            _second_half(where, filename, country_read, result_write)
            status = 0
        finally:
            os._exit(status)
    os.close(country_read)
    os.close(result_write)
    second = _SecondHalf(where, country_write, result_read, pickled is not None)
    try:
        policy = _first_half(where, filename, second)
        if pickled is not None:
            pickled[:] = second.chunks
        return policy
    except _NotConfirmed:
        return None
    finally:
        second.close()
        try:
            os.kill(pid, signal.SIGKILL)     # done already, or composing a half no longer wanted
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def _first_half(where: Cut, filename: str, second: _SecondHalf) -> Policy:
    try:
        root = compose(where.first, filename)
    except ConfigError:
        raise _NotConfirmed from None
    users = _users_node(root)
    if (users is None or users[0].start_mark.line != where.users_line or len(users[1].value) != where.first_count
            or (users[1].value and _ends_after(users[1].value[-1], where.at))):
        raise _NotConfirmed
    return policy_from(root, filename, second)


def _ends_after(node: yaml.Node, line: int) -> bool:
    """Does a value in ``node`` (the last user before the cut) run on past the start of
    ``line``?  A quote or bracket left open there would close only after the users list:
    in the whole file that swallows the users after the cut, so the halves must not be
    trusted.  Block collections end where the next less indented line starts, so only
    scalars and flow collections say where their text ends."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        end = node.end_mark
        return bool(end.line > line or (end.line == line and end.column > 0))
    if isinstance(node, yaml.SequenceNode):
        return any(_ends_after(child, line) for child in node.value)
    if isinstance(node, yaml.MappingNode):
        return any(_ends_after(key, line) or _ends_after(value, line) for key, value in node.value)
    return False


class _SecondHalf:
    """The forked process's users, as ``config.MoreUsers``; owns this end of both pipes."""

    def __init__(self, where: Cut, country_write: int, result_read: int, pickled: bool) -> None:
        self.where = where
        self.open = {"country": country_write, "result": result_read}
        self.pickled = pickled
        self.chunks: list[bytes] = []      # every user's, once ``end`` returned (if ``pickled``)

    def begin(self, country: str, first: int) -> None:
        if first != self.where.first_count:
            raise _NotConfirmed
        try:
            os.write(self.open["country"], country.encode())
        except BrokenPipeError:
            raise _NotConfirmed from None            # the second half did not confirm the cut
        self._close("country")                       # the end of the country: it may start

    def end(self, problems: Problems, read_here: list[User | None]) -> tuple[list[User | None], list[Place]]:
        # While the other half works; not for a file already known to be refused.
        mine = pickle_users(read_here) if self.pickled and None not in read_here else []
        with os.fdopen(self.open["result"], "rb", closefd=False) as answer:
            data = answer.read()
        self._close("result")
        try:
            kind, *rest = pickle.loads(data)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
            raise _NotConfirmed from None
        if kind != "ok":
            raise _NotConfirmed
        chunks, places, found = rest
        try:
            read = [user for chunk in chunks for user in pickle.loads(chunk)]
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
            raise _NotConfirmed from None
        if self.pickled:
            self.chunks = mine + chunks
        problems.merge(found)
        return read, places

    def _close(self, name: str) -> None:
        fd = self.open.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for name in list(self.open):
            self._close(name)


def _second_half(where: Cut, filename: str, country_read: int, result_write: int) -> None:
    with os.fdopen(result_write, "wb") as out:
        try:
            root = compose(where.second, filename)
        except ConfigError:
            root = None
        users = _users_node(root) if isinstance(root, yaml.MappingNode) and len(root.value) == 1 else None
        if users is None or users[0].start_mark.line != where.at - 1 or len(users[1].value) != where.second_count:
            out.write(pickle.dumps(("no",)))
            return
        with os.fdopen(country_read, "rb") as given:
            country = given.read().decode()
        if not country:
            return                                                # the first half gave up
        problems = Problems(filename)
        read, places = read_users(users[1].value, where.first_count, problems, country)
        out.write(pickle.dumps(("ok", pickle_users(read), places, problems.found),
                               protocol=pickle.HIGHEST_PROTOCOL))
        out.flush()
        os._exit(0)      # at once: freeing a million nodes would take a core from the first half


def _users_node(root: yaml.Node) -> tuple[yaml.Node, yaml.SequenceNode] | None:
    """The ``users`` key and its list, in a composed top-level mapping."""
    if not isinstance(root, yaml.MappingNode):
        return None
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "users" and isinstance(value, yaml.SequenceNode):
            return key, value
    return None
