"""Shared pieces of the web layer: the app state, who is asking, CSRF checks, page rendering."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from megacoach.app import andon as andon_mod
from megacoach.app.adjudication import Adjudication
from megacoach.app.auth import Auth, Principal
from megacoach.app.errors import Forbidden, NotLoggedIn, retry_later
from megacoach.app.labeling import Labeling
from megacoach.app.logredact import install_log_redaction
from megacoach.app.markdown import render_markdown
from megacoach.app.security import new_secret, same_secret
from megacoach.app.settings import AppSettings
from megacoach.app.throttle import StoreRateLimit
from megacoach.labels.assignment import Assigner
from megacoach.labels.store import LabelStore

HERE = Path(__file__).parent
SESSION_COOKIE = "mc_session"
PRE_COOKIE = "mc_pre"  # CSRF token for the forms used before logging in (log-in, invitation)
CSRF_HEADER = "x-csrf-token"
MAX_ID = 2**62


@dataclass
class AppState:
    store: LabelStore
    settings: AppSettings
    auth: Auth
    assigner: Assigner
    labeling: Labeling
    templates: Jinja2Templates
    static_versions: dict[str, str]
    andon_rate: StoreRateLimit  # Andon requests per (client address, person) per minute, in the store
    adjudication: Adjudication


def build_state(store: LabelStore, settings: AppSettings) -> AppState:
    install_log_redaction()  # wherever the app runs, its logs never hold invitation secrets
    assigner = Assigner(lambda: store.session(write=True), overlap=settings.overlap,
                        lock_timeout_s=settings.lock_timeout_s, sources=settings.item_sources,
                        read_session_factory=lambda: store.session(write=False))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    versions = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:10] for p in (HERE / "static").iterdir() if p.is_file()}
    templates.env.globals["static_url"] = lambda name: f"/static/{name}?v={versions.get(name, '0')}"
    templates.env.globals["fmt_s"] = _fmt_s
    templates.env.globals["fmt_pct"] = lambda x: "–" if x is None else f"{x:.1f}%"
    templates.env.globals["fmt_dt"] = lambda t: "–" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")
    return AppState(store, settings, Auth(store, settings), assigner, Labeling(store, settings, assigner),
                    templates, versions, StoreRateLimit(store, "andon", settings.andon_rate_per_min, 60.0),
                    Adjudication(store, settings.overlap))


def _fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "–"
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.1f} h"


def state_of(request: Request) -> AppState:
    return request.app.state.mc


# ----- who is asking ----------------------------------------------------------------------------

def session_principal(request: Request) -> Optional[Principal]:
    """The logged-in person of a page request (cookie), None without a cookie; NotLoggedIn if it ended."""
    if hasattr(request.state, "principal"):
        return request.state.principal
    cookie = request.cookies.get(SESSION_COOKIE)
    principal = state_of(request).auth.resolve_session(cookie) if cookie else None
    request.state.principal = principal
    return principal


def client_address(request: Request) -> str:
    """The client's IP address: the connection's peer, or, when the peer is one of the
    ``trusted_proxies``, the nearest address in X-Forwarded-For that is not a trusted proxy.
    A client's own X-Forwarded-For header is never believed."""
    peer = request.client.host if request.client else "unknown"
    proxies = state_of(request).settings.trusted_proxies
    if peer not in proxies:
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in proxies:
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled header: the proxy itself is what we know
    return peer


def page_user(request: Request) -> Principal:
    """A logged-in person (pages). Anonymous GETs are sent to the log-in page by the error handler."""
    who = session_principal(request)
    if who is None:
        raise NotLoggedIn("log in first")
    return who


def page_admin(request: Request) -> Principal:
    return page_user(request).require("admin")


def page_labeler(request: Request) -> Principal:
    return page_user(request).require("label")


def page_adjudicator(request: Request) -> Principal:
    return page_user(request).require("adjudicate")


def check_csrf(who: Principal, token: Optional[str]) -> None:
    """The form's CSRF token must be this session's (a token from another or an ended session fails)."""
    if not same_secret(who.csrf, token):
        raise Forbidden("CSRF token missing or not valid for this session; reload the page and try again")


def check_pre_csrf(request: Request, token: Optional[str]) -> None:
    if not same_secret(request.cookies.get(PRE_COOKIE), token):
        raise Forbidden("CSRF token missing or not valid; reload the page and try again")


