"""Server-rendered pages for people: log-in, invitation, labeling, progress, Andon cord, adjudication, admin."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from markupsafe import Markup
from sqlalchemy import select

from megacoach.app import andon as andon_mod
from megacoach.app.auth import Principal, clean_name
from megacoach.app.core import (
    MAX_ID,
    andon_pull,
    PRE_COOKIE,
    SESSION_COOKIE,
    check_csrf,
    check_pre_csrf,
    client_address,
    guideline_view,
    invite_link,
    page_adjudicator,
    page_admin,
    page_labeler,
    page_user,
    render,
    render_pre,
    safe_next,
    session_principal,
    state_of,
)
from megacoach.app.dashboard import dashboard, sparkline
from megacoach.app.errors import AppError, BadInput, Conflict, NotFound, NotLoggedIn
from megacoach.app.export import export_lines
from megacoach.app.labeling import parse_choice
from megacoach.errors import DataError
from megacoach.labels.schema import AuditRow

router = APIRouter(include_in_schema=False)



def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _set_session_cookie(request: Request, resp: RedirectResponse, secret: str) -> None:
    s = state_of(request).settings
    resp.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="lax", secure=s.secure_cookies, path="/",
                    max_age=s.session_ttl_s)
    resp.delete_cookie(PRE_COOKIE, path="/")


# ----- entry, log-in, invitation ------------------------------------------------------------------

@router.get("/")
def home(request: Request) -> RedirectResponse:
    try:
        who = session_principal(request)
    except NotLoggedIn:
        who = None
    if who is None:
        return _redirect("/login")
    return _redirect("/admin" if who.is_admin else "/label")


@router.get("/login")
def login_page(request: Request, next: str = Query("/", max_length=500), expired: int = Query(0, ge=0, le=1)):
    try:
        if session_principal(request) is not None:
            return _redirect(safe_next(next))
    except NotLoggedIn:
        expired = 1
    flash = dict(kind="err", text="Your session expired or ended; log in again.") if expired else None
    resp = render_pre(request, "login.html", dict(title="Log in", next_url=safe_next(next), name=""), flash=flash)
    if expired:
        resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.post("/login")
async def login_submit(request: Request, name: str = Form("", max_length=200),
                       password: str = Form("", max_length=1024), csrf_token: str = Form("", max_length=200),
                       next: str = Form("/", max_length=500)):
    # async: the password check runs in the auth's bounded hashing threads (HashSlots), the store's
    # writes and the page in the ordinary thread pool; nothing here blocks the event loop
    st = state_of(request)
    check_pre_csrf(request, csrf_token)
    client = client_address(request)
    try:
        who = await st.auth.authenticate_async(name, password, client)
    except AppError as e:
        if e.status != 429 or e.first_refusal:  # a throttled client's repeats are not each audited
            await run_in_threadpool(st.store.append_audit, name.strip()[:200] or "?", "login_failed",
                                    dict(reason=e.message, client=client))
        resp = await run_in_threadpool(render_pre, request, "login.html",
                                       dict(title="Log in", next_url=safe_next(next), name=name),
                                       e.status, dict(kind="err", text=e.message))
        if e.retry_after:
            resp.headers["retry-after"] = str(e.retry_after)
        return resp
    secret, who = await run_in_threadpool(st.auth.start_session, who)
    await run_in_threadpool(st.store.append_audit, who.name, "login", dict(via="password", client=client))
    resp = _redirect(safe_next(next))
    _set_session_cookie(request, resp, secret)
    return resp


@router.post("/logout")
def logout(request: Request, who: Principal = Depends(page_user), csrf_token: str = Form("", max_length=200)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    st.auth.end_session(who.session_id)
    st.store.append_audit(who.name, "logout", {})
    resp = _redirect("/login")
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/invite/{token}")
def invite_page(request: Request, token: str = Path(..., max_length=200)):
    st = state_of(request)
    info = st.auth.invitation(token)
    return render_pre(request, "invite.html", dict(title="Accept invitation", invite_name=info["name"],
                                                    invite_role=info["role"], token=token,
                                                    min_chars=st.settings.min_password_chars))


@router.post("/invite/{token}")
def invite_submit(request: Request, token: str = Path(..., max_length=200), password: str = Form("", max_length=1024),
                  password2: str = Form("", max_length=1024), csrf_token: str = Form("", max_length=200)):
    st = state_of(request)
    check_pre_csrf(request, csrf_token)
    info = st.auth.invitation(token)
    if password != password2:
        return render_pre(request, "invite.html", dict(title="Accept invitation", invite_name=info["name"],
                                                        invite_role=info["role"], token=token,
                                                        min_chars=st.settings.min_password_chars),
                          status=422, flash=dict(kind="err", text="the two passwords differ"))
    try:
        who = st.auth.accept_invitation(token, password)
    except BadInput as e:
        return render_pre(request, "invite.html", dict(title="Accept invitation", invite_name=info["name"],
                                                        invite_role=info["role"], token=token,
                                                        min_chars=st.settings.min_password_chars),
                          status=422, flash=dict(kind="err", text=e.message))
    st.store.append_audit(who.name, "invite_accept", dict(invitation_id=info["id"], role=who.role))
    secret, who = st.auth.start_session(who)
    st.store.append_audit(who.name, "login", dict(via="invitation"))
    resp = _redirect("/")
    _set_session_cookie(request, resp, secret)
    return resp


# ----- own account -----------------------------------------------------------------------------------

def _account_page(request: Request, who: Principal, status: int = 200, flash: Optional[dict] = None) -> HTMLResponse:
    st = state_of(request)
    return render(request, "account.html", dict(title="My account", min_chars=st.settings.min_password_chars),
                  who=who, status=status, flash=flash)


@router.get("/account", response_class=HTMLResponse)
def account_page(request: Request, who: Principal = Depends(page_user), changed: int = Query(0, ge=0, le=1)):
    return _account_page(request, who, flash=dict(kind="ok", text="Password changed.") if changed else None)


@router.post("/account/password")
async def account_password(request: Request, who: Principal = Depends(page_user),
                           csrf_token: str = Form("", max_length=200),
                           current_password: str = Form("", max_length=1024),
                           new_password: str = Form("", max_length=1024),
                           new_password2: str = Form("", max_length=1024)):
    """Change your own password: the current one, the new one twice, the session's CSRF token."""
    st = state_of(request)
    check_csrf(who, csrf_token)
    client = client_address(request)
    try:
        if new_password != new_password2:
            raise BadInput("the two new passwords differ")
        await st.auth.change_password_async(who, current_password, new_password, client)
    except AppError as e:
        if e.status in (401, 403):
            await run_in_threadpool(st.store.append_audit, who.name, "password_change_failed",
                                    dict(reason=e.message, client=client))
        resp = await run_in_threadpool(_account_page, request, who, e.status, dict(kind="err", text=e.message))
        if e.retry_after:
            resp.headers["retry-after"] = str(e.retry_after)
        return resp
    await run_in_threadpool(st.store.append_audit, who.name, "password_change", dict(client=client))
    return _redirect("/account?changed=1")


