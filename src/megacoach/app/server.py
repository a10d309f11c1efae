"""The labeling app: ``create_app(db_url, settings)`` and ``serve(db_url, host, port, settings, server=...)``.

``serve`` runs uvicorn with ``ServerOptions``: N worker processes (``--workers``) on one socket, each
with its own connections to the label store, ``threads`` requests at once per worker, at most
``limit_concurrency`` connections per worker (more get 503). The HTTP limits are the app's settings, the
same whether one process or many serve: the request line and headers within ``header_timeout_s`` (else
408 and the connection is closed, ``httpguard.GuardedH11Protocol``), the body within ``body_timeout_s``
(``middleware.BodyLimit``), an idle keep-alive connection closed after ``keep_alive_timeout_s``, at most
``max_header_bytes`` of request head. Everything the app keeps between requests (log-ins and their CSRF
tokens, API tokens, item locks, the log-in throttle's counts, the Andon cord and its rate limit, the shown
order's key) is in the label store, so any worker can answer any request. ``wait_until_healthy`` waits
for a server just started (in another process) to answer its health check.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.config import Config as UvicornConfig

from megacoach.app import api, web
from megacoach.app.accounts import create_admin  # noqa: F401  (the one create-admin: never promotes anyone)
from megacoach.app.auth import Auth
from megacoach.app.core import HERE, SESSION_COOKIE, build_state, render
from megacoach.app.errors import AppError, NotLoggedIn
from megacoach.app.httpguard import uvicorn_options
from megacoach.app.hosts import host_policy
from megacoach.app.middleware import AllowedHosts, BodyLimit, SameOrigin, SecurityHeaders
from megacoach.app.settings import AppSettings
from megacoach.errors import ConfigError, DataError, StoreError
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
    policy = host_policy(cfg.public_url, cfg.allowed_hosts)
    app.add_middleware(SameOrigin, policy=policy)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(AllowedHosts, policy=policy)  # before everything but the security headers
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


# ----- serving -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerOptions:
    """How ``serve`` runs uvicorn: processes, threads and connection limits (the limits hold per worker
    process). The HTTP timeouts are the app's settings (``AppSettings.header_timeout_s``, ...)."""

    workers: int = 1  # processes answering on the one socket (uvicorn's supervisor restarts a dead one)
    threads: int = 16  # per worker: requests handled at once (the app's handlers are blocking code)
    limit_concurrency: int = 512  # connections (and requests) per worker; beyond it new requests get 503
    backlog: int = 2048  # pending connections the kernel queues for the socket
    graceful_shutdown_s: float = 10.0  # on SIGTERM/SIGINT, requests in flight get this long
    # with --workers N: a worker that does not answer the supervisor's health check within this long (while it
    # starts, or later) is killed and replaced; uvicorn's 5 s killed every worker, forever, on a busy machine
    worker_healthcheck_s: int = 60

    def __post_init__(self) -> None:
        checks = dict(workers=self.workers >= 1, threads=self.threads >= 1,
                      limit_concurrency=self.limit_concurrency >= 1, backlog=self.backlog >= 1,
                      graceful_shutdown_s=self.graceful_shutdown_s >= 0,
                      worker_healthcheck_s=self.worker_healthcheck_s >= 1)
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"server option {bad[0]!r}: {getattr(self, bad[0])!r} is out of range")

    def pool_size(self, settings: AppSettings) -> int:
        """Store connections per worker (and as many again while busy): one for each request thread and
        each password-check thread (``password_hash_concurrency``), and a spare."""
        return self.threads + settings.password_hash_concurrency + 1


class ServedApp:
    """The app as ``serve`` runs it: the worker's thread pool (where the blocking handlers run) has
    ``threads`` threads."""

    def __init__(self, app: Any, threads: int) -> None:
        self.app = app
        self.threads = threads
        self._pool_sized = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not self._pool_sized:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = self.threads
            self._pool_sized = True
        await self.app(scope, receive, send)


