"""A users list exported one user per line is read without composing it: the same policy,
and the same messages, as reading the whole file; a line the fast reader does not take is
read by libyaml, and any doubt reads the whole file."""

from __future__ import annotations

import os
import signal
from types import FrameType

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from router import config_lines
from router.config import parse_policy
from router.config_items import items_of
from router.config_lines import _BODY, MIN_SPLIT, _loaded, parse_lines, read_lines
from router.errors import ConfigError

from .test_config_split import HEAD, TAIL, user

HA1 = "0123456789abcdef0123456789ABCDEF"


def exported(i: int) -> str:
    """A user as an export writes it: one line, flow style, in several shapes."""
    shapes = (
        f"  - {{id: u{i}, extension: '{10000 + i}', receive_method: ip_phone, devices: "
        f"[{{id: d{i}, kind: ip_phone, username: d{i}, password: pw{i}}}]}}\n",
        f"  - {{id: u{i}, display_name: Nguyễn Văn {i}, receive_method: agent_phone, "
        f"agent_phone: '1201{7000000 + i:07d}', default_queue: q1, devices: [{{id: d{i}, kind: app, ha1: {HA1}}}, "
        f"{{id: w{i}, kind: web, username: 'agent.{i}', password: 'secret word {i}'}}]}}\n",
        f"  - {{id: u{i}, role: admin, display_name: 'Supervisor (night) {i}'}}\n",
    )
    return shapes[i % len(shapes)]


def outcome(text: str) -> tuple[str, object]:
    try:
        return "ok", parse_policy(text, "router.yaml")
    except ConfigError as exc:
        return "error", exc.problems


def fast(text: str) -> tuple[str, object] | None:
    """What the parse child makes of ``text`` with the one-line reader; None: it read the file the usual way."""
    items = items_of(text)
    assert items is not None
    try:
        found = parse_lines(text, "router.yaml", items, min_users=1)
    except ConfigError as exc:
        return "error", exc.problems
    return None if found is None else ("ok", found[0])


def read_here(text: str) -> int:
    items = items_of(text)
    assert items is not None
    previous = read_lines(text, "router.yaml", items)
    return 0 if previous is None else sum(len(texts) for _, texts in previous.chunks)


def test_a_short_list_is_read_the_usual_way() -> None:
    text = HEAD + "".join(exported(i) for i in range(60)) + TAIL
    assert parse_lines(text, "router.yaml") is None
    assert parse_lines(text, "router.yaml", min_users=60) is not None


def test_an_export_of_one_user_per_line_is_read_without_composing_its_users() -> None:
    text = HEAD + "".join(exported(i) for i in range(60)) + TAIL
    assert read_here(text) == 60
    assert fast(text) == outcome(text)
    assert outcome(text)[0] == "ok"


def test_a_long_export_is_read_on_two_cores_with_the_same_result() -> None:
    count = 2 * MIN_SPLIT + 10
    text = HEAD + "".join(exported(i) for i in range(count)) + TAIL
    assert read_here(text) == count
    assert fast(text) == outcome(text)


class Hung(BaseException):
    pass


def test_a_fault_in_one_half_reads_the_file_the_usual_way_without_waiting_on_the_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = HEAD + "".join(exported(i) for i in range(2 * MIN_SPLIT + 10)) + TAIL
    here, real = os.getpid(), config_lines._user

    def failing_here(*args: object) -> object:
        if os.getpid() == here:
            raise MemoryError
        return real(*args)  # type: ignore[arg-type]

    def too_long(_signum: int, _frame: FrameType | None) -> None:
        raise Hung("the half that failed waits on the other")      # not an Exception: nothing catches it

    monkeypatch.setattr(config_lines, "_user", failing_here)
    before = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(30)
    try:
        assert parse_lines(text, "router.yaml") is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("body", ["{id: u1, display_name: '\ud800'}", "{id: u1, display_name: '\ufeffx'}",
                                  "{id: u1, display_name: 'a\u2028b'}", "{id: u1, display_name: 'a\x85b'}",
                                  "{id: u1, display_name: 'a\tb'}"])
