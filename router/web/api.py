"""The JSON API under /api: the same changes as the pages, for softphones and scripts.

Every change goes through ``Backend`` (``PolicyState.change``, ``via="api"``): an admin
may change anyone, an agent only themself (403 otherwise, nothing written); a bad
number or method is 422 with the field and what to type instead.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from router.errors import Forbidden
from router.policy import authz
from router.policy.effective import Change
from router.policy.model import User
from router.web import auth, views
from router.web import schemas as s
from router.web.backend import Backend, Identity
from router.web.sessions import BEARER, COOKIE

PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"model": s.Problem, "description": "no valid session or bearer token"},
    403: {"model": s.Problem, "description": "not allowed (or, for a browser session, no CSRF token)"},
}

router = APIRouter(prefix="/api", responses=PROBLEMS)


def _backend(request: Request) -> Backend:
    return auth.backend_of(request)


def would_ring(backend: Backend, user: User, now: float) -> s.WouldRing:
    preview = views.preview(backend.policy, user, backend.live_bindings(now), now)
    data = dataclasses.asdict(preview)
    data["devices"] = [{"id": d.device_id, "kind": d.kind.value, "registered": d.registered, "rings": d.rings,
                        "why_not": d.why_not} for d in preview.devices]
    data["method"] = preview.method.value if preview.method else None
    data["notes"] = list(preview.notes)
    return s.WouldRing.model_validate(data)


def _user_row(backend: Backend, user: User, now: float) -> dict[str, Any]:
    last = views.last_changes(backend.latest_changes()).get(user.id)
    return views.user_row(backend.policy, backend.state.view.sources, user, backend.live_bindings(now), last)


def _visible(identity: Identity, backend: Backend, user_key: str) -> User:
    """The user ``user_key`` names, if ``identity`` may see them: an admin anyone, an agent themself."""
    if not identity.is_admin and user_key not in (identity.user_id, identity.user.extension):
        # the same answer for every other name, known or not: an agent cannot list who exists
        raise Forbidden(f"{identity.user_id} is an agent and may see only their own settings")
    return authz.find_user(backend.policy, user_key)


def _method_out(backend: Backend, user_id: str, changes: list[Change], now: float) -> s.ReceiveMethodOut:
    user = backend.policy.user(user_id)
    assert user is not None
    row = _user_row(backend, user, now)
    return s.ReceiveMethodOut(
        user=user.id, receive_method=row["receive_method"], receive_method_source=row["receive_method_source"],
        agent_phone=row["agent_phone"], agent_phone_source=row["agent_phone_source"], fallback=row["fallback"],
        changes=[s.Change.model_validate(views.change_row(c)) for c in changes],
        would_ring=would_ring(backend, user, now))


# ------------------------------------------------------------------ login
@router.post("/login", response_model=s.LoginOut, tags=["login"],
             responses={401: {"model": s.Problem, "description": "wrong user or password (the same for both)"},
                        429: {"model": s.Throttle, "description": "too many failed logins; see Retry-After"}})
def login(body: s.LoginIn, request: Request) -> s.LoginOut:
    """Log in with a user id (or extension) and password; get a bearer token."""
    user, new = _backend(request).login(body.user, body.password, auth.client_address(request), BEARER,
                                        time.time())
    return s.LoginOut(token=new.token, expires_at=new.session.expires_at, user=user.id)


@router.post("/logout", status_code=204, tags=["login"])
def logout(request: Request, identity: auth.Changer) -> Response:
    """End this session (the token or cookie stops working)."""
    _backend(request).logout(identity)
    return Response(status_code=204)


# ------------------------------------------------------------------ me
@router.get("/me", response_model=s.Me, tags=["me"])
def me(request: Request, identity: auth.Me) -> s.Me:
    """My settings, my devices and what a call would ring right now."""
    backend, now = _backend(request), time.time()
    row = _user_row(backend, identity.user, now)
    csrf = identity.session.csrf if identity.session.kind == COOKIE else None
    return s.Me.model_validate({**row, "would_ring": would_ring(backend, identity.user, now), "csrf_token": csrf})


@router.put("/me/receive-method", response_model=s.ReceiveMethodOut, tags=["me"],
            responses={422: {"model": s.Problem, "description": "bad number or method; `hint` says what to type"}})
def put_my_method(body: s.ReceiveMethodIn, request: Request,
                  identity: auth.Changer) -> s.ReceiveMethodOut:
    """Change my receive method and/or agent phone (the phone is set first)."""
    return put_method(identity.user_id, body, request, identity)


@router.put("/me/password", response_model=s.PasswordOut, tags=["me"],
            responses={422: {"model": s.Problem, "description": "wrong current password or too short a new one"},
                       429: {"model": s.Throttle, "description": "too many wrong current passwords"}})
def put_my_password(body: s.PasswordIn, request: Request,
                    identity: auth.Changer) -> s.PasswordOut:
    """Change my password: the current one, then the new one.  My other logins end."""
    _backend(request).change_password(identity, body.current, body.new, auth.client_address(request), time.time())
    return s.PasswordOut(changed=True, other_sessions_ended=True)


# ------------------------------------------------------------------ users
@router.get("/users", response_model=list[s.User], tags=["users"])
def users(request: Request, _admin: auth.Admin) -> list[dict[str, Any]]:
    """Everyone (admin only)."""
    backend, now = _backend(request), time.time()
    live = backend.live_bindings(now)
    last = views.last_changes(backend.latest_changes())
    sources = backend.state.view.sources
    return [views.user_row(backend.policy, sources, u, live, last.get(u.id)) for u in backend.policy.users]


@router.get("/users/{user_id}/receive-method", response_model=s.ReceiveMethodOut, tags=["users"])
def get_method(user_id: str, request: Request, identity: auth.Me) -> s.ReceiveMethodOut:
    """A user's receive method, agent phone and fallback (admin, or the user themself)."""
    backend = _backend(request)
    target = _visible(identity, backend, user_id)
    return _method_out(backend, target.id, [], time.time())


