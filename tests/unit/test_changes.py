"""Run-time changes: who may change whom, the audit trail, and precedence with the YAML.

These use a real SQLite file in a temporary directory.
"""

from __future__ import annotations

import pytest

from router.errors import Forbidden, InvalidChange, InvalidNumber, NotFound
from router.policy.effective import FIELDS
from router.policy.model import ReceiveMethod
from router.runtime import PolicyState
from router.store.sqlite import SqlitePolicyStore, connect
from router.store.sqlite import _values_digest as _digest

from .conftest import BASE


@pytest.fixture
def store(tmp_path):
    conn = connect(str(tmp_path / "state.db"))
    yield SqlitePolicyStore(conn)
    conn.close()


@pytest.fixture
def state(policy, store):
    return PolicyState(policy, store, now=100.0)


def method_of(state, user):
    return state.view.policy.user(user).receive_method


class TestAuthorization:
    def test_an_admin_may_change_another_users_method(self, state):
        change = state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        assert (change.old, change.new, change.actor, change.via) == ("ip_phone", "app", "lan", "cli")
        assert method_of(state, "minh") is ReceiveMethod.APP

    def test_an_agent_may_change_their_own_method(self, state):
        state.change("minh", "minh", "receive_method", "agent_phone", via="api", now=200.0)
        assert method_of(state, "minh") is ReceiveMethod.AGENT_PHONE

    def test_an_agent_may_not_change_another_user_and_nothing_is_written(self, state, store):
        with pytest.raises(Forbidden, match="minh is an agent and may change only their own"):
            state.change("minh", "lan", "receive_method", "app", via="cli", now=200.0)
        assert store.audit() == []
        assert method_of(state, "lan") is ReceiveMethod.ALL_DEVICES

    def test_a_stranger_may_change_nothing(self, state, store):
        with pytest.raises(Forbidden, match="'mallory' is not a user"):
            state.change("mallory", "minh", "receive_method", "app", via="cli", now=200.0)
        assert store.audit() == []

    def test_users_are_found_by_extension_too(self, state):
        change = state.change("1001", "1002", "receive_method", "app", via="cli", now=200.0)
        assert (change.actor, change.user_id) == ("lan", "minh")

    def test_an_unknown_target_is_not_found(self, state):
        with pytest.raises(NotFound):
            state.change("lan", "ghost", "receive_method", "app", via="cli", now=200.0)

    def test_an_unknown_method_is_refused_listing_the_valid_ones(self, state, store):
        with pytest.raises(InvalidChange, match="use one of all_devices, app, ip_phone, agent_phone"):
            state.change("lan", "minh", "receive_method", "phone", via="cli", now=200.0)
        assert store.audit() == []

    def test_a_phone_in_the_wrong_form_is_refused_with_the_form_to_type(self, state, store):
        with pytest.raises(InvalidNumber, match="write it as 84911111111"):
            state.change("minh", "minh", "agent_phone", "+84 911 111 111", via="cli", now=200.0)
        assert store.audit() == []
        assert state.view.policy.user("minh").agent_phone == "84987654321"

    def test_agent_phone_needs_a_number_first(self, make_policy, store):
        policy = make_policy(base=BASE.replace('    agent_phone: "84987654321"\n', ""))
        state = PolicyState(policy, store, now=100.0)
        with pytest.raises(InvalidChange, match="set one first"):
            state.change("minh", "minh", "receive_method", "agent_phone", via="cli", now=200.0)
        state.change("minh", "minh", "agent_phone", "84911111111", via="cli", now=201.0)
        state.change("minh", "minh", "receive_method", "agent_phone", via="cli", now=202.0)
        assert method_of(state, "minh") is ReceiveMethod.AGENT_PHONE

    def test_every_change_is_audited_with_who_when_old_new_and_through_what(self, state, store):
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        state.change("minh", "minh", "agent_phone", "84911111111", via="api", now=300.0)
        newest, oldest = store.audit("minh")
        assert (oldest.field, oldest.old, oldest.new, oldest.actor, oldest.via, oldest.at) == \
            ("receive_method", "ip_phone", "app", "lan", "cli", 200.0)
        assert (newest.field, newest.old, newest.new, newest.actor, newest.via, newest.at) == \
            ("agent_phone", "84987654321", "84911111111", "minh", "api", 300.0)