def worker_settings(settings: AppSettings, workers: int) -> AppSettings:
    """A worker's settings: the password-check bounds are the whole server's, so each of ``workers``
    processes gets an even share (at least one check at a time): ``--workers`` does not multiply the
    cores a password sprayer can keep busy."""
    if workers <= 1:
        return settings
    return settings.model_copy(update=dict(
        password_hash_concurrency=max(1, settings.password_hash_concurrency // workers),
        password_hash_queue=settings.password_hash_queue // workers))


def uvicorn_kwargs(settings: AppSettings, options: ServerOptions) -> dict[str, Any]:
    """uvicorn's options for the app as ``serve`` runs it: the app's HTTP limits
    (``httpguard.uvicorn_options``: the header deadline, keep-alive timeout and largest request head) and
    the server's connection limits; no proxy headers believed, no server header sent."""
    return dict(limit_concurrency=options.limit_concurrency, backlog=options.backlog,
                timeout_graceful_shutdown=options.graceful_shutdown_s, proxy_headers=False, server_header=False,
                **uvicorn_options(settings))


class ServerConfig(UvicornConfig):
    """uvicorn's config that builds the labeling app in each worker (it is pickled to the workers, so
    it carries the store URL and the settings, not an open store), with ``uvicorn_kwargs``."""

    def __init__(self, db_url: Optional[str], settings: AppSettings, options: ServerOptions, **kwargs: Any) -> None:
        super().__init__("megacoach.app.server:create_app", workers=options.workers,
                         timeout_worker_healthcheck=options.worker_healthcheck_s,
                         **uvicorn_kwargs(settings, options), **kwargs)
        self.db_url = db_url
        self.mc_settings = settings
        self.options = options
        self.store: Optional[LabelStore] = None  # single process: the store serve() opened already

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["store"] = None
        return state

    def load_app(self) -> Any:
        store = self.store or LabelStore(self.db_url, pool_size=self.options.pool_size(self.mc_settings))
        return ServedApp(create_app(settings=self.mc_settings, store=store), self.options.threads)


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    """The listening socket the workers share. Made with protocol IPPROTO_TCP (uvicorn's own has 0):
    asyncio sets TCP_NODELAY only on connections of such a socket, and without it a response written in
    two parts waits for the client's delayed ACK (~40 ms) when a request follows the previous answer."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e}") from None
    sock.set_inheritable(True)
    return sock


def serve(db_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000, settings: SettingsLike = None,
          *, log_level: str = "info", server: Optional[ServerOptions] = None, workers: Optional[int] = None) -> None:
    """Run the labeling app with uvicorn (``server``: workers, threads, timeouts and limits; ``workers``
    overrides ``server.workers``). Prints a one-time admin invitation link when no admin exists.

    With several workers, every worker opens the store itself: SQLite (WAL, writers take turns) or,
    for a team, PostgreSQL (``postgresql+psycopg://...``)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    cfg = _settings(settings)
    opts = server or ServerOptions()
    if workers is not None:
        opts = ServerOptions(**dict(asdict(opts), workers=workers))
    store = LabelStore(db_url, pool_size=opts.pool_size(cfg))
    base = cfg.public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    link = admin_invite_link(store, cfg, base)
    procs = f"{opts.workers} worker processes of {opts.threads} threads" if opts.workers > 1 else \
        f"1 process of {opts.threads} threads"
    print(f"megacoach labeling app for human evaluators: {base}/  (store: {store!r}; {procs})", file=sys.stderr)
    if link:
        print(f"No admin yet. Open this one-time link to create the admin account:\n  {link}", file=sys.stderr)
    if opts.workers == 1:
        app = ServedApp(create_app(settings=cfg, store=store), opts.threads)
        uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_kwargs(cfg, opts))
        return
    store.close()  # each worker opens its own
    config = ServerConfig(store.url, worker_settings(cfg, opts.workers), opts, host=host, port=port,
                          log_level=log_level)
    sock = bind_tcp_socket(host, port)
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d with %d workers", host, port,
                                            opts.workers)
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()


def wait_until_healthy(base_url: str, timeout_s: float = 60.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Wait until the labeling app at ``base_url`` answers ``GET /api/health`` with 200 (a server just
    started, e.g. ``serve`` in the child process ``proc``). RuntimeError, saying which, when ``proc``
    exits first or ``timeout_s`` seconds pass."""
    import httpx

    url = base_url.rstrip("/") + "/api/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the labeling server at {base_url} exited (code {proc.returncode}) before it "
                               "answered /api/health")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the labeling server at {base_url} did not answer /api/health within {timeout_s:g} s")
        time.sleep(0.1)
