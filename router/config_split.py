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

The users travel in chunks of pickled users (``config_items.Chunks``), the form in which the parse
child hands them on (``config_child``).  Asked for them (``pickled``), this process
pickles its own half while the forked one finishes, and keeps the forked one's chunks
as they came: the whole list is pickled once, half on each core, not again at the end.

The cut is a guess made from lines, so it is trusted only when both halves confirm it:
each composes without error, ``users:`` is where the cut found it, each half holds
exactly the items counted, and no value of the last user before the cut runs on past
it.  Files with anchors or aliases are not cut at all (``config_items.items_of``).
Anything else -- a YAML error in either half, an item counted wrong (a multi-line
string, a flow list), the forked process failing -- and the caller parses the whole
file in one piece, so the policy and every message are those of a whole-file parse.

The fork happens only in processes without other threads: the CLI and the parse child.
"""

from __future__ import annotations

import os
import pickle
import signal
from dataclasses import dataclass

import yaml

from router.config import compose, policy_from, read_users
from router.config_items import Chunks, ends_after, items_of, users_node, write_all
from router.errors import ConfigError
from router.policy.model import Policy, User
from router.yamlnodes import Place, Problems

MIN_USERS = 4000                # below this, one core is quick enough and a fork is not


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
    unusual (``config_items.items_of``): an anchor, for one, is known only in its half,
    and one defined twice is an error only in the whole file."""
    items = items_of(text)
    if items is None or len(items.starts) < MIN_USERS:
        return None
    starts, end = items.starts, items.end
    middle = len(starts) // 2
    at = starts[middle]
    at_line = text.count("\n", 0, at)
    # A comment at column 0 where the cut user was ends whatever the user before it left
    # open, as that user's line did: a block scalar kept with ``|+`` gets no extra lines.
    blanked = "#" + "\n" * text.count("\n", at, end)
    return Cut(first=text[:at] + blanked + text[end:],
               second="\n" * (at_line - 1) + "users:\n" + text[at:end],
               users_line=text.count("\n", 0, items.users_key), at=at_line,
               first_count=middle, second_count=len(starts) - middle)


def parse_split(text: str, filename: str, pickled: Chunks | None = None) -> Policy | None:
    """The policy, read on two cores; None when the file is not cut (the caller then
    parses it whole).  ``ConfigError`` as for the whole file.  ``pickled``: filled with
    the policy's users in chunks, when a policy is returned."""
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
            pickled.clear()
            pickled.extend(second.chunks)
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
    users = users_node(root)
    if (users is None or users[0].start_mark.line != where.users_line or len(users[1].value) != where.first_count
            or (users[1].value and ends_after(users[1].value[-1], where.at))):
        raise _NotConfirmed
    return policy_from(root, filename, second)


class _SecondHalf:
    """The forked process's users, as ``config.MoreUsers``; owns this end of both pipes."""

    def __init__(self, where: Cut, country_write: int, result_read: int, pickled: bool) -> None:
        self.where = where
        self.open = {"country": country_write, "result": result_read}
        self.pickled = pickled
        self.chunks = Chunks()             # every user's, once ``end`` returned (if ``pickled``)

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
        mine = Chunks()
        if self.pickled and None not in read_here:
            mine.add(read_here)
        with os.fdopen(self.open["result"], "rb", closefd=False) as answer:
            data = answer.read()
        self._close("result")
        try:
            kind, *rest = pickle.loads(data)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
            raise _NotConfirmed from None
        if kind != "ok":
            raise _NotConfirmed
        theirs, places, found = rest
        try:
            read = [user for chunk in theirs.pickled for user in pickle.loads(chunk)]
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
            raise _NotConfirmed from None
        if self.pickled:
            mine.extend(theirs)
            self.chunks = mine
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
    try:
        root = compose(where.second, filename)
    except ConfigError:
        root = None
    users = users_node(root) if isinstance(root, yaml.MappingNode) and len(root.value) == 1 else None
    if users is None or users[0].start_mark.line != where.at - 1 or len(users[1].value) != where.second_count:
        write_all(result_write, pickle.dumps(("no",)))
        return
    with os.fdopen(country_read, "rb") as given:
        country = given.read().decode()
    if not country:
        return                                                # the first half gave up
    problems = Problems(filename)
    read, places = read_users(users[1].value, where.first_count, problems, country)
    chunks = Chunks()
    chunks.add(read)
    write_all(result_write, pickle.dumps(("ok", chunks, places, problems.found), protocol=pickle.HIGHEST_PROTOCOL))
    os._exit(0)      # at once: freeing a million nodes would take a core from the first half