def test_a_character_yaml_refuses_or_reads_as_a_line_break_is_not_in_the_grammar(body: str) -> None:
    assert _BODY.fullmatch(body) is None


ODD_LINES = {
    "a block-style user": "  - id: x1\n    devices: [{id: x1d, kind: app, password: p}]\n",
    "a comment after the line": "  - {id: x2, devices: [{id: x2d, kind: app, password: p}]}  # night shift\n",
    "a key the fast reader leaves to YAML":
        "  - {id: x3, fallback: [app], devices: [{id: x3d, kind: app, password: p}]}\n",
    "null": "  - {id: x4, extension: null}\n",
    "a quoted comma": "  - {id: x5, display_name: 'Sales, Team'}\n",
    "double quotes": '  - {id: x6, display_name: "Team"}\n',
    "no space after a colon": "  - {id: x7, display_name:Team}\n",
    "two spaces in a name": "  - {id: x8, display_name: Night  Team}\n",
    "a key twice": "  - {id: x9, extension: '1', extension: '2'}\n",
    "a device key twice": "  - {id: x10, devices: [{id: x10d, kind: app, password: p, password: q}]}\n",
    "a device without a password": "  - {id: x11, devices: [{id: x11d, kind: app}]}\n",
    "an unknown method": "  - {id: x12, receive_method: fax}\n",
    "an invalid agent phone": "  - {id: x13, receive_method: agent_phone, agent_phone: '12'}\n",
    "an id unsafe in a URI": "  - {id: 'x 14'}\n",
    "an empty list": "  - {id: x15, devices: []}\n",
    "an escaped quote": "  - {id: x16, display_name: 'it''s me'}\n",
    "a quoted null": "  - {id: x17, default_queue: 'null'}\n",
    "a password and an ha1": f"  - {{id: x18, devices: [{{id: x18d, kind: app, password: p, ha1: {HA1}}}]}}\n",
    "an ha1 too short": "  - {id: x19, devices: [{id: x19d, kind: app, ha1: abc}]}\n",
    "a flow mapping over two lines": "  - {id: x20,\n     display_name: Two Lines}\n",
    "a duplicate user": "  - {id: u1}\n",
}
# Read fast all the same: the line is fine, the problem is across users (checked on all of them).
READ_FAST = {"a duplicate user"}


@pytest.mark.parametrize("name", sorted(ODD_LINES))
def test_a_line_the_fast_reader_declines_is_read_by_yaml_with_the_same_result(name: str) -> None:
    users = [exported(i) for i in range(30)]
    users.insert(11, ODD_LINES[name])
    text = HEAD + "".join(users) + TAIL
    assert read_here(text) == 30 + (name in READ_FAST)      # every other user read fast
    assert fast(text) == outcome(text)


# --------------------------------------------------------------------------- the JSON reading

_WORD = st.from_regex(r"\w[\w.@+\-]{0,5}", fullmatch=True)
_PLAIN = st.lists(_WORD, min_size=1, max_size=3).map(" ".join)
_QUOTED = st.text(st.characters(blacklist_characters="'\"\\,:{}[]\ufeff\ufffe\uffff\u2028\u2029",
                                blacklist_categories=("Cc", "Cs")), min_size=1, max_size=8).map(lambda t: f"'{t}'")
_SCALAR = st.one_of(_PLAIN, _QUOTED)
_SCALARS = st.lists(_SCALAR, min_size=1, max_size=3).map(lambda xs: f"[{', '.join(xs)}]")


