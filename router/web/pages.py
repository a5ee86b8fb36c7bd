"""The server-rendered pages: login, "How calls reach me", password, and the admins'
staff, change log and calls pages.

Forms post back and redirect (POST-redirect-GET) with the result in the query, so a
reload never repeats a change; a refused value re-renders the form with the message
next to its field and nothing written.
"""

from __future__ import annotations

import hmac
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from router.errors import InvalidNumber, RouterError
from router.policy import authz
from router.policy.model import ReceiveMethod, User
from router.web import auth, i18n, views
from router.web.backend import Identity, LoginFailed
from router.web.passwords import MIN_PASSWORD_LENGTH
from router.web.problems import FieldRefused
from router.web.sessions import COOKIE
from router.web.throttle import Throttled

TEMPLATES = Path(__file__).resolve().parent / "templates"
LOGIN_CSRF_COOKIE = "login_csrf"
LANG_COOKIE_AGE = 365 * 24 * 3600
HOME = "/me"

templates = Jinja2Templates(directory=str(TEMPLATES))
templates.env.filters["when"] = lambda at: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"
templates.env.filters["secs"] = lambda s: "-" if s is None else f"{s:.1f}" if s < 10 else f"{s:.0f}"

router = APIRouter(include_in_schema=False)


def translator(request: Request) -> i18n.Translator:
    return i18n.Translator(i18n.choose(request.cookies.get(i18n.COOKIE), request.headers.get("accept-language")))


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    me = auth.current(request)
    t = translator(request)
    base = {"t": t, "lang": t.lang, "me": me, "path": request.url.path,
            "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            "csrf": me.session.csrf if me is not None and me.session.kind == COOKIE else ""}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


def error_page(request: Request, status: int, title_key: str, text: str) -> HTMLResponse:
    return render(request, "error.html", status, title_key=title_key, text=text)


def safe_next(target: str | None) -> str:
    """Only a path on this site: never another host (//evil, /\\evil, https://...)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return HOME
    return target


def _redirect(target: str) -> RedirectResponse:
    return RedirectResponse(target, status_code=303)


# ------------------------------------------------------------------ language, login, logout
@router.get("/")
def home(request: Request) -> Response:
    return _redirect(HOME if auth.current(request) else "/login")


@router.get("/lang/{code}")
def switch_language(request: Request, code: str, next: str = HOME) -> Response:
    response = _redirect(safe_next(next))
    if code in i18n.LANGUAGES:
        response.set_cookie(i18n.COOKIE, code, max_age=LANG_COOKIE_AGE, samesite="strict",
                            secure=request.app.state.tls, path="/")
    return response


def _login_page(request: Request, status: int = 200, error: str | None = None, user: str = "",
                next: str = HOME) -> HTMLResponse:
    # A token in the form and in a cookie (double submit): another site cannot log a
    # browser in to an account of its choosing.
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    response = render(request, "login.html", status, error=error, user=user, next=safe_next(next),
                      login_csrf=token)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                        secure=request.app.state.tls, path="/login")
    return response


@router.get("/login")
def login_form(request: Request, next: str = HOME) -> Response:
    if auth.current(request) is not None:
        return _redirect(safe_next(next))
    return _login_page(request, next=next)


@router.post("/login")
def login_submit(request: Request, user: str = Form(""), password: str = Form(""), csrf: str = Form(""),
                 next: str = Form(HOME)) -> Response:
    t = translator(request)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not hmac.compare_digest(csrf.encode(), expected.encode()):
        return _login_page(request, 400, t("login_expired"), user, next)
    backend = auth.backend_of(request)
    try:
        _, new = backend.login(user, password, auth.client_address(request), COOKIE, time.time())
    except Throttled as exc:
        refused = _login_page(request, 429, t("login_throttled", wait=t.wait(exc.retry_after)), user, next)
        refused.headers["Retry-After"] = str(exc.retry_after)
        return refused
    except LoginFailed:
        return _login_page(request, 401, t("login_failed"), user, next)
    response = _redirect(safe_next(next))
    response.set_cookie(auth.cookie_name(request), new.token, max_age=backend.policy.web.session_lifetime,
                        httponly=True, samesite="strict", secure=request.app.state.tls, path="/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, identity: auth.Changer) -> Response:
    auth.backend_of(request).logout(identity)
    response = _redirect("/login")
    response.delete_cookie(auth.cookie_name(request), path="/", secure=request.app.state.tls, httponly=True,
                           samesite="strict")
    return response


# ------------------------------------------------------------------ how calls reach me (and an admin's edit)
def _field_message(t: i18n.Translator, refused: FieldRefused) -> str:
    if refused.field == "agent_phone":
        if isinstance(refused.error, InvalidNumber):
            hint = refused.hint
            return t("phone_error_hint", hint=hint) if hint else t("phone_error_nohint")
        return t("phone_needed")
    return t("method_error", error=str(refused.error))


def settings_page(request: Request, subject: User, *, status: int = 200, values: dict[str, str] | None = None,
                  errors: dict[str, str] | None = None) -> HTMLResponse:
    backend, now = auth.backend_of(request), time.time()
    policy = backend.policy
    live = backend.live_bindings(now)
    me = auth.require(request)
    own = subject.id == me.user_id
    saved = request.query_params.get("saved")
    return render(
        request, "settings.html", status,
        subject=subject, own=own, action=HOME if own else f"/staff/{subject.id}",
        nav="me" if own else "staff",
        methods=[m.value for m in ReceiveMethod],
        options={m.value: p for m, p in views.option_previews(policy, subject, live, now).items()},
        preview=views.preview(policy, subject, live, now),
        fallback=[m.value for m in views.fallback_of(policy, subject)],
        source=backend.state.view.sources[(subject.id, "receive_method")].source,
        values=values or {"method": subject.receive_method.value, "agent_phone": subject.agent_phone or ""},
        errors=errors or {}, saved=saved if status == 200 else None)


def _save_settings(request: Request, identity: Identity, subject: User, method: str, agent_phone: str,
                   back: str) -> Response:
    backend = auth.backend_of(request)
    try:
        changes = backend.set_receive_method(identity, subject.id, method, agent_phone, time.time())
    except FieldRefused as refused:
        return settings_page(request, subject, status=refused.status,
                             values={"method": method, "agent_phone": agent_phone},
                             errors={refused.field: _field_message(translator(request), refused)})
    return _redirect(f"{back}?saved={1 if changes else 0}")


@router.get("/me")
def my_settings(request: Request, identity: auth.Me) -> Response:
    return settings_page(request, identity.user)


@router.post("/me")
def save_my_settings(request: Request, identity: auth.Changer, method: str = Form(""),
                     agent_phone: str = Form("")) -> Response:
    return _save_settings(request, identity, identity.user, method, agent_phone, HOME)


def _staff_member(request: Request, user_id: str) -> User:
    return authz.find_user(auth.backend_of(request).policy, user_id)


@router.get("/staff/{user_id}")
def staff_member(request: Request, user_id: str, identity: auth.Me) -> Response:
    if user_id in (identity.user_id, identity.user.extension):
        return _redirect(HOME)
    auth.require_admin(request)          # before the lookup: an agent learns nothing of who exists
    return settings_page(request, _staff_member(request, user_id))


@router.post("/staff/{user_id}")
def save_staff_member(request: Request, identity: auth.Changer, user_id: str, method: str = Form(""),
                      agent_phone: str = Form("")) -> Response:
    if user_id not in (identity.user_id, identity.user.extension):
        auth.require_admin(request)      # before the lookup, as for the page itself
    subject = _staff_member(request, user_id)
    return _save_settings(request, identity, subject, method, agent_phone, f"/staff/{subject.id}")


# ------------------------------------------------------------------ password
@router.get("/password")
def password_form(request: Request, _me: auth.Me) -> Response:
    return render(request, "password.html", nav="password", errors={}, min_length=MIN_PASSWORD_LENGTH,
                  saved=request.query_params.get("saved"))


@router.post("/password")
def password_submit(request: Request, identity: auth.Changer, current: str = Form(""), new: str = Form(""),
                    again: str = Form("")) -> Response:
    t = translator(request)
    errors: dict[str, str] = {}
    status = 422
    if new != again:
        errors["again"] = t("password_mismatch")
    else:
        try:
            auth.backend_of(request).change_password(identity, current, new, auth.client_address(request),
                                                     time.time())
            return _redirect("/password?saved=1")
        except Throttled as exc:
            errors["current"] = t("login_throttled", wait=t.wait(exc.retry_after))
            status = 429
        except FieldRefused as refused:
            errors[refused.field] = t("password_wrong") if refused.field == "current" else \
                t("password_weak", n=MIN_PASSWORD_LENGTH)
    return render(request, "password.html", status, nav="password", errors=errors, min_length=MIN_PASSWORD_LENGTH,
                  saved=None)


# ------------------------------------------------------------------ admin pages
@router.get("/staff")
def staff(request: Request, _admin: auth.Admin, q: str = "", method: str = "", queue: str = "") -> Response:
    backend, now = auth.backend_of(request), time.time()
    policy = backend.policy
    live = backend.live_bindings(now)
    last = views.last_changes(backend.latest_changes())
    sources = backend.state.view.sources
    rows = [views.user_row(policy, sources, u, live, last.get(u.id)) for u in policy.users]
    shown = [r for r in rows if views.matches(r, q, method, queue)]
    return render(request, "staff.html", nav="staff", rows=shown, total=len(rows), q=q, method=method, queue=queue,
                  methods=[m.value for m in ReceiveMethod], queues=[qu.id for qu in policy.queues])


@router.get("/audit")
def audit(request: Request, _admin: auth.Admin, user: str = "", via: str = "", actor: str = "") -> Response:
    backend = auth.backend_of(request)
    rows = [views.change_row(c) for c in backend.audit(user or None, 200, via=via or None, actor=actor or None)]
    return render(request, "audit.html", nav="audit", rows=rows, user=user, via=via, actor=actor,
                  users=[u.id for u in backend.policy.users])


@router.get("/calls")
def calls(request: Request, _admin: auth.Admin) -> Response:
    backend, now = auth.backend_of(request), time.time()
    records = backend.recent_calls(None, 200)
    live = [views.call_row(r) for r in records if views.in_progress(r, now)]
    recent = [views.call_row(r) for r in records[:50]]
    return render(request, "calls.html", nav="calls", live=live, recent=recent, now=now)


def page_error(request: Request, error: RouterError, status: int) -> HTMLResponse:
    key = {403: "forbidden_title", 404: "not_found_title"}.get(status, "error_title")
    text = translator(request)("forbidden_text") if status == 403 else str(error)
    return error_page(request, status, key, text)