# ----- labeling -------------------------------------------------------------------------------------

def _label_flash(saved: int, skipped: int, andon: int, result: Optional[str]) -> Optional[dict]:
    if saved:
        return dict(kind="ok", text="Label saved." + (" (That was quick: labels under the time threshold are "
                                                      "marked too fast.)" if result == "fast" else ""))
    if skipped:
        return dict(kind="ok", text="Skipped; the item goes to someone else.")
    if andon:
        return dict(kind="ok", text="Thank you: your Andon pull is recorded.")
    return None


@router.get("/label", response_class=HTMLResponse)
def label_page(request: Request, who: Principal = Depends(page_labeler), saved: int = Query(0, ge=0, le=1),
               skipped: int = Query(0, ge=0, le=1), empty: int = Query(0, ge=0, le=1),
               result: Optional[str] = Query(None, max_length=10), missed: Optional[int] = Query(None, ge=1, le=MAX_ID)):
    """The item this labeler holds (read only: a GET assigns nothing). Without one, a form that
    POSTs /label/next (label.js sends it at once, unless nothing was left a moment ago). ``missed``:
    the gold item this labeler just missed: its expected choice and explanation are shown (only for
    their own label of a gold item they missed)."""
    st = state_of(request)
    feedback = st.labeling.gold_feedback(who, missed) if missed else None
    shown = st.labeling.held_item(who)
    progress = st.labeling.progress(who)
    guideline, guideline_html = guideline_view(st)
    ctx = dict(title="Label", item=shown, prompt=shown.prompt if shown else "",
               choices=shown.continuations if shown else [], progress=progress, guideline=guideline,
               guideline_html=guideline_html, skip_reasons=st.settings.skip_reasons,
               max_chars=st.settings.max_text_chars, empty=bool(empty), feedback=feedback)
    return render(request, "label.html", ctx, who=who, flash=_label_flash(saved, skipped, 0, result))