@router.put("/users/{user_id}/receive-method", response_model=s.ReceiveMethodOut, tags=["users"],
            responses={404: {"model": s.Problem, "description": "no such user or extension"},
                       422: {"model": s.Problem, "description": "bad number or method; `hint` says what to type"}})
def put_method(user_id: str, body: s.ReceiveMethodIn, request: Request,
               identity: auth.Changer) -> s.ReceiveMethodOut:
    """Change a user's receive method and/or agent phone (admin: anyone; agent: only themself)."""
    backend, now = _backend(request), time.time()
    if not identity.is_admin and user_id not in (identity.user_id, identity.user.extension):
        # before any lookup: the same refusal for every other name, known or not
        raise Forbidden(f"{identity.user_id} is an agent and may change only their own settings; ask an admin")
    changes = backend.set_receive_method(identity, user_id, body.method, body.agent_phone, now)
    target = backend.policy.user(user_id)
    assert target is not None
    return _method_out(backend, target.id, changes, now)


# ------------------------------------------------------------------ what the router sees
@router.get("/registrations", response_model=list[s.Registration], tags=["state"])
def registrations(request: Request, identity: auth.Me, user: str | None = None) -> list[dict[str, Any]]:
    """Devices logged in now (an admin sees everyone's, an agent their own)."""
    backend, now = _backend(request), time.time()
    only = _visible(identity, backend, user).id if user else (None if identity.is_admin else identity.user_id)
    rows = [views.registration_row(b, now) for b in backend.live_bindings(now) if only in (None, b.user_id)]
    return sorted(rows, key=lambda r: (str(r["user"]), str(r["device"]), str(r["contact"])))


@router.get("/calls", response_model=list[s.Call], tags=["state"])
def calls(request: Request, identity: auth.Me, user: str | None = None,
          limit: int = Query(50, ge=1, le=500)) -> list[dict[str, Any]]:
    """Call records, newest first (an admin sees every call, an agent their own)."""
    backend, now = _backend(request), time.time()
    only = _visible(identity, backend, user).id if user else (None if identity.is_admin else identity.user_id)
    return [{**views.call_row(r), "in_progress": views.in_progress(r, now)}
            for r in backend.recent_calls(only, limit)]


@router.get("/audit", response_model=list[s.Change], tags=["state"])
def audit(request: Request, _admin: auth.Admin, user: str | None = None, via: str | None = None,
          actor: str | None = None, limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
    """Run-time changes, newest first (admin only); password changes show as "(set)"."""
    return [views.change_row(c) for c in _backend(request).audit(user, limit, via=via, actor=actor)]