def _mapping(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.lists(st.tuples(_SCALAR, values), min_size=1, max_size=4)
    return pairs.map(lambda ps: "{" + ", ".join(f"{k}: {v}" for k, v in ps) + "}")


_INNER = _mapping(st.one_of(_SCALAR, _SCALARS))
_BODIES = _mapping(st.one_of(_SCALAR, _SCALARS, st.lists(_INNER, min_size=1, max_size=2).map(
    lambda xs: f"[{', '.join(xs)}]")))


def _plain(node: yaml.Node) -> tuple[object, int]:
    """A composed node as values (every scalar its text), and how many keys it holds."""
    if isinstance(node, yaml.ScalarNode):
        return node.value, 0
    if isinstance(node, yaml.SequenceNode):
        items = [_plain(child) for child in node.value]
        return [value for value, _ in items], sum(keys for _, keys in items)
    out: dict[str, object] = {}
    keys = 0
    for key, value in node.value:
        read, inner = _plain(value)
        out[key.value] = read
        keys += 1 + inner
    return out, keys


@settings(max_examples=300, deadline=None)
@given(_BODIES)
def test_json_reads_each_line_of_the_grammar_as_yaml_composes_it(body: str) -> None:
    assert _BODY.fullmatch(body)
    expected = _plain(yaml.compose(body, Loader=yaml.CSafeLoader))
    assert _loaded([body]) == [expected]


# --------------------------------------------------------------------------- any line at all

_KEYS = ("id", "display_name", "extension", "receive_method", "role", "agent_phone", "default_queue",
         "devices", "fallback", "nickname")
_VALUES = ("u1", "'u2'", "x{i}", "null", "~", '"dq"', "'a, b'", "Nguyễn Văn A", "''", "ip_phone", "app",
           "agent_phone", "admin", "fax", "'12017000001'", "'999'", "[app]", "a:b", "Night  Team", "yes",
           "'it''s'", "[{id: d{i}, kind: ip_phone, password: p{i}}]", "[{id: d{i}, kind: app}]",
           f"[{{id: d{{i}}, kind: app, ha1: {HA1}}}]", "[{id: d{i}, kind: web, password: a, password: b}]", "[]")


@st.composite
def _odd_line(draw: st.DrawFn, i: int) -> str:
    pairs = draw(st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)), min_size=1, max_size=4))
    colon = draw(st.sampled_from((": ", ": ", ":")))
    comma = draw(st.sampled_from((", ", ", ", ",")))
    return "  - {" + comma.join(f"{k}{colon}{v.replace('{i}', str(i))}" for k, v in pairs) + "}\n"


# Valid values, written in any of the ways YAML allows (some of which the fast reader leaves to YAML).
_GOOD = {
    "display_name": ("Night Team", "'Đêm 1'", '"Quoted Name"', "Nguyễn Văn A", "'Sales, Team'", "'it''s me'"),
    "extension": ("'5{i:04d}'", "5{i:04d}", '"5{i:04d}"'),
    "receive_method": ("ip_phone", "app", "'all_devices'", "agent_phone"),
    "role": ("agent", "admin", "'agent'"),
    "devices": ("[{id: g{i}, kind: app, password: p{i}}]", "[ {id: g{i}, kind: web, password: 'p {i}'} ]",
                f"[{{id: g{{i}}, kind: ip_phone, ha1: {HA1}}}, {{id: h{{i}}, kind: app, password: q}}]",
                '[{"id": g{i}, kind: app, password: p}]'),
    "fallback": ("[app]",),
}


@st.composite
def _valid_line(draw: st.DrawFn, i: int) -> str:
    keys = draw(st.lists(st.sampled_from(sorted(_GOOD)), unique=True, max_size=4))
    pairs = [("id", f"v{i}")] + [(k, draw(st.sampled_from(_GOOD[k])).replace("{i}", str(i))
                                 .replace("{i:04d}", f"{i:04d}")) for k in keys]
    if ("receive_method", "agent_phone") in pairs:
        pairs.append(("agent_phone", f"'1201{7000000 + i:07d}'"))
    comma = draw(st.sampled_from((", ", ", ", ", ", ",")))
    return "  - {" + comma.join(f"{k}: {v}" for k, v in draw(st.permutations(pairs))) + "}\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_users_list_reads_as_the_whole_file_or_the_usual_way(data: st.DataObject) -> None:
    users = [exported(i) for i in range(40)]
    for k in range(data.draw(st.integers(1, 6))):
        line = data.draw(st.one_of(_odd_line(100 + k), _valid_line(100 + k), st.just(user(100 + k))))
        users.insert(data.draw(st.integers(0, len(users))), line)
    text = HEAD + "".join(users) + TAIL
    found = fast(text)
    event("read the usual way" if found is None else f"fast: {found[0]}")
    if found is not None:
        assert found == outcome(text)
