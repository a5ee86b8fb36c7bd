"""An edited users list is read again keeping the users whose text has not changed: the
same policy, and the same messages, as reading the whole file; any doubt and the whole
file is read."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from router import config_child, policy_cache
from router.config import compose, parse_policy, policy_from
from router.config_items import Chunks, items_of
from router.config_reuse import Pairing, Previous, _plan, parse_reusing, record
from router.errors import ConfigError

from .test_config_split import HEAD, TAIL, user

CHUNK = 4          # small chunks, so that a list of tens of users has many


def centre(count: int = 40, change: dict[int, str] | None = None, drop: tuple[int, ...] = (),
           add: dict[int, str] | None = None, head: str = HEAD) -> str:
    users = {i: user(i) for i in range(count)}
    users.update(change or {})
    texts = []
    for i in range(count):
        texts.append((add or {}).get(i, ""))
        if i not in drop:
            texts.append(users[i])
    return head + "".join(texts) + TAIL


def kept_from(text: str) -> Previous:
    """What the parse child keeps after a good parse of ``text``."""
    items = items_of(text)
    pairing = Pairing(text, items)
    policy = policy_from(compose(text, "router.yaml"), "router.yaml", users_reader=pairing.read)
    assert pairing.paired
    chunks = Chunks()
    chunks.add(policy.users, CHUNK)
    previous = record(text, items, policy, chunks)
    assert previous is not None
    return previous


def outcome(text: str) -> tuple[str, object]:
    try:
        return "ok", parse_policy(text, "router.yaml")
    except ConfigError as exc:
        return "error", exc.problems


def reused(text: str, previous: Previous) -> tuple[str, object] | None:
    try:
        found = parse_reusing(text, "router.yaml", previous, CHUNK)
    except ConfigError as exc:
        return "error", exc.problems
    if found is None:
        return None
    policy, chunks, keep = found
    users = tuple(u for chunk in chunks.pickled for u in pickle.loads(chunk))
    assert users == policy.users, "the chunks handed on are the policy's users, in order"
    assert chunks.sizes == [len(pickle.loads(chunk)) for chunk in chunks.pickled]
    items = items_of(text)
    assert items is not None
    assert [t for _, texts in keep.chunks for t in texts] == items.texts(text), "each text kept with its user"
    return "ok", policy


def kept_count(text: str, previous: Previous) -> int:
    items = items_of(text)
    assert items is not None
    return sum(run.count for run in _plan(items.texts(text), previous) if run.kept >= 0)


def test_an_admin_changes_one_agents_method_and_only_that_agents_chunk_is_read_again():
    before = centre()
    after = centre(change={21: "  - {id: u21, receive_method: app, devices: [{id: d21, kind: app, password: x}]}\n"})
    previous = kept_from(before)
    assert kept_count(after, previous) == 40 - CHUNK
    assert reused(after, previous) == outcome(after)
    policy = parse_reusing(after, "router.yaml", previous, CHUNK)[0]   # type: ignore[index]
    assert policy.user("u21").receive_method.value == "app"


def test_users_added_and_removed_anywhere_in_the_list_give_the_policy_read_whole():
    previous = kept_from(centre())
    after = centre(drop=(3, 17), add={0: user(100), 30: user(101) + user(102)})
    assert kept_count(after, previous) >= 40 - 4 * CHUNK
    assert reused(after, previous) == outcome(after)


def test_a_quote_left_open_in_an_edited_user_makes_the_whole_file_read_with_its_own_error():
    previous = kept_from(centre())
    after = centre(change={9: "  - {id: u9, display_name: \"Ann}\n"})
    assert parse_reusing(after, "router.yaml", previous, CHUNK) is None
    assert outcome(after)[0] == "error"


def test_a_quote_left_open_and_closed_by_a_stray_quote_after_the_list_is_not_trusted():
    """The whole file reads one long name, and none of the users after it: the skeleton
    does too, so it holds fewer users than the lines that start one."""
    previous = kept_from(centre())
    after = centre(change={9: '  - id: u9\n    display_name: "Ann\n'}).replace(TAIL, 'closed: here"\n')
    assert parse_reusing(after, "router.yaml", previous, CHUNK) is None
    whole = parse_policy(after, "router.yaml")
    assert len(whole.users) == 10 and whole.user("u9").display_name.startswith("Ann")


def test_a_new_user_repeating_a_kept_users_id_is_reported_at_its_line_as_read_whole():
    previous = kept_from(centre())
    after = centre(add={25: "  - {id: u4, devices: []}\n"})
    result = reused(after, previous)
    assert result == outcome(after)
    assert result[0] == "error" and "user id or extension 'u4' is already used by users[4]" in str(result[1])


def test_a_removed_queue_is_reported_at_the_kept_users_that_name_it_with_their_lines():
    previous = kept_from(centre())
    after = centre(head=HEAD.replace('  - {id: q1, hotline: "12025550100"}\n', "  - {id: q2}\n"))
    result = reused(after, previous)
    assert result is not None and result[0] == "error"
    assert result == outcome(after)        # every place: block-style users start on their `- id:` line


def test_a_changed_country_reads_every_user_again():
    previous = kept_from(centre())
    after = centre(head=HEAD.replace("country: us", "country: ca"))
    assert parse_reusing(after, "router.yaml", previous, CHUNK) is None


def test_a_file_whose_list_changed_shape_is_read_whole():
    previous = kept_from(centre())
    assert parse_reusing(centre().replace("users:\n", "users: &all\n"), "router.yaml", previous, CHUNK) is None
    assert parse_reusing(centre(change={i: user(i + 1000) for i in range(40)}), "router.yaml",
                         previous, CHUNK) is None                       # nothing to keep


def test_what_is_kept_after_a_reuse_serves_the_next_edit():
    first = centre()
    second = centre(change={5: user(205)})
    third = centre(change={5: user(205), 33: user(233)}, drop=(12,))
    found = parse_reusing(second, "router.yaml", kept_from(first), CHUNK)
    assert found is not None
    assert kept_count(third, found[2]) >= 40 - 3 * CHUNK
    assert reused(third, found[2]) == outcome(third)


def test_what_was_kept_survives_being_written_and_read_and_nothing_else_passes_for_it():
    previous = kept_from(centre())
    assert Previous.loads(previous.dumps()) == previous
    assert Previous.loads(b"not a pickle") is None
    assert Previous.loads(pickle.dumps(("us", [(b"x", [1])]))) is None


EDITS = st.lists(st.tuples(
    st.sampled_from(["replace", "insert", "drop", "open quote", "duplicate", "comment", "country"]),
    st.integers(min_value=0, max_value=39),
    st.integers(min_value=0, max_value=500)), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EDITS)
def test_any_edit_gives_the_same_policy_or_the_same_messages_as_reading_the_whole_file(edits):
    previous = kept_from(centre())
    change: dict[int, str] = {}
    add: dict[int, str] = {}
    drop: list[int] = []
    head = HEAD
    for kind, at, other in edits:
        if kind == "replace":
            change[at] = user(other)
        elif kind == "insert":
            add[at] = add.get(at, "") + user(1000 + other)
        elif kind == "drop":
            drop.append(at)
        elif kind == "open quote":
            change[at] = f"  - {{id: u{at}, display_name: 'Ann\n"
        elif kind == "duplicate":
            add[at] = add.get(at, "") + user(other % 40)
        elif kind == "comment":
            add[at] = add.get(at, "") + "# a comment at column 0\n\n"
        else:
            head = HEAD.replace("country: us", "country: " + ("ca" if other % 2 else "us"))
    after = centre(change=change, drop=tuple(drop), add=add, head=head)
    result = reused(after, previous)
    event("read whole" if result is None else f"kept users: {result[0]}")
    if result is not None:
        assert result == outcome(after)


def test_the_parse_child_keeps_a_good_parse_and_reads_only_the_edited_users_next(cache, tmp_path, monkeypatch):
    path = str(tmp_path / "router.yaml")
    first = centre(count=3000)
    policy, _, keep = config_child._parse(first, path)
    assert keep is not None and policy == parse_policy(first, path)
    policy_cache.store_items(path, keep.dumps())
    edited = centre(count=3000, change={1500: user(9999)})
    read_anew: list[int] = []
    real = config_child.parse_reusing

    def counting(text, filename, previous, **options):
        found = real(text, filename, previous, **options)
        assert found is not None
        items = items_of(text)
        assert items is not None
        read_anew.append(len(items.starts) - kept_count(text, previous))
        return found
    monkeypatch.setattr(config_child, "parse_reusing", counting)
    again, chunks, _ = config_child._parse(edited, path)
    assert again == parse_policy(edited, path)
    assert read_anew == [1000]             # the one chunk the edit fell in
    assert tuple(u for c in chunks.pickled for u in pickle.loads(c)) == again.users


def test_a_bad_edit_leaves_the_last_good_parse_kept(cache, tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(centre(count=50))
    config_child._child(str(path))           # writes its answer to stdout, keeps the users
    kept = policy_cache.load_items(str(path))
    assert kept is not None
    path.write_text(centre(count=50, change={7: "  - {id: u7, receive_method: desk}\n"}))
    config_child._child(str(path))
    assert policy_cache.load_items(str(path)) == kept
    policy_cache.forget(str(path))
    assert policy_cache.load_items(str(path)) is None


SMALL = "domain: pbx.test\ncountry: us\nusers:\n"


@pytest.mark.parametrize("text", [
    SMALL + '  - id: a\n  - id: b\n    display_name: "foo\nbar"\n',               # a quote closed after the list
    SMALL + '  - id: a\n    display_name: "x\n  - id: fake\nz"\n  - id: c\n',   # a line that looks like a user
])
def test_users_whose_text_runs_on_past_the_list_are_not_kept(cache, tmp_path, text):
    policy, _, keep = config_child._parse(text, str(tmp_path / "router.yaml"))
    assert policy == parse_policy(text, str(tmp_path / "router.yaml"))
    assert keep is None


def test_a_last_user_read_anew_that_runs_on_past_the_list_is_not_kept():
    previous = kept_from(centre())
    after = centre(change={39: '  - id: u39\n    display_name: "Ann\n'}).replace(TAIL, 'Lee"\n')
    assert outcome(after)[0] == "ok"
    assert parse_reusing(after, "router.yaml", previous, CHUNK) is None


@pytest.mark.parametrize("text", [
    SMALL + '  - {id: a, "display_name":&n Ann}\n  - {id: b, "display_name":*n}\n',
    SMALL + '  - {id: a, ?&n display_name: Ann}\n',
])
def test_anchors_written_straight_after_a_colon_or_question_mark_are_seen(text):
    assert items_of(text) is None


def test_a_second_users_key_is_read_whole():
    previous = kept_from(centre())
    after = centre().replace("users:\n", '"users": x\nusers:\n')
    assert parse_reusing(after, "router.yaml", previous, CHUNK) is None


def test_users_kept_that_cannot_be_read_are_dropped_and_the_whole_file_read(cache, tmp_path, monkeypatch):
    path = str(tmp_path / "router.yaml")
    text = centre()
    policy_cache.store_items(path, b"kept")
    spoiled = kept_from(text)
    spoiled = Previous(spoiled.country, ((b"not a pickle", spoiled.chunks[0][1]), *spoiled.chunks[1:]))
    monkeypatch.setattr(config_child, "_previous", lambda _: spoiled)
    policy, _, keep = config_child._parse(text, path)
    assert policy == parse_policy(text, path) and keep is not None
    assert policy_cache.load_items(path) is None       # removed: the child keeps a good one instead
