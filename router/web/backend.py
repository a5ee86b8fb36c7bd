"""The web app's one handle on the router's state: policy, sessions, logins, changes.

It opens the same YAML and state database as the router and the CLI, and makes every
change through ``PolicyState.change`` (authorization, value checks, audit) with
``via="api"``.  Before each request it picks up what others wrote: run-time changes
through the database's change marker, and an edited YAML file (checked at most once a
second; a file with errors is logged and the last good policy stays, as in the
router).  One lock serializes the database work; password hashing runs outside it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from router import log
from router.config_child import load_policy_apart
from router.errors import ConfigError, InvalidChange, RouterError
from router.policy import authz
from router.policy.effective import Change
from router.policy.model import Binding, Policy, ReceiveMethod, Role, User
from router.records import CallRecord
from router.runtime import PolicyState
from router.store.sqlite import SqliteBindingStore, SqliteCallStore, SqlitePolicyStore, connect
from router.web.passwords import WeakPassword, hash_password, verify_password
from router.web.problems import FieldRefused
from router.web.sessions import NewSession, Session, SqliteSessionStore, credential_of
from router.web.throttle import LoginThrottle

VIA = "api"
YAML_CHECK_INTERVAL = 1.0      # seconds between looks at the YAML file's modification time
AUDIT_SCAN = 2000              # newest changes searched when the audit is filtered by via or actor

_log = log.get("sip-router.web")


class LoginFailed(RouterError):
    """Wrong user or password: the same answer for both, so names cannot be probed."""

    def __init__(self) -> None:
        super().__init__("wrong user or password")


@dataclass(frozen=True)
class Identity:
    """Who is asking: a logged-in user and the session that proves it."""

    user: User
    session: Session

    @property
    def user_id(self) -> str:
        return self.user.id

    @property
    def is_admin(self) -> bool:
        return self.user.role is Role.ADMIN


class Backend:
    def __init__(self, config_path: str, now: float | None = None, policy: Policy | None = None) -> None:
        now = time.time() if now is None else now
        self.config_path = config_path
        policy = load_policy_apart(config_path) if policy is None else policy
        self._yaml_mtime = _mtime(config_path)
        self._yaml_checked = now
        self.conn = connect(policy.database)
        self.state = PolicyState(policy, SqlitePolicyStore(self.conn), now)
        self.bindings = SqliteBindingStore(self.conn)
        self.calls = SqliteCallStore(self.conn)
        self.sessions = SqliteSessionStore(self.conn)
        self.sessions.purge_expired(now)
        web = policy.web
        self.throttle = LoginThrottle(web.max_login_failures, web.address_failures_per_minute)
        # Verified when the name is unknown or has no password, so every refusal costs the same time.
        self._decoy = hash_password(secrets.token_urlsafe(16))
        self.lock = threading.RLock()

    @property
    def policy(self) -> Policy:
        return self.state.view.policy

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ picking up others' writes
    def refresh(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.lock:
            if now - self._yaml_checked >= YAML_CHECK_INTERVAL:
                self._yaml_checked = now
                mtime = _mtime(self.config_path)
                if mtime != self._yaml_mtime:
                    self._yaml_mtime = mtime
                    self._reload(now)
            self.state.refresh()

    def _reload(self, now: float) -> None:
        try:
            policy = load_policy_apart(self.config_path)
        except ConfigError as exc:
            _log.error("web.reload.refused", file=self.config_path, problems=exc.problems,
                       keeping="the last good policy")
            return
        self.state.reload(policy, now)
        _log.info("web.reload.ok", file=self.config_path, users=len(policy.users))

    # ------------------------------------------------------------------ reading
    def live_bindings(self, now: float) -> list[Binding]:
        with self.lock:
            return self.bindings.load(now)

    def recent_calls(self, user_id: str | None, limit: int) -> list[CallRecord]:
        with self.lock:
            return self.calls.recent(user_id, limit)

    def audit(self, user: str | None, limit: int, via: str | None = None, actor: str | None = None) -> list[Change]:
        """Run-time changes, newest first; ``user`` by id or extension (a user no longer in
        the YAML by the id their history was written with)."""
        user_id = None
        if user:
            found = self.policy.user(user)
            user_id = found.id if found else user
        scan = AUDIT_SCAN if via or actor else limit
        with self.lock:
            changes = self.state.store.audit(user_id, scan)
        return [c for c in changes if (not via or c.via == via) and (not actor or c.actor == actor)][:limit]

    def latest_changes(self) -> dict[tuple[str, str], Change]:
        with self.lock:
            return self.state.store.latest_changes()

    # ------------------------------------------------------------------ logging in and out
    def login(self, user_key: str, password: str, address: str, kind: str, now: float) -> tuple[User, NewSession]:
        """Check the password against the effective hash and open a session; raise
        ``Throttled`` when this name or address must wait, ``LoginFailed`` otherwise."""
        with self.lock:
            self.refresh(now)
            user = self.policy.user(user_key.strip())
        throttle_key = user.id if user is not None else user_key.strip()
        self.throttle.check(throttle_key, address, now)
        stored = user.password_hash if user is not None else None
        good = verify_password(stored or self._decoy, password) and stored is not None
        if not good or user is None:
            self.throttle.failed(throttle_key, address, now)
            # the name as typed is logged only when it is a user: people type passwords into name fields
            _log.warning("web.login.failed", user=user.id if user else None, address=address)
            raise LoginFailed()
        self.throttle.succeeded(throttle_key, address)
        with self.lock:
            self.sessions.purge_expired(now)
            session = self.sessions.create(user.id, kind, credential_of(stored), now,
                                           self.policy.web.session_lifetime)
        _log.info("web.login.ok", user=user.id, kind=kind, address=address)
        return user, session

    def identify(self, token: str, kind: str, now: float) -> Identity | None:
        """The user a session token belongs to, or None: unknown, expired, the user is gone,
        or their password changed since the login."""
        with self.lock:
            self.refresh(now)
            session = self.sessions.find(token, kind, now)
            if session is None:
                return None
            user = self.policy.user(session.user_id)
            if user is None or user.id != session.user_id or credential_of(user.password_hash) != session.credential:
                self.sessions.delete(session.token_hash)
                return None
            return Identity(user, session)

    def logout(self, identity: Identity) -> None:
        with self.lock:
            self.sessions.delete(identity.session.token_hash)
        _log.info("web.logout", user=identity.user_id, kind=identity.session.kind)

    # ------------------------------------------------------------------ changes
    def set_receive_method(self, actor: Identity, user_key: str, method: str | None, agent_phone: str | None,
                           now: float) -> list[Change]:
        """Set the agent phone (when given) and then the method, as ``actor``.

        Everything is checked, with the same authz rules ``change`` applies, before
        anything is written, so a bad number or a forbidden change writes nothing.
        Values equal to the ones in force are not written again.
        """
        phone = (agent_phone or "").strip()
        wanted = (method or "").strip()
        with self.lock:
            self.refresh(now)
            policy = self.policy
            target = authz.find_user(policy, user_key)
            authz.authorize(policy.user(actor.user_id), actor.user_id, target)
            planned: list[tuple[str, str]] = []
            if phone:
                new_phone = _checked("agent_phone", lambda: authz.normalize(policy, target, "agent_phone", phone))
                if new_phone != target.agent_phone:
                    planned.append(("agent_phone", new_phone))
                target = dataclasses.replace(target, agent_phone=new_phone)
            if wanted:
                # choosing agent_phone without a number is a problem of the number field
                field = "agent_phone" if wanted == ReceiveMethod.AGENT_PHONE and target.agent_phone is None \
                    else "method"
                new_method = _checked(field, lambda: authz.normalize(policy, target, "receive_method", wanted))
                if new_method != target.receive_method.value:
                    planned.append(("receive_method", new_method))
            if not phone and not wanted:
                raise FieldRefused("method", InvalidChange("name a receive method, an agent phone, or both"))
            changes = [self.state.change(actor.user_id, target.id, f, v, VIA, now) for f, v in planned]
        for change in changes:
            _log.info("web.change", user=change.user_id, field=change.field, old=change.old, new=change.new,
                      actor=change.actor, via=change.via)
        return changes

    def change_password(self, actor: Identity, current: str, new: str, address: str, now: float) -> Change:
        """The user's own password: the current one first (failures count toward the
        login throttle), then the new one's strength.  Other sessions of the user end."""
        user = actor.user
        self.throttle.check(user.id, address, now)
        if not verify_password(user.password_hash, current):
            self.throttle.failed(user.id, address, now)
            _log.warning("web.password.refused", user=user.id, address=address, why="wrong current password")
            raise FieldRefused("current", InvalidChange("the current password is wrong"))
        try:
            new_hash = hash_password(new)
        except WeakPassword as exc:
            raise FieldRefused("new", InvalidChange(str(exc))) from None
        with self.lock:
            self.refresh(now)
            change = self.state.change(user.id, user.id, "password_hash", new_hash, VIA, now)
            self.sessions.set_credential(actor.session.token_hash, credential_of(new_hash))
            ended = self.sessions.delete_user(user.id, keep=actor.session.token_hash)
        _log.info("web.change", user=user.id, field="password_hash", actor=user.id, via=VIA, other_sessions_ended=ended)
        return change


def _checked(field: str, check: Callable[[], str]) -> str:
    try:
        return check()
    except RouterError as exc:
        raise FieldRefused(field, exc) from None


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None
