"""A long users list read on two cores: the same policy, and the same messages, as
reading the whole file in one piece; any doubt about the cut and it is read whole."""

from __future__ import annotations

import pickle

import pytest

from router.config import parse_policy
from router.config_items import CHUNK, Chunks
from router.config_split import MIN_USERS, cut, parse_split
from router.errors import ConfigError

HEAD = """\
# A contact centre with many agents
domain: pbx.test
country: us
trunk: {address: 127.0.0.1}
queues:
  - {id: q1, hotline: "12025550100"}
users:
"""
TAIL = """\
routing: {ring_timeout: 20}
"""


def user(i: int) -> str:
    """Users in several styles: block and flow, with and without agent phones and desk phones."""
    if i % 3 == 0:
        return (f"  - id: u{i}\n    extension: '{10000 + i}'\n    receive_method: agent_phone\n"
                f"    agent_phone: '1201{7000000 + i:07d}'\n    default_queue: q1\n"
                f"    devices:\n      - {{id: d{i}, kind: app, password: pw{i}}}\n")
    if i % 3 == 1:
        return (f"  - {{id: u{i}, display_name: 'Agent {i}', receive_method: ip_phone, "
                f"devices: [{{id: d{i}, kind: ip_phone, username: desk{i}, password: pw{i}}}, "
                f"{{id: e{i}, kind: web, password: w{i}}}]}}\n")
    return f"  # agent {i} works nights\n  - id: u{i}\n    fallback: [app]\n    devices: []\n\n"


def centre(count: int = MIN_USERS + 500, change: dict[int, str] | None = None) -> str:
    users = [user(i) for i in range(count)]
    for i, text in (change or {}).items():
        users[i] = text
    return HEAD + "".join(users) + TAIL


def whole_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "router.yaml")
    return info.value.problems


def test_a_long_users_list_read_on_two_cores_is_the_policy_read_whole():
    text = centre()
    assert cut(text) is not None
    policy = parse_split(text, "router.yaml")
    assert policy is not None
    assert policy == parse_policy(text, "router.yaml")
    assert len(policy.users) == MIN_USERS + 500
    assert policy.user("u4497").agent_phone == "12017004497"      # the second half knew the country: US
    assert policy.routing.default_ring_timeout == 20                # the keys after the list are read


def test_each_half_pickles_its_own_users_for_the_parse_childs_answer():
    text = centre()
    pickled = Chunks()
    policy = parse_split(text, "router.yaml", pickled)
    assert policy is not None
    chunks = [pickle.loads(chunk) for chunk in pickled.pickled]
    assert all(0 < len(chunk) <= CHUNK for chunk in chunks)
    assert pickled.sizes == [len(chunk) for chunk in chunks]
    assert tuple(user for chunk in chunks for user in chunk) == policy.users == parse_policy(text, "router.yaml").users


def test_no_users_are_handed_on_from_a_file_with_mistakes():
    pickled = Chunks()
    with pytest.raises(ConfigError):
        parse_split(centre(change={4200: "  - {id: u4200, receive_method: desk}\n"}), "router.yaml", pickled)
    assert pickled == Chunks()


def test_mistakes_in_both_halves_are_reported_as_for_the_whole_file_with_their_lines():
    middle = (MIN_USERS + 500) // 2
    text = centre(change={
        10: "  - {id: u10, receive_method: desk, devices: []}\n",
        middle + 100: "  - {id: u10, devices: []}\n",                            # a repeat across the cut
        middle + 200: "  - id: u-bad\n    agent_phone: '12'\n    receive_method: agent_phone\n",
        MIN_USERS + 400: "  - {id: late, devices: [{id: d1, kind: app, password: x}]}\n",  # device id again
    })
    with pytest.raises(ConfigError) as info:
        parse_split(text, "router.yaml")
    assert info.value.problems == whole_problems(text)
    found = "\n".join(info.value.problems)
    assert f"users[{middle + 100}]: user id or extension 'u10' is already used by users[10]" in found
    assert "receive_method: 'desk' is not one of" in found
    line = text.split("\n").index("  - id: u-bad") + 1
    assert f"router.yaml:{line + 1}:" in found                     # the bad agent_phone, on its own line


def test_an_anchor_used_across_the_cut_leaves_the_file_to_be_read_whole():
    """An anchor is known only in its own half: a file with anchors is not cut, and
    read whole, the alias is fine."""
    text = centre(change={3: "  - {id: u3, devices: &shared []}\n",
                          MIN_USERS: f"  - {{id: u{MIN_USERS}, devices: *shared}}\n"})
    assert parse_split(text, "router.yaml") is None
    assert parse_policy(text, "router.yaml").user(f"u{MIN_USERS}") is not None


def test_an_anchor_defined_in_both_halves_is_refused_as_in_the_whole_file():
    text = centre(change={3: "  - {id: u3, devices: &same []}\n",
                          MIN_USERS: f"  - {{id: u{MIN_USERS}, devices: &same []}}\n"})
    assert cut(text) is None
    assert "not valid YAML" in whole_problems(text)[0]


def test_a_kept_block_scalar_just_before_the_cut_gets_no_extra_lines():
    middle = (MIN_USERS + 500) // 2
    text = centre(change={middle - 1: f"  - id: u{middle - 1}\n    display_name: |+\n      Night shift\n"})
    policy = parse_split(text, "router.yaml")
    assert policy is not None
    assert policy.user(f"u{middle - 1}").display_name == "Night shift\n"
    assert policy == parse_policy(text, "router.yaml")


def test_a_quote_left_open_before_the_cut_is_not_trusted():
    """A name never closed in the last user before the cut, closed by a stray quote after
    the list: the whole file reads one long name and none of the users after it.  Each
    half on its own is valid and holds the users counted, so only the name running on
    past the cut shows that the halves must not be trusted."""
    count = MIN_USERS + 500
    middle = count // 2
    users = [f"  - {{id: u{i}, devices: []}}\n" for i in range(count)]
    users[middle - 1] = f"  - id: u{middle - 1}\n    display_name: 'Ann\n"
    text = HEAD + "".join(users) + "closed: here'\n"
    assert cut(text) is not None
    assert parse_split(text, "router.yaml") is None
    whole = parse_policy(text, "router.yaml")
    assert len(whole.users) == middle


@pytest.mark.parametrize("text", [
    centre(count=50),                                                   # short: one core is enough
    centre().replace("users:\n", "users: # everyone\n---\n", 1),        # several documents
    HEAD.replace("users:\n", "users: [") + "{id: a}]\n",                # a flow list
    centre().replace("\n", "\r\n"),                                     # CR LF line ends
    centre() + "users:\n  - {id: again}\n",                             # users: twice
    centre(change={7: "  - {id: u7, display_name: \"Ann\u2028\"}\n"}),       # a line break libyaml counts
])
def test_files_of_an_unusual_shape_are_not_cut(text):
    assert cut(text) is None


def test_the_halves_keep_every_line_where_it_was():
    text = centre()
    where = cut(text)
    assert where is not None
    lines, first, second = text.split("\n"), where.first.split("\n"), where.second.split("\n")
    assert len(first) == len(lines)
    assert lines[where.users_line] == "users:" and first[where.users_line] == "users:"
    assert second[where.at - 1] == "users:" and second[where.at] == lines[where.at]
    assert first[where.at] == "#" and first[where.at + 1] == "" and first[-2] == lines[-2]
    assert where.first_count + where.second_count == MIN_USERS + 500
