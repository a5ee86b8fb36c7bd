"""Reading a composed YAML node tree with file:line errors.

``yaml.compose`` keeps every node's position.  ``MapReader`` walks a mapping
node, converts values, and records each problem as ``file:line:column: path: message``
instead of stopping at the first, so an operator sees every mistake at once, in the
order of the file.  Keys nobody asked for are reported as unknown, with the closest
known key: a typo must not pass silently.
"""

from __future__ import annotations

import builtins
import difflib
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_MISSING = object()

_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when present: 10x faster
_STR, _SEQ, _MAP = "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
_Resolvers = tuple[tuple[str, Callable[[str], object]], ...]


def _resolvers_by_first() -> tuple[dict[str, _Resolvers], _Resolvers]:
    """The safe loader's implicit resolvers by a scalar's first character, each list
    followed by the wildcard ones (PyYAML's order), and the wildcard ones alone."""
    table = _BASE_LOADER.yaml_implicit_resolvers
    wildcard = tuple((tag, regexp.match) for tag, regexp in table.get(None, []))
    return ({first: tuple((tag, regexp.match) for tag, regexp in resolvers) + wildcard
             for first, resolvers in table.items() if first is not None}, wildcard)


_BY_FIRST, _WILDCARD = _resolvers_by_first()


class Loader(_BASE_LOADER):  # type: ignore[misc]
    """The safe loader, with the scalar tags resolved by a lean ``resolve``.

    libyaml composes in C but calls ``resolve`` in Python once per node: two million
    times for 100,000 users.  PyYAML's own version rebuilds the candidate list on
    every call and consults path resolvers, which the safe loader never has.  This
    one tries the same resolvers in the same order, so every tag comes out the same."""

    def resolve(self, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode:
            if implicit[0]:
                for tag, match in _BY_FIRST.get(value[:1], _WILDCARD):
                    if match(value):
                        return tag
            return _STR
        return _SEQ if kind is yaml.SequenceNode else _MAP


Place = tuple[int, int]      # (line, column), counted from 1, of a node in the file


def place(node: yaml.Node) -> Place:
    return node.start_mark.line + 1, node.start_mark.column + 1


class Problems:
    """Collects ``file:line:column: path: message`` lines (``file:1:`` when no node is known)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._found: list[tuple[int, int, str]] = []

    def add(self, node: yaml.Node | None, path: str, message: str) -> None:
        if node is None:
            where = f"{path}: " if path else ""
            self._found.append((1, 0, f"{self.filename}:1: {where}{message}"))
            return
        self.add_at(place(node), path, message)

    def add_at(self, where: Place, path: str, message: str) -> None:
        line, column = where
        named = f"{path}: " if path else ""
        self._found.append((line, column, f"{self.filename}:{line}:{column}: {named}{message}"))

    @property
    def found(self) -> list[tuple[int, int, str]]:
        """(line, column, text) of each problem, to merge into another ``Problems``."""
        return list(self._found)

    def merge(self, found: list[tuple[int, int, str]]) -> None:
        self._found.extend(found)

    @property
    def lines(self) -> list[str]:
        """Every problem in the order of the file (checks run section by section, so
        they are found out of order); problems at one place keep the order found."""
        return [text for _, _, text in sorted(self._found, key=lambda found: found[:2])]


def scalar_text(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


_NULL = "tag:yaml.org,2002:null"


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _text(node: yaml.Node) -> str:
    text = scalar_text(node)
    if text is None or text == "":
        raise ValueError("must be a non-empty text value")
    return text


class MapReader:
    """Typed access to one YAML mapping node."""

    __slots__ = ("node", "path", "problems", "items", "used")

    def __init__(self, node: yaml.Node, path: str, problems: Problems) -> None:
        self.node = node
        self.path = path
        self.problems = problems
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.used: set[str] = set()
        if not isinstance(node, yaml.MappingNode):
            problems.add(node, path, "must be a mapping of key: value")
            return
        items = self.items
        for key_node, value_node in node.value:
            key = scalar_text(key_node)
            if key is None:
                problems.add(key_node, path, "keys must be plain words")
                continue
            if key in items:
                problems.add(key_node, self._sub(key), "duplicate key")
                continue
            items[key] = (key_node, value_node)

    @property
    def ok(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.items and not is_null(self.items[key][1])

    def node_of(self, key: str) -> yaml.Node:
        return self.items[key][1] if key in self.items else self.node

    def raw(self, key: str) -> yaml.Node | None:
        self.used.add(key)
        item = self.items.get(key)
        if item is None:
            return None
        node = item[1]
        return None if node.tag == _NULL and isinstance(node, yaml.ScalarNode) else node

    def _get(self, key: builtins.str, default: Any, required: bool,
             convert: Callable[[yaml.Node], T]) -> T | Any:
        node = self.raw(key)
        if node is None:
            if required:
                self.problems.add(self.node, self._sub(key), "is required")
            return default
        try:
            return convert(node)
        except ValueError as exc:
            self.problems.add(node, self._sub(key), builtins.str(exc))
            return default

    # ``str`` below is this class's method, so annotations in the class say ``builtins.str``.
    def str(self, key: builtins.str, default: Any = None, required: bool = False) -> Any:
        # The common cases inline (absent, or a non-empty scalar): 100,000 users read
        # over two million values.
        item = self.items.get(key)
        if item is None:
            self.used.add(key)
            if required:
                self.problems.add(self.node, self._sub(key), "is required")
            return default
        node = item[1]
        if node.__class__ is yaml.ScalarNode and node.value != "" and node.tag != _NULL:
            self.used.add(key)
            return node.value
        return self._get(key, default, required, _text)

    def choice(self, key: builtins.str, choices: builtins.list[builtins.str], default: Any = None,
               required: bool = False) -> Any:
        item = self.items.get(key)
        if item is None and not required:
            self.used.add(key)
            return default
        if item is not None:        # the common case inline, as in ``str``
            node = item[1]
            if node.__class__ is yaml.ScalarNode and node.value in choices and node.tag != _NULL:
                self.used.add(key)
                return node.value
        def conv(node: yaml.Node) -> builtins.str:
            text = scalar_text(node)
            if text is None or text not in choices:
                raise ValueError(f"{text!r} is not one of: {', '.join(choices)}")
            return text
        return self._get(key, default, required, conv)

    def number(self, key: builtins.str, default: Any = None, required: bool = False,
               minimum: float | None = None, maximum: float | None = None,
               integer: bool = False) -> Any:
        def conv(node: yaml.Node) -> float | int:
            text = scalar_text(node)
            try:
                value: float | int = int(text) if integer else float(text)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                kind = "a whole number" if integer else "a number"
                raise ValueError(f"must be {kind}, not {text!r}") from None
            if minimum is not None and value < minimum:
                raise ValueError(f"must be at least {minimum:g}, not {value:g}")
            if maximum is not None and value > maximum:
                raise ValueError(f"must be at most {maximum:g}, not {value:g}")
            return value
        return self._get(key, default, required, conv)

    def list(self, key: builtins.str, required: bool = False) -> builtins.list[yaml.Node]:
        node = self.raw(key)
        if node is None:
            if required:
                self.problems.add(self.node, self._sub(key), "is required")
            return []
        if isinstance(node, yaml.ScalarNode):
            return [node]          # a single item may be written without a list
        if not isinstance(node, yaml.SequenceNode):
            self.problems.add(node, self._sub(key), "must be a list")
            return []
        return list(node.value)

    def sub(self, key: builtins.str) -> MapReader | None:
        node = self.raw(key)
        if node is None:
            return None
        return MapReader(node, self._sub(key), self.problems)

    def done(self) -> None:
        """Report every key that was not read: typos must not pass silently."""
        if self.items.keys() <= self.used:
            return
        for key, (key_node, _) in self.items.items():
            if key not in self.used:
                known = ", ".join(sorted(self.used))
                lowered = {k.lower(): k for k in self.used}      # `Domain` is a typo of `domain` too
                close = difflib.get_close_matches(key.lower(), sorted(lowered), n=1)
                guess = f"; did you mean {lowered[close[0]]!r}?" if close else ""
                self.problems.add(key_node, self._sub(key),
                                  f"unknown key{guess} (known here: {known})")