def _after(st, who: Principal, query: str) -> RedirectResponse:
    """Assign the next item (this is a POST) and show it: PRG to /label."""
    nxt = st.labeling.next_item(who)
    return _redirect("/label" + query + (("&" if query else "?") + "empty=1" if nxt is None else ""))


@router.post("/label/next")
def label_next(request: Request, who: Principal = Depends(page_labeler), csrf_token: str = Form("", max_length=200)):
    """Take the next item (or the one held already), then show it."""
    st = state_of(request)
    check_csrf(who, csrf_token)
    return _after(st, who, "")


def _elapsed(elapsed_ms: str) -> Optional[float]:
    try:
        v = float(elapsed_ms)
    except (TypeError, ValueError):
        return None
    return v / 1000.0 if 0 <= v < 1e9 else None


@router.post("/label")
def label_submit(request: Request, who: Principal = Depends(page_labeler), csrf_token: str = Form("", max_length=200),
                 item_id: int = Form(..., ge=1, le=MAX_ID), choice: str = Form(..., max_length=10),
                 elapsed_ms: str = Form("", max_length=30), flagged: str = Form("", max_length=10),
                 note: str = Form("", max_length=100_000)):
    """A label: ``choice`` is a position 1..K, "tie" (equally good) or "none" (none acceptable). A missed
    gold item shows its expected choice and explanation on the next page."""
    st = state_of(request)
    check_csrf(who, csrf_token)
    verdict, position = parse_choice(choice)
    out = st.labeling.submit(who, item_id, position, verdict=verdict, client_elapsed_s=_elapsed(elapsed_ms),
                             flagged=flagged in ("1", "on", "true"), note=note or None)
    return _after(st, who, "?saved=1" + ("&result=fast" if out["too_fast"] else "")
                  + (f"&missed={item_id}" if out["gold"] else ""))