def api_principal(request: Request) -> Principal:
    """An API caller: ``Authorization: Bearer <token>``, or a browser session (writes need the
    session's CSRF token in the X-CSRF-Token header)."""
    if hasattr(request.state, "principal") and request.state.principal is not None:
        return request.state.principal
    st = state_of(request)
    authz = request.headers.get("authorization")
    if authz:
        scheme, _, token = authz.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotLoggedIn("Authorization header: expected 'Bearer <token>'")
        who = st.auth.resolve_token(token.strip())
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            raise NotLoggedIn("not logged in: log in, or send Authorization: Bearer <API token>")
        who = st.auth.resolve_session(cookie)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            check_csrf(who, request.headers.get(CSRF_HEADER))
    request.state.principal = who
    return who


def api_user(request: Request) -> Principal:
    return api_principal(request)


def api_labeler(request: Request) -> Principal:
    return api_principal(request).require("label")


def api_andon(request: Request) -> Principal:
    return api_principal(request).require("andon")


def api_reader(request: Request) -> Principal:
    return api_principal(request).require("read_labels")


def api_adjudicator(request: Request) -> Principal:
    return api_principal(request).require("adjudicate")


def api_admin(request: Request) -> Principal:
    return api_principal(request).require("admin")


def andon_pull(request: Request, who: Principal, reason: str) -> dict:
    """Pull the Andon cord for ``who``: instant for a person's first pull; a repeat counts once
    (andon.pull); beyond ``andon_rate_per_min`` requests a minute from this person at this address
    (counted in the store, so for all server processes together): 429 with Retry-After (the first
    refusal in a minute is audited, once)."""
    st = state_of(request)
    client = client_address(request)
    key = (client, who.id)
    wait = st.andon_rate.hit(key)
    if wait:
        if st.andon_rate.note_refusal(key):
            st.store.append_audit(who.name, "andon_rate_limited", dict(
                client=client, via=who.via, limit_per_min=st.settings.andon_rate_per_min))
        raise retry_later(f"too many Andon cord requests from you; try again in {wait} s", wait)
    return andon_mod.pull(st.store, st.settings, who, reason, client)


# ----- rendering ----------------------------------------------------------------------------------

def banner_for(st: AppState) -> Optional[dict]:
    return andon_mod.banner(andon_mod.state(st.store, st.settings))


def render(request: Request, name: str, context: Optional[dict[str, Any]] = None, status: int = 200,
           who: Optional[Principal] = None, flash: Optional[dict] = None) -> HTMLResponse:
    st = state_of(request)
    if who is None:
        try:
            who = session_principal(request)
        except NotLoggedIn:
            who = None
    ctx: dict[str, Any] = dict(context or {})
    ctx.setdefault("me", who)
    ctx.setdefault("csrf", who.csrf if who else "")
    ctx.setdefault("title", None)
    ctx["flash"] = flash
    try:
        ctx["banner"] = banner_for(st)
    except Exception:  # the banner must never take a page down
        ctx["banner"] = None
    return st.templates.TemplateResponse(request, name, ctx, status_code=status)


def render_pre(request: Request, name: str, context: dict[str, Any], status: int = 200,
               flash: Optional[dict] = None) -> HTMLResponse:
    """A page with a form used before logging in: it gets (and keeps) a pre-session CSRF cookie."""
    token = request.cookies.get(PRE_COOKIE) or new_secret()
    resp = render(request, name, dict(context, csrf=token, me=None), status=status, who=None, flash=flash)
    resp.set_cookie(PRE_COOKIE, token, httponly=True, samesite="lax", secure=state_of(request).settings.secure_cookies,
                    path="/", max_age=24 * 3600)
    return resp


def guideline_view(st: AppState) -> tuple[Optional[Any], Any]:
    g = st.store.latest_guideline()
    return g, (render_markdown(g.markdown) if g else "")


NO_PUBLIC_URL_NOTE = ("No public URL is configured (megacoach label serve --public-url https://...), so this is "
                      "the link's path: put the address people use to reach the app in front of it.")


def invite_link(st: AppState, token: str) -> tuple[str, Optional[str]]:
    """An invitation link and a note for the admin. The base is the configured ``public_url``,
    never the request's Host header (which the client chooses); without one, the link is a path."""
    path = f"/invite/{token}"
    if st.settings.public_url:
        return st.settings.public_url + path, None
    return path, NO_PUBLIC_URL_NOTE


def safe_next(value: Optional[str]) -> str:
    """Only local paths are allowed as a redirect target after log-in."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 500:
        return "/"
    return value