class TestPrecedence:
    def test_a_run_time_change_wins_over_an_older_yaml_value(self, state):
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        assert state.view.sources[("minh", "receive_method")].source == "runtime"

    def test_it_survives_a_reload_of_an_unchanged_yaml(self, state, policy):
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        state.reload(policy, now=300.0)
        assert method_of(state, "minh") is ReceiveMethod.APP

    def test_a_later_yaml_edit_of_that_user_wins_over_the_older_run_time_change(self, state, make_policy):
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        edited = make_policy(base=BASE.replace("receive_method: ip_phone", "receive_method: all_devices"))
        state.reload(edited, now=300.0)
        assert method_of(state, "minh") is ReceiveMethod.ALL_DEVICES
        assert state.view.sources[("minh", "receive_method")].source == "yaml"

    def test_a_yaml_edit_of_another_user_does_not_undo_this_users_change(self, state, make_policy):
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        edited = make_policy(base=BASE.replace("receive_method: all_devices", "receive_method: app"))
        state.reload(edited, now=300.0)
        assert method_of(state, "minh") is ReceiveMethod.APP
        assert method_of(state, "lan") is ReceiveMethod.APP

    def test_a_run_time_change_after_the_yaml_edit_wins_again(self, state, make_policy):
        edited = make_policy(base=BASE.replace("receive_method: ip_phone", "receive_method: all_devices"))
        state.reload(edited, now=300.0)
        state.change("minh", "minh", "receive_method", "ip_phone", via="cli", now=400.0)
        assert method_of(state, "minh") is ReceiveMethod.IP_PHONE

    def test_another_process_sees_the_change_without_restart(self, policy, tmp_path, state):
        other = PolicyState(policy, SqlitePolicyStore(connect(str(tmp_path / "state.db"))), now=150.0)
        assert other.refresh() is False
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        assert other.refresh() is True
        assert method_of(other, "minh") is ReceiveMethod.APP


class TestChangesAtScale:
    """A change copies only the user it is about: with 100,000 users, copying every user
    and rebuilding every index on each change stalled the router for seconds."""

    def test_a_change_copies_only_that_user_and_shares_the_others(self, state, policy):
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        changed = state.view.policy
        for before, after in zip(policy.users, changed.users, strict=True):
            assert (after is before) == (before.id != "minh")

    def test_lookups_by_id_extension_and_credential_find_the_changed_user(self, state):
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        policy = state.view.policy
        by_id, by_extension = policy.user("minh"), policy.user("1002")
        assert by_id is by_extension and by_id.receive_method is ReceiveMethod.APP
        device = by_id.devices[0]
        owner, found = policy.device_by_auth(device.auth_username)
        assert owner is by_id and found is device

    def test_an_unchanged_policy_is_the_yaml_policy_itself(self, state, policy):
        assert state.view.policy is policy

    def test_a_refresh_reads_only_the_changes_since_the_last_one(self, policy, tmp_path, state):
        other_store = SqlitePolicyStore(connect(str(tmp_path / "state.db")))
        other = PolicyState(policy, other_store, now=150.0)
        state.change("lan", "minh", "receive_method", "app", via="cli", now=200.0)
        state.change("lan", "lan", "receive_method", "ip_phone", via="cli", now=201.0)
        assert [c.new for c in other_store.changes_after(other.view.marker)] == ["app", "ip_phone"]
        assert other.refresh() is True
        assert other_store.changes_after(other.view.marker) == []
        assert (method_of(other, "minh"), method_of(other, "lan")) == (ReceiveMethod.APP, ReceiveMethod.IP_PHONE)

    def test_sources_answer_for_every_user_and_field_and_refuse_others(self, state, policy):
        sources = state.view.sources
        assert len(sources) == len(policy.users) * 3 == len(list(sources))
        assert sources[("lan", "receive_method")].source == "yaml"
        with pytest.raises(KeyError):
            sources[("1002", "receive_method")]        # an extension is not a user id
        with pytest.raises(KeyError):
            sources[("minh", "devices")]

    def test_a_reload_prepared_on_another_connection_keeps_a_change_made_meanwhile(
            self, state, policy, make_policy, tmp_path):
        from router.runtime import prepare_view
        edited = make_policy(base=BASE.replace('agent_phone: "84912345678"', 'agent_phone: "84911112222"'))
        other = SqlitePolicyStore(connect(str(tmp_path / "state.db")))
        prepared = prepare_view(edited, other, now=300.0)
        assert prepared.view.policy.user("lan").agent_phone == "84911112222"
        state.change("minh", "minh", "receive_method", "app", via="api", now=301.0)   # after it was prepared
        view = state.adopt(prepared)
        assert view.policy.user("lan").agent_phone == "84911112222"
        assert view.policy.user("minh").receive_method is ReceiveMethod.APP


def test_first_seen_times_keep_each_users_own_time_after_compaction():
    from router.policy.effective import SeenAt
    seen = SeenAt()
    for i in range(1000):                          # the whole YAML recorded at the first start
        seen.note(f"u{i}", "receive_method", 100.0)
    seen.note("u7", "receive_method", 300.0)       # u7's method edited in the YAML later
    seen.compact()
    assert seen.get(("u7", "receive_method"), 0.0) == 300.0
    assert seen.get(("u8", "receive_method"), 0.0) == 100.0
    assert seen.get(("u8", "agent_phone"), 0.0) == 0.0      # nothing noted for that field
    assert seen.get(("u8", "no_such_field"), 0.0) == 0.0
    seen.note("u9", "receive_method", 400.0)       # noted after compaction: its own time
    assert seen.get(("u9", "receive_method"), 0.0) == 400.0


