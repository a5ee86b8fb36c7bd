"""The ASGI application: the JSON API, the pages, static files, and how refusals look.

Under /api a refusal is JSON (``{"error", "field", "hint"}``) with its HTTP status;
on a page it is a page saying so, and "not logged in" leads to the login form.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from router import log
from router.errors import RouterError
from router.web import api, pages, softphone
from router.web.auth import CsrfRefused, NotLoggedIn
from router.web.backend import Backend, LoginFailed
from router.web.problems import FieldRefused, http_status
from router.web.throttle import Throttled

STATIC = Path(__file__).resolve().parent / "static"

# Pages and scripts come from this server only.  wss: lets the agent page's softphone
# reach the edge; media for WebRTC needs no further source.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' wss:; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}

DOCS_PAGES = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
MAX_BODY = 64 * 1024

_log = log.get("sip-router.web")


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _problem(status: int, error: str, field: str | None = None, hint: str | None = None,
             headers: dict[str, str] | None = None, **extra: object) -> JSONResponse:
    return JSONResponse({"error": error, "field": field, "hint": hint, **extra}, status_code=status,
                        headers=headers)


def create_app(backend: Backend, tls: bool) -> FastAPI:
    app = FastAPI(title="sip-router web", version="1",
                  description="Agents choose how calls reach them; admins manage everyone's receive method. "
                              "Log in with `POST /api/login` and send the token as `Authorization: Bearer TOKEN`. "
                              "A browser session (cookie) must send its CSRF token as `X-CSRF-Token` on changes.")
    app.state.backend = backend
    app.state.tls = tls
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(softphone.router)     # the agent page as the agent's web device
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    _install_handlers(app)

    @app.middleware("http")
    async def headers_and_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.monotonic()
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY or "chunked" in request.headers.get("transfer-encoding", ""):
            # every form and JSON body here is small: a big one is refused before it is read
            return _problem(413, f"request body larger than {MAX_BODY} bytes (or not sized)")
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            if name == "Content-Security-Policy" and request.url.path in DOCS_PAGES:
                continue        # FastAPI's docs pages load Swagger UI / ReDoc from their CDN
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
            # the path only: no query string, no header, no body (tokens and passwords stay out of logs)
            _log.info("web.request", method=request.method, path=request.url.path, status=response.status_code,
                      ms=round((time.monotonic() - started) * 1000, 1))
        return response

    return app


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, _exc: NotLoggedIn) -> Response:
        if _is_api(request):
            return _problem(401, "not logged in: POST /api/login for a token, then send "
                                 "`Authorization: Bearer TOKEN`", headers={"WWW-Authenticate": "Bearer"})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={pages.safe_next(target)}", status_code=303)

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, _exc: CsrfRefused) -> Response:
        text = ("missing or wrong CSRF token: a browser session must send its token (csrf_token in GET /api/me) "
                "as the X-CSRF-Token header or the csrf form field")
        if _is_api(request):
            return _problem(403, text)
        return pages.error_page(request, 403, "csrf_title", pages.translator(request)("csrf_text"))

    @app.exception_handler(LoginFailed)
    async def login_failed(_request: Request, _exc: LoginFailed) -> Response:
        return _problem(401, "wrong user or password")

    @app.exception_handler(Throttled)
    async def throttled(_request: Request, exc: Throttled) -> Response:
        return _problem(429, f"too many failed logins for this {exc.scope}; try again in {exc.retry_after} s",
                        headers={"Retry-After": str(exc.retry_after)}, retry_after=exc.retry_after)

    @app.exception_handler(FieldRefused)
    async def field_refused(_request: Request, exc: FieldRefused) -> Response:
        return _problem(exc.status, str(exc.error), exc.field, exc.hint)

    @app.exception_handler(RouterError)
    async def router_error(request: Request, exc: RouterError) -> Response:
        status = http_status(exc)
        if status >= 500:
            _log.error("web.error", path=request.url.path, error=str(exc))
        if _is_api(request):
            return _problem(status, str(exc))
        return pages.page_error(request, exc, status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        return _problem(422, str(first.get("msg", "invalid request")), location[-1] if location else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if _is_api(request) or exc.status_code not in (404, 405):
            return _problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return pages.error_page(request, exc.status_code, "not_found_title", "")
