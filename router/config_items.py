"""A long users list in pieces: where each user is in the YAML's text, and users pickled
a chunk at a time.

``items_of`` finds the users from the text's lines alone, without composing the
YAML: each starts with a line holding the list's ``-`` at the list's own
indentation.  That is a guess, which its callers confirm against a composed tree
(``users_node``, ``ends_after``) before they trust it: ``config_split`` cuts the
list in two there, ``config_reuse`` keeps the users whose text has not changed.
``Chunks`` is the form the parse child hands users on in (``config_child``): a
worker unpickles them one chunk at a time.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat

import yaml

from router.policy.model import User

CHUNK = 1000                    # users per pickle: a few milliseconds to unpickle each

# Patterns that start with a newline, not ``^``: a literal first character lets the
# regex engine skip through 14 MB in a few milliseconds instead of trying every position.
_USERS_KEY = re.compile(r"\nusers:[ \t]*(?:#[^\n]*)?(?=\n|\Z)")
_CONTENT = re.compile(r"\n[ ]*[^ \n#]")                 # a line that is neither blank nor a comment
_ITEM = re.compile(r"\n( *)-(?=[ \t\n]|\Z)")             # a list item, with its indentation
_TOP_LEVEL = re.compile(r"\n[^ \t\n#-]")                 # a line that starts a top-level key
_OTHER_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
_ANCHOR_OR_ALIAS = re.compile(r"[\s\[{,:?][&*][^\s,\[\]{}]")  # ``&name`` or ``*name`` starting a value


@dataclass(frozen=True, slots=True)
class Items:
    """Where the users list and its items are, as offsets in the text."""
    users_key: int          # the start of the line ``users:``
    indent: str             # the list's indentation
    starts: list[int]       # the start of each item's first line
    end: int                # where the list ends: the next top-level line, or the end

    def texts(self, text: str) -> list[str]:
        """Each item's text: from its first line to the next item's, comments and blank
        lines after it included."""
        return list(map(text.__getitem__, map(slice, self.starts, self.starts[1:] + [self.end])))

    def lines(self, text: str) -> list[int]:
        """The line (0-based) of each item's start."""
        if not self.starts:
            return []
        between = map(text.count, repeat("\n"), self.starts[:-1], self.starts[1:])
        return list(accumulate(between, initial=text.count("\n", 0, self.starts[0])))


def items_of(text: str) -> Items | None:
    """The items of ``text``'s users list, or None when its shape is unusual: no
    ``users:`` key on its own line, several documents, line breaks other than LF
    (libyaml counts CR, NEL, LS and PS too), anchors or aliases (an anchor is known
    only where it is defined), or a list that is not a block list."""
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
    indent = first_item.group(1)
    item = re.compile(rf"\n{indent}-(?=[ \t\n]|\Z)")   # at the list's own indentation
    # Offsets in ``text`` without the newline put in front: a match's newline is at the
    # offset of the line after it.
    return Items(users_key=keys[0].start(), indent=indent,
                 starts=[found.start() for found in item.finditer(text, content.start(), end)],
                 end=end - 1)


@dataclass(slots=True)
class Chunks:
    """Users pickled ``CHUNK`` (or fewer) at a time, in order, with how many are in each."""
    pickled: list[bytes] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def add(self, users: Sequence[User | None], chunk: int = CHUNK) -> None:
        for i in range(0, len(users), chunk):
            part = users[i:i + chunk]
            self.pickled.append(pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL))
            self.sizes.append(len(part))

    def extend(self, other: Chunks) -> None:
        self.pickled += other.pickled
        self.sizes += other.sizes

    def clear(self) -> None:
        self.pickled.clear()
        self.sizes.clear()


def users_node(root: yaml.Node) -> tuple[yaml.Node, yaml.SequenceNode] | None:
    """The ``users`` key and its list, in a composed top-level mapping; None also when
    there are several ``users`` keys (the policy reads the first, whatever it holds)."""
    if not isinstance(root, yaml.MappingNode):
        return None
    found = [(key, value) for key, value in root.value if isinstance(key, yaml.ScalarNode) and key.value == "users"]
    if len(found) != 1 or not isinstance(found[0][1], yaml.SequenceNode):
        return None
    return found[0][0], found[0][1]


def ends_after(node: yaml.Node, line: int) -> bool:
    """Does a value in ``node`` (a user) run on past the start of ``line`` (where the
    next user's text was guessed to start)?  A quote or bracket left open there closes
    only further on: in the whole file it swallows the users after it, so the guess
    must not be trusted.  Block collections end where the next less indented line
    starts, so only scalars and flow collections say where their text ends."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        end = node.end_mark
        return bool(end.line > line or (end.line == line and end.column > 0))
    if isinstance(node, yaml.SequenceNode):
        return any(ends_after(child, line) for child in node.value)
    if isinstance(node, yaml.MappingNode):
        return any(ends_after(key, line) or ends_after(value, line) for key, value in node.value)
    return False


def write_all(fd: int, data: bytes, write: Callable[[int, memoryview], int] = os.write) -> None:
    """Write all of ``data`` to ``fd`` (a pipe).  A write a signal interrupts, or a
    profiler's pause, may write only part of a big buffer; a buffered file object has
    been seen to drop the rest of the answer then, so each part is written here until
    none is left."""
    view = memoryview(data)
    while view:
        view = view[write(fd, view):]
