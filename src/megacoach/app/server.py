"""The labeling app: ``create_app(db_url, settings)`` and ``serve(db_url, host, port)``."""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping, Optional, Union
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from megacoach.app import api, web
from megacoach.app.accounts import create_admin  # noqa: F401  (the one create-admin: never promotes anyone)
from megacoach.app.auth import Auth
from megacoach.app.core import HERE, SESSION_COOKIE, build_state, render
from megacoach.app.errors import AppError, NotLoggedIn
from megacoach.app.httpguard import uvicorn_options
from megacoach.app.middleware import BodyLimit, SameOrigin, SecurityHeaders
from megacoach.app.settings import AppSettings
from megacoach.errors import DataError, StoreError
from megacoach.labels.store import LabelStore

log = logging.getLogger("megacoach.app")

SettingsLike = Union[AppSettings, Mapping[str, Any], None]


def _settings(settings: SettingsLike) -> AppSettings:
    if isinstance(settings, AppSettings):
        return settings
    return AppSettings.from_mapping(settings)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/openapi.json"


def _error(request: Request, status: int, message: str, *, login_link: bool = False) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=status)
    heading = {400: "Bad request", 401: "Please log in", 403: "Not allowed", 404: "Not found", 405: "Not allowed",
               409: "Conflict", 410: "Gone", 413: "Too large", 422: "Invalid input", 429: "Slow down",
               503: "Busy"}.get(status, "Error")
    try:
        return render(request, "error.html", dict(title=heading, heading=heading, message=message,
                                                  login_link=login_link), status=status)
    except Exception:  # never let the error page itself fail
        return JSONResponse({"detail": message}, status_code=status)


def _field_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form")]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        if not _wants_json(request) and request.method in ("GET", "HEAD"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            url = "/login?next=" + quote(target, safe="/") + ("&expired=1" if exc.expired else "")
            resp: Response = RedirectResponse(url, status_code=303)
        else:
            resp = _error(request, 401, exc.message, login_link=True)
            if _wants_json(request):
                resp.headers["www-authenticate"] = 'Bearer realm="megacoach"'
        if exc.expired:
            resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> Response:
        return _error(request, exc.status, exc.message)

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> Response:
        return _error(request, 422, str(exc))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> Response:
        log.warning("label store error: %s", exc)
        return _error(request, 503, "the label store is busy or unavailable; try again in a moment")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        message = _field_message(errors)
        if _wants_json(request):
            clean = [dict(loc=list(e.get("loc", ())), msg=e.get("msg"), type=e.get("type")) for e in errors[:20]]
            return JSONResponse({"detail": message, "errors": clean}, status_code=422)
        return _error(request, 422, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no page or API route at {request.url.path}"
        resp = _error(request, exc.status_code, message)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(request, 500, "internal error; it was logged")


def create_app(db_url: Optional[str] = None, settings: SettingsLike = None, *,
               store: Optional[LabelStore] = None) -> FastAPI:
    """The labeling web app (FastAPI) over the label store at ``db_url`` (migrated on open)."""
    cfg = _settings(settings)
    store = store or LabelStore(db_url)
    app = FastAPI(
        title="megacoach labeling API",
        version="1",
        description="Human evaluators compare the Apprentice's continuations; the Values Coach learns from them. "
                    "Authenticate with `Authorization: Bearer <API token>`.",
        docs_url=None,  # Swagger/ReDoc pages load scripts from a CDN; the description is at /openapi.json
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.mc = build_state(store, cfg)
    _install_handlers(app)
    app.include_router(web.router)
    app.include_router(api.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(SameOrigin)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    return app


def admin_invite_link(store: LabelStore, settings: AppSettings, base_url: str, name: str = "admin") -> Optional[str]:
    """A one-time invitation link for the first admin, or None when an admin exists already."""
    auth = Auth(store, settings)
    if auth.admin_exists():
        return None
    candidate, n = name, 1
    while store.get_labeler(candidate) is not None:
        n += 1
        candidate = f"{name}{n}"
    token, info = auth.create_invitation(candidate, "admin", "megacoach label serve")
    store.append_audit("megacoach label serve", "invite", dict(name=info["name"], role="admin",
                                                               invitation_id=info["id"], bootstrap=True))
    return f"{base_url.rstrip('/')}/invite/{token}"


def serve(db_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000, settings: SettingsLike = None,
          *, log_level: str = "info") -> None:
    """Run the labeling app with uvicorn. Prints a one-time admin invitation link when no admin exists."""
    import uvicorn

    cfg = _settings(settings)
    store = LabelStore(db_url)
    base = cfg.public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    link = admin_invite_link(store, cfg, base)
    print(f"megacoach labeling app for human evaluators: {base}/  (store: {store!r})", file=sys.stderr)
    if link:
        print(f"No admin yet. Open this one-time link to create the admin account:\n  {link}", file=sys.stderr)
    app = create_app(settings=cfg, store=store)
    # header deadline, keep-alive timeout and largest request head (AppSettings.header_timeout_s ...)
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False,
                **uvicorn_options(cfg))
