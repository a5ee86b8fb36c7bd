"""Read an edited users list again, keeping the users whose text has not changed.

Theory of operation.  After a good parse of a big file, the parse child keeps a
``Previous``: the country, and the users in the chunks they were handed on in, each
chunk with the text of its users' items (``config_items``: from a user's ``-`` line to
the next one's).  An edit seldom touches more than a few users, so the next parse of
that file looks for every kept chunk whose texts come again, one after the other, in
the new list; those users are taken as they were, unpickled, not composed again.
Only whole chunks are kept: the users of a chunk an edit broke into are read anew,
with the edited ones, and make new chunks.

A user read from YAML depends on its own text and the country alone (the rest of the
file enters only in the checks across users, which run on every user).  So a kept
user is exactly what reading its text would give, as long as its text is still one
item of the list.  That is confirmed by composing a *skeleton*: the file with each
run of kept users replaced by one placeholder item (``- ~``) and blank lines, so that
every line stays where it is.  The skeleton must compose; its list must hold the
users read anew and one placeholder per run, each starting on its own item's line;
which settles it: every item starts with a line ``items_of`` finds, so a quote or
bracket left open that swallowed an item's line (as it would in the real file) leaves
fewer items than lines found.  Texts are kept only when they were confirmed to be
whole items the same way (``Pairing``, ``paired``): each user starting on its own
item's lines, and the last not running on past the list.  Kept texts were whole
items in a good file; the text before each one now ends where it starts, so each
reads as it did.  Anything else -- a file whose shape ``items_of`` does not take, a
country changed, too few users kept, a skeleton that does not confirm -- and the
caller parses the whole file as usual: the policy and every message are those of a
whole-file parse.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import yaml

from router.config import compose, policy_from, read_users
from router.config_items import CHUNK, Chunks, Items, ends_after, items_of, users_node
from router.errors import ConfigError
from router.policy.model import Policy, User
from router.yamlnodes import Place, Problems, is_null

MIN_KEPT = 0.5                  # below this share of users kept, the usual parse is as quick
_PLACEHOLDER = "- ~"


@dataclass(frozen=True, slots=True)
class Previous:
    """The users of a good parse, for the next parse of the same file."""
    country: str
    chunks: tuple[tuple[bytes, tuple[str, ...]], ...]    # pickled users, and their items' texts

    # The users of each chunk, where the process that made it holds them already; not kept.
    loaded: tuple[list[User | None] | None, ...] = ()

    def users(self, index: int) -> list[User | None]:
        """The users of chunk ``index``."""
        found = self.loaded[index] if index < len(self.loaded) else None
        return found if found is not None else list(pickle.loads(self.chunks[index][0]))

    def dumps(self) -> bytes:
        return pickle.dumps((self.country, self.chunks), protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(data: bytes) -> Previous | None:
        """None when ``data`` is not one (written by another version, damaged)."""
        try:
            country, chunks = pickle.loads(data)
            good = isinstance(country, str) and all(
                isinstance(pickled, bytes) and texts and all(isinstance(t, str) for t in texts)
                for pickled, texts in chunks)
        except Exception:  # noqa: BLE001 -- anything wrong with it: not kept
            return None
        return Previous(country, tuple((pickled, tuple(texts)) for pickled, texts in chunks)) if good else None


def record(text: str, items: Items | None, policy: Policy, chunks: Chunks) -> Previous | None:
    """What to keep of ``policy``, read from ``text`` and pickled in ``chunks``, when
    its users were confirmed to be ``items`` (``items_of(text)``), one to one
    (``Pairing``, or the two-core split, whose halves confirm it); None when the
    counts differ."""
    if items is None or len(items.starts) != len(policy.users) or sum(chunks.sizes) != len(policy.users):
        return None
    return Previous(policy.country, _with_texts(chunks, items.texts(text)))


def _with_texts(chunks: Chunks, texts: list[str]) -> tuple[tuple[bytes, tuple[str, ...]], ...]:
    """Each chunk with its users' texts (``texts``: every user's, in order)."""
    kept, at = [], 0
    for pickled, size in zip(chunks.pickled, chunks.sizes, strict=True):
        kept.append((pickled, tuple(texts[at:at + size])))
        at += size
    return tuple(kept)


def _end_line(text: str, items: Items) -> int:
    """The line the list ends on; past the last line when nothing follows the list."""
    return text.count("\n", 0, items.end) + (items.end == len(text))


def paired(text: str, items: Items, nodes: Sequence[yaml.Node]) -> bool:
    """Are ``nodes`` (the users list of ``text``, composed) the items found, one to one:
    each starting on its own item's lines, the last not running on past the list's end?
    Every item starts with a line ``items_of`` finds, so with as many nodes as lines,
    each node starting on its line means none of them holds another's line; only the
    last could run on into the lines after the list (a quote closed there)."""
    lines = items.lines(text)
    if len(nodes) != len(lines):
        return False
    end_line = _end_line(text, items)
    for node, first, after in zip(nodes, lines, lines[1:] + [end_line], strict=True):
        if not first <= node.start_mark.line < after:
            return False
    return not nodes or not ends_after(nodes[-1], end_line)


class Pairing:
    """Reads the users list as ``read_users`` does, and notes whether its users are
    the items of the text, one to one (``paired``): only then are they kept."""

    def __init__(self, text: str, items: Items | None) -> None:
        self.text, self.items = text, items          # ``items_of(text)``
        self.paired = False

    def read(self, nodes: list[yaml.Node], problems: Problems,
             country: str) -> tuple[list[User | None], Sequence[Place]]:
        self.paired = self.items is not None and paired(self.text, self.items, nodes)
        return read_users(nodes, 0, problems, country)


class _NotConfirmed(Exception):
    """The users kept cannot be trusted here: parse the whole file."""


@dataclass(frozen=True, slots=True)
class _Run:
    first: int              # the index of its first user
    count: int
    kept: int               # the kept chunk it is, or -1: users read anew


def parse_reusing(text: str, filename: str, previous: Previous, chunk: int = CHUNK,
                  items: Items | None = None) -> tuple[Policy, Chunks, Previous] | None:
    """The policy of ``text``, its users in chunks, and what to keep of it; None when
    the whole file must be parsed instead.  ``ConfigError`` as for the whole file.
    ``items``: ``items_of(text)``, when the caller has it already."""
    items = items if items is not None else items_of(text)
    if items is None or not items.starts:
        return None
    texts = items.texts(text)
    runs = _plan(texts, previous)
    if sum(run.count for run in runs if run.kept >= 0) < MIN_KEPT * len(texts):
        return None
    lines = items.lines(text)
    try:
        root = compose(_skeleton(text, items, runs), filename)
    except ConfigError:
        return None                     # the whole file says what is wrong, and where
    if not _confirmed(root, text, items, runs, lines):
        return None
    reader = _Reader(text, items, runs, lines, previous, chunk, users_node(root))
    try:
        policy = policy_from(root, filename, users_reader=reader.read)
    except _NotConfirmed:
        return None
    return policy, reader.chunks, Previous(policy.country, _with_texts(reader.chunks, texts))


def _plan(texts: list[str], previous: Previous) -> list[_Run]:
    """The list as runs of users read anew and kept chunks, in order."""
    by_first: dict[str, list[int]] = {}
    for index, (_, old) in enumerate(previous.chunks):
        by_first.setdefault(old[0], []).append(index)
    runs: list[_Run] = []
    fresh, i = 0, 0
    while i < len(texts):
        for index in by_first.get(texts[i], ()):
            old = previous.chunks[index][1]
            if tuple(texts[i:i + len(old)]) == old:
                if fresh < i:
                    runs.append(_Run(fresh, i - fresh, -1))
                runs.append(_Run(i, len(old), index))
                i += len(old)
                fresh = i
                break
        else:
            i += 1
    if fresh < len(texts):
        runs.append(_Run(fresh, len(texts) - fresh, -1))
    return runs


def _bounds(items: Items, run: _Run) -> tuple[int, int]:
    after = run.first + run.count
    return items.starts[run.first], items.starts[after] if after < len(items.starts) else items.end


def _skeleton(text: str, items: Items, runs: list[_Run]) -> str:
    parts = [text[:items.starts[0]]]
    for run in runs:
        begin, end = _bounds(items, run)
        if run.kept < 0:
            parts.append(text[begin:end])
        else:
            parts.append(items.indent + _PLACEHOLDER + "\n" * text.count("\n", begin, end))
    parts.append(text[items.end:])
    return "".join(parts)


def skeleton_of_all(text: str, items: Items) -> str:
    """``text`` with its whole users list one placeholder: the rest of the file, every
    line where it is, to read the settings the users depend on (the country)."""
    return _skeleton(text, items, [_Run(0, len(items.starts), 0)])


def _confirmed(root: yaml.Node, text: str, items: Items, runs: list[_Run], lines: list[int]) -> bool:
    found = users_node(root)
    if found is None or found[0].start_mark.line != text.count("\n", 0, items.users_key):
        return False
    nodes = found[1].value
    end_line = _end_line(text, items)
    expected = sum(run.count if run.kept < 0 else 1 for run in runs)
    if len(nodes) != expected:
        return False
    k = 0
    for run in runs:
        if run.kept >= 0:
            node = nodes[k]
            if not (is_null(node) and node.start_mark.line == lines[run.first]):
                return False
            k += 1
            continue
        for j in range(run.first, run.first + run.count):
            node = nodes[k]
            next_line = lines[j + 1] if j + 1 < len(lines) else end_line
            if not lines[j] <= node.start_mark.line < next_line:
                return False
            k += 1
    # The last user, read anew, must not run on past the list (a quote closed after it):
    # the whole file reads the same, but its text would be kept short of its end.
    return runs[-1].kept >= 0 or not ends_after(nodes[-1], end_line)


def _place(text: str, start: int, line: int, indent: int) -> Place:
    """Where the user of the item starting at ``start`` (on ``line``) begins: the first
    thing after its ``-`` that is not a space, a comment or a line break."""
    at = start + indent + 1
    column_base = start
    while at < len(text):
        char = text[at]
        if char in " \t":
            at += 1
        elif char == "#":
            at = text.find("\n", at)
            if at < 0:
                break
        elif char == "\n":
            at += 1
            line += 1
            column_base = at
        else:
            break
    return line + 1, at - column_base + 1


class _Places(Sequence[Place]):
    """Where each user is: known for the users read anew, worked out from the text for
    a kept one only when a problem is reported there."""

    def __init__(self, text: str, items: Items, lines: list[int]) -> None:
        self.text, self.items, self.lines = text, items, lines
        self.known: list[Place | None] = [None] * len(items.starts)

    def __len__(self) -> int:
        return len(self.known)

    @overload
    def __getitem__(self, index: int) -> Place: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Place]: ...

    def __getitem__(self, index: int | slice) -> Place | Sequence[Place]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        found = self.known[index]
        if found is None:
            found = _place(self.text, self.items.starts[index], self.lines[index], len(self.items.indent))
        return found


class _Reader:
    """Reads the users list of the skeleton: the users read anew from their nodes, the
    kept ones from their chunks; and makes the chunks and texts to hand on and keep."""

    def __init__(self, text: str, items: Items, runs: list[_Run], lines: list[int],
                 previous: Previous, chunk: int,
                 confirmed: tuple[yaml.Node, yaml.SequenceNode] | None) -> None:
        self.text, self.items, self.runs, self.lines = text, items, runs, lines
        self.previous, self.chunk = previous, chunk
        self.confirmed = confirmed[1].value if confirmed is not None else []
        self.chunks = Chunks()              # every user's, in order, once ``read`` returned

    def read(self, nodes: list[yaml.Node], problems: Problems,
             country: str) -> tuple[list[User | None], Sequence[Place]]:
        if country != self.previous.country:
            raise _NotConfirmed                  # phone numbers read another way
        if len(nodes) != len(self.confirmed) or any(a is not b for a, b in zip(nodes, self.confirmed, strict=True)):
            raise _NotConfirmed                  # not the list the skeleton was confirmed on
        users: list[User | None] = []
        places = _Places(self.text, self.items, self.lines)
        k = 0
        for run in self.runs:
            if run.kept >= 0:
                pickled = self.previous.chunks[run.kept][0]
                those = self.previous.users(run.kept)
                if len(those) != run.count:
                    raise _NotConfirmed
                users += those
                self.chunks.pickled.append(pickled)
                self.chunks.sizes.append(run.count)
                k += 1
                continue
            read, where = read_users(nodes[k:k + run.count], run.first, problems, country)
            users += read
            places.known[run.first:run.first + run.count] = where
            k += run.count
            if None not in read:          # a file with problems hands nothing on
                self.chunks.add(read, self.chunk)
        return users, places