def test_the_lookups_are_built_at_start_not_by_the_first_register(policy, store):
    state = PolicyState(policy, store, now=100.0)
    built = state.view.policy.__dict__            # cached_property keeps what it built here
    assert "_users_by_key" in built and "_devices_by_auth" in built


class TestObservingAnUnchangedYaml:
    """A start or reload of an unchanged YAML reads the first-seen times from the table
    instead of comparing every user's values in Python (0.6 s per process at 100,000
    users); any difference, or a row written by someone else, falls back to comparing."""

    def all_times(self, seen, policy):
        return {(u.id, f): seen.get((u.id, f), -1.0) for u in policy.users for f in FIELDS}

    def compared(self, store, policy, now, monkeypatch):
        """What comparing row by row says (the shortcut turned off)."""
        with monkeypatch.context() as patched:
            patched.setattr(store, "_unchanged", lambda *_: None)
            return store.observe_yaml(policy, now)

    def test_an_unchanged_yaml_gives_the_times_recorded_without_comparing(self, store, make_policy, monkeypatch):
        first = make_policy()
        store.observe_yaml(first, 100.0)
        edited = make_policy(base=BASE.replace("receive_method: ip_phone", "receive_method: app"))
        store.observe_yaml(edited, 200.0)                          # minh's method: first seen at 200
        assert store._unchanged(edited, {f: _digest(edited, f) for f in FIELDS}) is not None
        shortcut = store.observe_yaml(edited, 300.0)
        assert self.all_times(shortcut, edited) == self.all_times(self.compared(store, edited, 400.0,
                                                                                monkeypatch), edited)
        assert shortcut.get(("minh", "receive_method"), 0.0) == 200.0
        assert shortcut.get(("lan", "receive_method"), 0.0) == 100.0

    @pytest.mark.parametrize("edit", ["remove_a_user", "add_a_user", "remove_then_add_back"])
    def test_users_removed_or_added_get_the_times_comparing_gives(self, store, make_policy, monkeypatch, edit):
        full = make_policy()
        without = make_policy(base=BASE[:BASE.index("  - id: minh")])
        first, then = {"remove_a_user": (full, without), "add_a_user": (without, full),
                       "remove_then_add_back": (full, without)}[edit]
        store.observe_yaml(first, 100.0)
        store.observe_yaml(then, 200.0)
        if edit == "remove_then_add_back":
            store.observe_yaml(full, 300.0)
            then = full
        shortcut = store.observe_yaml(then, 400.0)
        assert self.all_times(shortcut, then) == self.all_times(self.compared(store, then, 500.0, monkeypatch),
                                                                 then)

    def test_a_value_written_by_another_process_while_comparing_is_noticed(self, store, make_policy, tmp_path,
                                                                         monkeypatch):
        from router.policy.effective import SeenAt
        mine = make_policy(base=BASE.replace("receive_method: all_devices", "receive_method: app"))
        theirs = make_policy(base=BASE.replace("receive_method: ip_phone", "receive_method: app"))
        store.observe_yaml(make_policy(), 100.0)
        other = SqlitePolicyStore(connect(str(tmp_path / "state.db")))
        real_compact = SeenAt.compact
        writes = [lambda: other.observe_yaml(theirs, 150.0)]  # between this process's read and its write

        def compact_after_their_write(seen):
            while writes:
                writes.pop()()
            real_compact(seen)
        with monkeypatch.context() as patched:
            patched.setattr(SeenAt, "compact", compact_after_their_write)
            store.observe_yaml(mine, 200.0)
        other.conn.close()
        again = store.observe_yaml(mine, 300.0)      # minh's row says app (theirs), the YAML ip_phone
        assert again.get(("minh", "receive_method"), 0.0) == 300.0
        assert self.all_times(again, mine) == self.all_times(self.compared(store, mine, 300.0, monkeypatch), mine)

    def test_an_edited_value_is_first_seen_now(self, store, make_policy):
        store.observe_yaml(make_policy(), 100.0)
        edited = make_policy(base=BASE.replace("receive_method: ip_phone", "receive_method: app"))
        seen = store.observe_yaml(edited, 200.0)
        assert seen.get(("minh", "receive_method"), 0.0) == 200.0
        assert seen.get(("lan", "receive_method"), 0.0) == 100.0

    def test_a_row_written_behind_its_back_is_noticed(self, store, make_policy):
        policy = make_policy()
        store.observe_yaml(policy, 100.0)
        store.conn.execute("UPDATE yaml_values SET value = 'app', seen_at = 150.0 "
                           "WHERE user_id = 'minh' AND field = 'receive_method'")
        store.conn.commit()
        seen = store.observe_yaml(policy, 200.0)     # minh's YAML value differs from the row: seen now
        assert seen.get(("minh", "receive_method"), 0.0) == 200.0

