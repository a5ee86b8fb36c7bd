"""Who is asking: the session cookie or the bearer token, and the CSRF check.

A browser holds its session in an HttpOnly, SameSite=Strict cookie (Secure, and named
``__Host-session``, under HTTPS); every request it makes that changes something must
also carry the session's CSRF token, in the ``csrf`` form field or the
``X-CSRF-Token`` header.  An API client sends ``Authorization: Bearer TOKEN``; a
browser never sends that header by itself, so bearer requests need no CSRF token.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from router.errors import Forbidden
from router.web.backend import Backend, Identity
from router.web.sessions import BEARER, COOKIE

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class NotLoggedIn(Exception):
    """No valid session or token came with the request."""


class CsrfRefused(Exception):
    """A cookie-authenticated change came without the session's CSRF token."""


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


def cookie_name(request: Request) -> str:
    # The __Host- prefix makes the browser refuse the cookie unless it is Secure, for
    # path / and set by this host itself: only possible under HTTPS.
    return "__Host-session" if request.app.state.tls else "session"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _identify(request: Request) -> Identity | None:
    backend = backend_of(request)
    now = time.time()
    header = request.headers.get("authorization")
    if header:
        scheme, _, bearer = header.partition(" ")
        if scheme.lower() != "bearer" or not bearer.strip():
            return None
        return backend.identify(bearer.strip(), BEARER, now)
    cookie = request.cookies.get(cookie_name(request))
    if cookie:
        return backend.identify(cookie, COOKIE, now)
    return None


def current(request: Request) -> Identity | None:
    """The identity of ``request`` (looked up once per request), or None."""
    if not hasattr(request.state, "identity"):
        request.state.identity = _identify(request)
    identity: Identity | None = request.state.identity
    return identity


def require(request: Request) -> Identity:
    """A FastAPI dependency: the logged-in user, else ``NotLoggedIn`` (401 or the login page)."""
    identity = current(request)
    if identity is None:
        raise NotLoggedIn()
    return identity


def require_admin(request: Request) -> Identity:
    identity = require(request)
    if not identity.is_admin:
        raise Forbidden(f"{identity.user_id} is an agent; only an admin may see this")
    return identity


async def require_change(request: Request) -> Identity:
    """A FastAPI dependency for requests that change something: the logged-in user, and
    for a cookie session the CSRF token in the header or the form."""
    identity = await run_in_threadpool(require, request)
    if identity.session.kind != COOKIE:
        return identity
    sent: str | None = request.headers.get(CSRF_HEADER)
    if sent is None and request.method not in SAFE_METHODS:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            value = (await request.form()).get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent.encode(), identity.session.csrf.encode()):
        raise CsrfRefused()
    return identity


# Route parameters: ``me: auth.Me`` (logged in), ``me: auth.Changer`` (logged in, CSRF
# checked for a cookie session), ``me: auth.Admin`` (an admin).
Me = Annotated[Identity, Depends(require)]
Changer = Annotated[Identity, Depends(require_change)]
Admin = Annotated[Identity, Depends(require_admin)]