@router.post("/skip")
def skip_submit(request: Request, who: Principal = Depends(page_labeler), csrf_token: str = Form("", max_length=200),
                item_id: int = Form(..., ge=1, le=MAX_ID), reason_choice: str = Form("", max_length=10),
                reason_text: str = Form("", max_length=100_000)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    reasons = st.settings.skip_reasons
    parts = []
    if reason_choice:
        try:
            idx = int(reason_choice)
        except ValueError:
            raise BadInput("reason_choice: expected a number") from None
        if not 1 <= idx <= len(reasons):
            raise BadInput(f"reason_choice: expected 1..{len(reasons)}")
        parts.append(reasons[idx - 1])
    if reason_text.strip():
        parts.append(reason_text.strip())
    st.labeling.skip(who, item_id, ": ".join(parts))
    return _after(st, who, "?skipped=1")


@router.get("/guidelines", response_class=HTMLResponse)
def guidelines_page(request: Request, who: Principal = Depends(page_user)):
    guideline, html = guideline_view(state_of(request))
    return render(request, "guidelines.html", dict(title="Guidelines", guideline=guideline, guideline_html=html), who=who)


@router.get("/progress", response_class=HTMLResponse)
def progress_page(request: Request, who: Principal = Depends(page_user)):
    p = state_of(request).labeling.progress(who)
    return render(request, "progress.html", dict(title="My progress", p=p), who=who)


# ----- Andon cord -------------------------------------------------------------------------------------

@router.get("/andon", response_class=HTMLResponse)
def andon_page(request: Request, who: Principal = Depends(page_user), pulled: int = Query(0, ge=0, le=1),
               already: int = Query(0, ge=0, le=1)):
    st = state_of(request)
    who.require("andon")
    s = andon_mod.state(st.store, st.settings)
    flash = dict(kind="ok", text="Thank you: your pull is recorded. Admins have been alerted.") if pulled else None
    if already:
        flash = dict(kind="ok", text="You pulled the cord on this run already; it counts once. Admins see your "
                                     "pull and this repeat.")
    return render(request, "andon.html", dict(title="Andon cord", run_id=s.run_id, pulls=s.people, needed=s.needed,
                                             max_chars=st.settings.max_text_chars), who=who, flash=flash)


@router.post("/andon")
def andon_submit(request: Request, who: Principal = Depends(page_user), csrf_token: str = Form("", max_length=200),
                 reason: str = Form("", max_length=100_000)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    who.require("andon")
    reason = st.labeling._text(reason, "reason") or ""
    if not reason:
        raise BadInput("reason: say what is wrong with the output")
    out = andon_pull(request, who, reason)
    return _redirect("/andon?already=1" if out["already_pulled"] else "/andon?pulled=1")


# ----- adjudication ------------------------------------------------------------------------------------

def dispute_json(d) -> dict:
    """A disputed item for the API and the page: continuations in canonical order (positions 1..K)."""
    return dict(item_id=d.item_id, prompt=d.prompt,
                continuations=[dict(position=i + 1, text=t) for i, t in enumerate(d.continuations)],
                labels=d.labels, skips=d.skips, decision=d.decision, labeled_by_you=d.labeled_by_you)


@router.get("/adjudicate", response_class=HTMLResponse)
def adjudicate_page(request: Request, who: Principal = Depends(page_adjudicator),
                    item_id: Optional[int] = Query(None, ge=1, le=MAX_ID), decided: int = Query(0, ge=0, le=1)):
    """The oldest open disagreement this adjudicator may decide (or ``item_id``), every label with its
    reason; read only (deciding is the form's POST)."""
    st = state_of(request)
    adj = st.adjudication
    counts = adj.counts()
    if item_id is None:
        waiting = adj.open_items(who, 1)
        item_id = waiting[0] if waiting else None
    dispute = dispute_json(adj.dispute(who, item_id)) if item_id is not None else None
    guideline, guideline_html = guideline_view(st)
    flash = dict(kind="ok", text="Decision saved; the Values Coach trains on it.") if decided else None
    return render(request, "adjudicate.html", dict(
        title="Disagreements", counts=counts, dispute=dispute, max_chars=st.settings.max_text_chars,
        guideline=guideline, guideline_html=guideline_html), who=who, flash=flash)


@router.post("/adjudicate")
def adjudicate_submit(request: Request, who: Principal = Depends(page_adjudicator),
                      csrf_token: str = Form("", max_length=200), item_id: int = Form(..., ge=1, le=MAX_ID),
                      choice: str = Form(..., max_length=10), note: str = Form("", max_length=100_000)):
    """Decide a disagreement: ``choice`` a position 1..K (canonical order), "tie" or "none"; ``note`` the reason."""
    st = state_of(request)
    check_csrf(who, csrf_token)
    verdict, position = parse_choice(choice)
    st.adjudication.decide(who, item_id, verdict, position, st.labeling._text(note, "note"))
    return _redirect("/adjudicate?decided=1")


# ----- admin ------------------------------------------------------------------------------------------

@router.get("/admin", response_class=HTMLResponse)
def admin_dashboard(request: Request, who: Principal = Depends(page_admin), cleared: int = Query(0, ge=0, le=1)):
    st = state_of(request)
    d = dashboard(st.store, st.settings, st.assigner, st.adjudication.counts())
    charts = dict(
        hourly=Markup(sparkline([float(x) for x in d["labels_per_hour_24h"]])),
        wins=Markup(sparkline([w["pct"] for w in d["win_rate"]], hi=100.0, half_line=50.0)) if d["win_rate"] else "",
        canary=Markup(sparkline([c["pct"] for c in d["canary"]], hi=100.0)) if d["canary"] else "",
    )
    flash = dict(kind="ok", text="Andon pulls cleared.") if cleared else None
    return render(request, "admin_dashboard.html", dict(title="Dashboard", d=d, charts=charts), who=who, flash=flash)


def _people_page(request: Request, who: Principal, created: Optional[dict] = None, status: int = 200,
                 flash: Optional[dict] = None) -> HTMLResponse:
    st = state_of(request)
    return render(request, "admin_people.html", dict(
        title="People", labelers=st.store.labelers(), invitations=st.auth.invitations(), tokens=st.auth.api_tokens(),
        created=created, max_chars=200), who=who, status=status, flash=flash)


@router.get("/admin/people", response_class=HTMLResponse)
def admin_people(request: Request, who: Principal = Depends(page_admin)):
    return _people_page(request, who)


@router.post("/admin/invites", response_class=HTMLResponse)
def admin_invite(request: Request, who: Principal = Depends(page_admin), csrf_token: str = Form("", max_length=200),
                 name: str = Form("", max_length=1000), role: str = Form("labeler", max_length=20)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    token, info = st.auth.create_invitation(name, role, who.name)
    st.store.append_audit(who.name, "invite", dict(name=info["name"], role=info["role"], invitation_id=info["id"]))
    link, note = invite_link(st, token)
    return _people_page(request, who, created=dict(kind="invite", name=info["name"], secret=link, note=note,
                                                   expires_at=info["expires_at"]))


@router.post("/admin/labelers/{labeler_id}/active")
def admin_set_active(request: Request, labeler_id: int = Path(..., ge=1, le=MAX_ID), who: Principal = Depends(page_admin),
                     csrf_token: str = Form("", max_length=200), active: int = Form(..., ge=0, le=1)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    _set_active(st, who, labeler_id, bool(active))
    return _redirect("/admin/people")


def _set_active(st, who: Principal, labeler_id: int, active: bool) -> dict:
    lab = st.store.get_labeler(labeler_id)
    if lab is None:
        raise NotFound(f"labeler {labeler_id}: no such labeler")
    if lab.id == who.id and not active:
        raise Conflict("you cannot deactivate your own account")
    rec = st.store.update_labeler(labeler_id, active=active)
    if not active:
        st.auth.end_all_sessions(labeler_id)
    st.store.append_audit(who.name, "activate" if active else "deactivate", dict(labeler=rec.name))
    return dict(id=rec.id, name=rec.name, active=rec.active)


@router.post("/admin/labelers/{labeler_id}/adjudicator")
def admin_set_adjudicator(request: Request, labeler_id: int = Path(..., ge=1, le=MAX_ID),
                          who: Principal = Depends(page_admin), csrf_token: str = Form("", max_length=200),
                          adjudicator: int = Form(..., ge=0, le=1)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    set_adjudicator(st, who, labeler_id, bool(adjudicator))
    return _redirect("/admin/people")


def set_adjudicator(st, who: Principal, labeler_id: int, on: bool) -> dict:
    """Allow a labeler to decide disagreements (or take it back); audited."""
    lab = st.store.get_labeler(labeler_id)
    if lab is None:
        raise NotFound(f"labeler {labeler_id}: no such labeler")
    if on and (lab.kind != "person" or lab.role != "labeler"):
        raise Conflict(f"{lab.name} ({lab.role}): only a person with the labeler role can be made an adjudicator "
                       "(admins decide disagreements anyway)")
    rec = st.store.update_labeler(labeler_id, adjudicator=on)
    st.store.append_audit(who.name, "adjudicator_on" if on else "adjudicator_off", dict(labeler=rec.name))
    return dict(id=rec.id, name=rec.name, adjudicator=rec.adjudicator)


def token_audit(info: dict, who: Principal) -> dict:
    return dict(owner=info["owner"], name=info["name"], token_id=info["id"], scopes=info["scopes"],
                expires_at=info["expires_at"].isoformat(), via=who.via, by_token_id=who.token_id)


@router.post("/admin/tokens", response_class=HTMLResponse)
def admin_token(request: Request, who: Principal = Depends(page_admin), csrf_token: str = Form("", max_length=200),
                owner: str = Form("", max_length=1000), token_name: str = Form("", max_length=1000),
                scopes: list[str] = Form([], max_length=10), days: str = Form("", max_length=10)):
    """A token for a program account (or yourself), with the ticked scopes (none ticked: all the
    account can have) and a lifetime in days (empty: api_token_days)."""
    st = state_of(request)
    check_csrf(who, csrf_token)
    try:
        n_days = int(days) if days.strip() else None
    except ValueError:
        raise BadInput("days: expected a whole number of days") from None
    raw, info = st.auth.create_api_token(owner, token_name or owner, by=who, scopes=scopes or None, days=n_days)
    st.store.append_audit(who.name, "token_create", token_audit(info, who))
    return _people_page(request, who, created=dict(
        kind="token", name=f"{info['name']} ({info['owner']}; {', '.join(info['scopes'])}; "
                           f"expires {info['expires_at']:%Y-%m-%d})", secret=raw))


@router.post("/admin/tokens/{token_id}/revoke")
def admin_token_revoke(request: Request, token_id: int = Path(..., ge=1, le=MAX_ID), who: Principal = Depends(page_admin),
                       csrf_token: str = Form("", max_length=200)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    info = st.auth.revoke_api_token(token_id)
    st.store.append_audit(who.name, "token_revoke", dict(token_id=token_id, name=info["name"]))
    return _redirect("/admin/people")


@router.get("/admin/guidelines", response_class=HTMLResponse)
def admin_guidelines(request: Request, who: Principal = Depends(page_admin), saved: int = Query(0, ge=0, le=1)):
    st = state_of(request)
    current, html = guideline_view(st)
    flash = dict(kind="ok", text="New guideline version published.") if saved else None
    return render(request, "admin_guidelines.html", dict(
        title="Edit guidelines", current=current, current_html=html, versions=list(reversed(st.store.guidelines())),
        suggested=_next_version(current.version if current else None), max_chars=st.settings.max_guideline_chars),
        who=who, flash=flash)


def _next_version(v: Optional[str]) -> str:
    if not v:
        return "1"
    head, _, tail = v.rpartition(".")
    if tail.isdigit():
        return f"{head}.{int(tail) + 1}" if head else str(int(tail) + 1)
    return v + ".1"


def publish_guideline(st, who: Principal, version: str, markdown: str) -> dict:
    version = clean_name(version, "version", 100)
    if not isinstance(markdown, str) or not markdown.strip():
        raise BadInput("markdown: the guidelines must not be empty")
    if len(markdown) > st.settings.max_guideline_chars:
        raise BadInput(f"markdown: at most {st.settings.max_guideline_chars} characters")
    if "\x00" in markdown:
        raise BadInput("markdown: NUL characters are not allowed")
    if st.store.get_guideline(version) is not None:
        raise Conflict(f"guideline version {version!r} exists already; versions never change, choose a new one")
    try:
        rec = st.store.set_guideline(version, markdown, created_by=who.name)
    except DataError as e:
        raise BadInput(str(e)) from None
    st.store.append_audit(who.name, "guideline", dict(version=rec.version, chars=len(markdown)))
    return dict(version=rec.version, created_at=rec.created_at.isoformat(), created_by=rec.created_by)


@router.post("/admin/guidelines")
def admin_guidelines_submit(request: Request, who: Principal = Depends(page_admin),
                            csrf_token: str = Form("", max_length=200), version: str = Form("", max_length=1000),
                            markdown: str = Form("", max_length=1_000_000)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    publish_guideline(st, who, version, markdown)
    return _redirect("/admin/guidelines?saved=1")


@router.get("/admin/audit", response_class=HTMLResponse)
def admin_audit(request: Request, who: Principal = Depends(page_admin),
                action: Optional[str] = Query(None, max_length=200), before_id: Optional[int] = Query(None, ge=1, le=MAX_ID)):
    st = state_of(request)
    entries = recent_audit(st, action, before_id, 200)
    return render(request, "admin_audit.html", dict(title="Audit log", entries=entries, action=action or ""), who=who)


def recent_audit(st, action: Optional[str], before_id: Optional[int], limit: int) -> list:
    """The newest audit entries (before ``before_id``), newest first."""
    with st.store.session(write=False) as s:
        q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if action:
            q = q.where(AuditRow.action == action)
        if before_id:
            q = q.where(AuditRow.id < before_id)
        return [dict(id=r.id, at=r.at, actor=r.actor, action=r.action, detail=r.detail) for r in s.scalars(q)]


@router.post("/admin/export.jsonl")
def admin_export(request: Request, who: Principal = Depends(page_admin), csrf_token: str = Form("", max_length=200),
                 kind: str = Form("", pattern="^(|person|program)$"), split: str = Form("", pattern="^(|train|valid)$")):
    """Download every label (a POST: it writes an audit entry)."""
    st = state_of(request)
    check_csrf(who, csrf_token)
    st.store.append_audit(who.name, "export", dict(via="page", labeler_kind=kind or None, split=split or None))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(export_lines(st.store, labeler_kind=kind or None, split=split or None),
                             media_type="application/x-ndjson",
                             headers={"content-disposition": f'attachment; filename="labels-{stamp}.jsonl"'})


@router.post("/admin/andon/clear")
def admin_andon_clear(request: Request, who: Principal = Depends(page_admin), csrf_token: str = Form("", max_length=200),
                      note: str = Form("", max_length=100_000), resume: str = Form("", max_length=10)):
    st = state_of(request)
    check_csrf(who, csrf_token)
    note = st.labeling._text(note, "note") or ""
    andon_mod.clear(st.store, st.settings, who, note, resume in ("1", "on", "true"))
    return _redirect("/admin?cleared=1")
