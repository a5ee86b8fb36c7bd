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


class Problems:
    """Collects ``file:line:column: path: message`` lines (``file:1:`` when no node is known)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._found: list[tuple[int, int, str]] = []

    def add(self, node: yaml.Node | None, path: str, message: str) -> None:
        where = f"{path}: " if path else ""
        if node is None:
            self._found.append((1, 0, f"{self.filename}:1: {where}{message}"))
            return
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        self._found.append((line, column, f"{self.filename}:{line}:{column}: {where}{message}"))

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

    def __init__(self, node: yaml.Node, path: str, problems: Problems) -> None:
        self.node = node
        self.path = path
        self.problems = problems
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.used: set[str] = set()
        if not isinstance(node, yaml.MappingNode):
            problems.add(node, path, "must be a mapping of key: value")
            return
        for key_node, value_node in node.value:
            key = scalar_text(key_node)
            if key is None:
                problems.add(key_node, path, "keys must be plain words")
                continue
            if key in self.items:
                problems.add(key_node, self._sub(key), "duplicate key")
                continue
            self.items[key] = (key_node, value_node)

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
        if key not in self.items and not required:
            self.used.add(key)
            return default
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
        for key, (key_node, _) in self.items.items():
            if key not in self.used:
                known = ", ".join(sorted(self.used))
                lowered = {k.lower(): k for k in self.used}      # `Domain` is a typo of `domain` too
                close = difflib.get_close_matches(key.lower(), sorted(lowered), n=1)
                guess = f"; did you mean {lowered[close[0]]!r}?" if close else ""
                self.problems.add(key_node, self._sub(key),
                                  f"unknown key{guess} (known here: {known})")
