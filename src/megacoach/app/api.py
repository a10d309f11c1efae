"""The JSON API (described at /openapi.json): for scripts, the trainer and mock labelers.

Authenticate with ``Authorization: Bearer <API token>`` (admins create tokens on the People page),
or with a browser session plus the session's CSRF token in ``X-CSRF-Token`` for writes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from megacoach.app import andon as andon_mod
from megacoach.app.auth import Principal
from megacoach.app.core import (
    MAX_ID,
    api_adjudicator,
    api_admin,
    api_andon,
    api_labeler,
    api_reader,
    andon_pull,
    api_user,
    invite_link,
    state_of,
)
from megacoach.app.dashboard import dashboard
from megacoach.app.errors import BadInput
from megacoach.app.export import export_lines, label_json
from megacoach.app.web import _set_active, dispute_json, publish_guideline, set_adjudicator, token_audit

router = APIRouter(prefix="/api")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- models -------------------------------------------------------------------------------------

class Me(BaseModel):
    id: int
    name: str
    role: str
    kind: str
    via: str
    csrf_token: Optional[str] = None


class NextItem(BaseModel):
    item: Optional[dict[str, Any]] = Field(
        None, description="null when nothing is waiting; else item_id, k, prompt, continuations, expires_at")


Verdict = Literal["best", "tie", "none"]


class LabelIn(Strict):
    item_id: int = Field(ge=1, le=MAX_ID)
    choice: Optional[int] = Field(None, ge=1, le=100, description="1-based position (in the shown order) of the best "
                                                               "continuation; none with verdict tie or none")
    verdict: Verdict = Field("best", description="best (choice names it), tie (the best ones are equally good) or "
                                                 "none (none is acceptable)")
    time_taken_s: Optional[float] = Field(None, ge=0, le=86_400, description="time on task measured by the client")
    flagged: bool = False
    note: Optional[str] = Field(None, max_length=100_000)
    confidence: Optional[int] = Field(None, ge=1, le=5)


class LabelOut(BaseModel):
    comparison_id: int
    item_id: int
    verdict: str
    chosen: Optional[int] = Field(description="canonical index of the chosen sample (null for tie / none)")
    position: Optional[int]
    too_fast: bool
    time_taken_s: float
    flagged: bool
    guideline_version: str
    gold: Optional[dict[str, Any]] = Field(
        None, description="on a gold (check) item you missed: expected_position (in your shown order), "
                          "expected_text, explanation, yours; null otherwise")


class DecisionIn(Strict):
    verdict: Verdict = "best"
    choice: Optional[int] = Field(None, ge=1, le=100, description="1-based position in the item's canonical order "
                                                               "(as GET /api/adjudication/{item_id} lists them)")
    note: Optional[str] = Field(None, max_length=100_000, description="the reason for the decision")


class AdjudicatorIn(Strict):
    adjudicator: bool


class SkipIn(Strict):
    item_id: int = Field(ge=1, le=MAX_ID)
    reason: str = Field(min_length=1, max_length=100_000)


class AndonIn(Strict):
    reason: str = Field(min_length=1, max_length=100_000)


class InviteIn(Strict):
    name: str = Field(min_length=1, max_length=1000)
    role: Literal["labeler", "adjudicator", "admin"] = "labeler"


class ActiveIn(Strict):
    active: bool


class TokenIn(Strict):
    owner: str = Field(min_length=1, max_length=1000,
                       description="a program account (created if missing) or yourself; never another person")
    name: Optional[str] = Field(None, max_length=1000)
    scopes: Optional[list[str]] = Field(None, max_length=10,
                                        description="some of label, read, andon, admin (default: all the owner can have)")
    days: Optional[int] = Field(None, ge=1, le=3650, description="lifetime in days (default: api_token_days)")


class GuidelineIn(Strict):
    version: str = Field(min_length=1, max_length=1000)
    markdown: str = Field(min_length=1, max_length=1_000_000)


class ClearIn(Strict):
    note: str = Field("", max_length=100_000)
    resume: bool = False


def _iso(t: Optional[dt.datetime]) -> Optional[str]:
    return None if t is None else t.isoformat()


# ----- everyone logged in -----------------------------------------------------------------------------

@router.get("/health", tags=["status"])
def health() -> dict:
    """Liveness (no log-in needed)."""
    return {"ok": True}


@router.get("/me", response_model=Me, tags=["people"])
def me(who: Principal = Depends(api_user)) -> Me:
    return Me(id=who.id, name=who.name, role=who.role, kind=who.kind, via=who.via,
              csrf_token=who.csrf if who.via == "session" else None)


@router.get("/status", tags=["status"])
def status(request: Request, who: Principal = Depends(api_user)) -> dict:
    """The watched training run, the Andon cord's state and the banner every page shows."""
    st = state_of(request)
    s = andon_mod.state(st.store, st.settings)
    run = s.run
    return dict(
        run=None if run is None else dict(run_id=run.run_id, status=run.status, iteration=run.iteration,
                                          detail=run.detail, updated_at=_iso(run.updated_at)),
        andon=dict(pulls=[dict(p, at=_iso(p["at"])) for p in s.pulls], people=s.people, needed=s.needed),
        banner=andon_mod.banner(s),
    )


@router.get("/guidelines", tags=["labeling"])
def guidelines(request: Request, who: Principal = Depends(api_user)) -> dict:
    g = state_of(request).store.latest_guideline()
    return dict(version=g.version if g else None, markdown=g.markdown if g else "",
                created_at=_iso(g.created_at) if g else None)


@router.get("/progress", tags=["labeling"])
def progress(request: Request, who: Principal = Depends(api_user)) -> dict:
    """Your own progress."""
    return state_of(request).labeling.progress(who)


# ----- labeling ---------------------------------------------------------------------------------------

@router.post("/next", response_model=NextItem, tags=["labeling"])
def next_item(request: Request, who: Principal = Depends(api_labeler)) -> NextItem:
    """Take the item to label now (held for you until ``expires_at``; asking again gives the same
    item and renews the hold), continuations in your shown order. A POST: it assigns the item."""
    shown = state_of(request).labeling.next_item(who)
    if shown is None:
        return NextItem(item=None)
    return NextItem(item=dict(item_id=shown.item_id, k=shown.k, prompt=shown.prompt,
                              continuations=[dict(position=i + 1, text=t) for i, t in enumerate(shown.continuations)],
                              expires_at=_iso(shown.expires_at)))


@router.post("/labels", response_model=LabelOut, status_code=201, tags=["labeling"])
def submit_label(body: LabelIn, request: Request, who: Principal = Depends(api_labeler)) -> LabelOut:
    """Label the item you hold: ``choice`` is the position you picked (1..K, your shown order), or
    ``verdict`` tie (equally good) / none (none acceptable) without a choice. A missed gold item answers
    with ``gold``: the expected choice and its explanation."""
    out = state_of(request).labeling.submit(who, body.item_id, body.choice, verdict=body.verdict,
                                            client_elapsed_s=body.time_taken_s, flagged=body.flagged, note=body.note,
                                            confidence=body.confidence)
    return LabelOut(**out)


@router.post("/skips", status_code=201, tags=["labeling"])
def skip(body: SkipIn, request: Request, who: Principal = Depends(api_labeler)) -> dict:
    """Skip the item you hold, with a reason; someone else gets it."""
    return state_of(request).labeling.skip(who, body.item_id, body.reason)


@router.post("/andon", status_code=201, tags=["andon"])
def pull_andon(body: AndonIn, request: Request, response: Response, who: Principal = Depends(api_andon)) -> dict:
    """Pull the Andon cord: training is producing bad output (enough pulls pause the run). 201 when
    the pull counts; 200 with ``already_pulled`` when you pulled on this run already (it counts
    once; the repeat is audited); 429 with Retry-After beyond ``andon_rate_per_min``."""
    st = state_of(request)
    reason = st.labeling._text(body.reason, "reason")
    if not reason:
        raise BadInput("reason: say what is wrong with the output")
    out = andon_pull(request, who, reason)
    if out["already_pulled"]:
        response.status_code = 200
    return out


# ----- adjudication (adjudicators and admins) ---------------------------------------------------------

@router.get("/adjudication", tags=["adjudication"])
def adjudication_queue(request: Request, who: Principal = Depends(api_adjudicator),
                       limit: int = Query(100, ge=1, le=1000)) -> dict:
    """Items whose labels disagree: how many are open and decided, and the open ones you may decide
    (not labeled by you), oldest first."""
    adj = state_of(request).adjudication
    return dict(adj.counts(), items=adj.open_items(who, limit))


@router.get("/adjudication/{item_id}", tags=["adjudication"])
def adjudication_item(request: Request, item_id: int = Path(..., ge=1, le=MAX_ID),
                      who: Principal = Depends(api_adjudicator)) -> dict:
    """A disputed item: its continuations in canonical order (positions 1..K), every label with its
    reason, the skips, and the decision if there is one."""
    return dispute_json(state_of(request).adjudication.dispute(who, item_id))


@router.post("/adjudication/{item_id}", status_code=201, tags=["adjudication"])
def adjudication_decide(body: DecisionIn, request: Request, item_id: int = Path(..., ge=1, le=MAX_ID),
                        who: Principal = Depends(api_adjudicator)) -> dict:
    """Decide a disputed item (one you did not label): the Values Coach trains on the decision instead of
    the item's labels."""
    st = state_of(request)
    return st.adjudication.decide(who, item_id, body.verdict, body.choice, st.labeling._text(body.note, "note"))


# ----- reading labels (admins, the trainer) -------------------------------------------------------------

@router.get("/labels", tags=["labels"])
def labels(request: Request, who: Principal = Depends(api_reader), after_id: int = Query(0, ge=0, le=MAX_ID),
           limit: int = Query(100, ge=1, le=1000), kind: Optional[Literal["person", "program"]] = None,
           split: Optional[Literal["train", "valid"]] = None) -> dict:
    """Labels with id > after_id (id order), with their items, samples and provenance: every label as
    recorded (``verdict`` best / tie / none; ``adjudication`` for an adjudicator's decision)."""
    st = state_of(request)
    page = st.store.comparisons(split=split, after_id=after_id, labeler_kind=kind, limit=limit, view="all")
    return dict(labels=[label_json(c) for c in page], next_after_id=page[-1].id if page else after_id)


@router.post("/export.jsonl", tags=["labels"])
def export(request: Request, who: Principal = Depends(api_reader), after_id: int = Query(0, ge=0, le=MAX_ID),
           kind: Optional[Literal["person", "program"]] = None,
           split: Optional[Literal["train", "valid"]] = None) -> StreamingResponse:
    """Every label as JSON lines (a POST: the export is audited). ``GET /api/labels`` pages
    through the same labels without an audit entry."""
    st = state_of(request)
    st.store.append_audit(who.name, "export", dict(via="api", after_id=after_id, labeler_kind=kind, split=split))
    return StreamingResponse(export_lines(st.store, labeler_kind=kind, split=split, after_id=after_id),
                             media_type="application/x-ndjson")


# ----- admin ----------------------------------------------------------------------------------------------

@router.get("/admin/dashboard", tags=["admin"])
def admin_dashboard(request: Request, who: Principal = Depends(api_admin)) -> dict:
    st = state_of(request)
    return dashboard(st.store, st.settings, st.assigner, st.adjudication.counts())


@router.get("/admin/labelers", tags=["admin"])
def admin_labelers(request: Request, who: Principal = Depends(api_admin)) -> dict:
    st = state_of(request)
    return dict(labelers=[dict(id=r.id, name=r.name, kind=r.kind, role=r.role, adjudicator=r.adjudicator,
                               active=r.active, created_at=_iso(r.created_at)) for r in st.store.labelers()],
                invitations=[dict(i, created_at=_iso(i["created_at"])) for i in st.auth.invitations()],
                tokens=[dict(t, created_at=_iso(t["created_at"]), last_used_at=_iso(t["last_used_at"]),
                             expires_at=_iso(t["expires_at"])) for t in st.auth.api_tokens()])


@router.post("/admin/invites", status_code=201, tags=["admin"])
def admin_invite(body: InviteIn, request: Request, who: Principal = Depends(api_admin)) -> dict:
    """Invite a person; the answer holds the one-time link (only its hash is stored). The link is
    built on the configured ``public_url``; without one it is a path, and ``note`` says so."""
    st = state_of(request)
    token, info = st.auth.create_invitation(body.name, body.role, who.name)
    st.store.append_audit(who.name, "invite", dict(name=info["name"], role=info["role"], invitation_id=info["id"]))
    url, note = invite_link(st, token)  # public_url, never the request's Host header
    return dict(id=info["id"], name=info["name"], role=info["role"], url=url, note=note,
                expires_at=_iso(info["expires_at"]))


@router.post("/admin/labelers/{labeler_id}/active", tags=["admin"])
def admin_set_active(body: ActiveIn, request: Request, labeler_id: int = Path(..., ge=1, le=MAX_ID),
                     who: Principal = Depends(api_admin)) -> dict:
    return _set_active(state_of(request), who, labeler_id, body.active)


@router.post("/admin/labelers/{labeler_id}/adjudicator", tags=["admin"])
def admin_set_adjudicator(body: AdjudicatorIn, request: Request, labeler_id: int = Path(..., ge=1, le=MAX_ID),
                          who: Principal = Depends(api_admin)) -> dict:
    """Allow a labeler to decide disagreements (the adjudicator role), or take it back."""
    return set_adjudicator(state_of(request), who, labeler_id, body.adjudicator)


@router.post("/admin/tokens", status_code=201, tags=["admin"])
def admin_token(body: TokenIn, request: Request, who: Principal = Depends(api_admin)) -> dict:
    """A new API token (shown once) for a program account (a missing one is created) or for
    yourself, with scopes and an expiry. A token acts as its owner: none for another person."""
    st = state_of(request)
    raw, info = st.auth.create_api_token(body.owner, body.name or body.owner, by=who, scopes=body.scopes,
                                         days=body.days)
    st.store.append_audit(who.name, "token_create", token_audit(info, who))
    return dict(info, expires_at=_iso(info["expires_at"]), token=raw)


@router.post("/admin/tokens/{token_id}/revoke", tags=["admin"])
def admin_token_revoke(request: Request, token_id: int = Path(..., ge=1, le=MAX_ID),
                       who: Principal = Depends(api_admin)) -> dict:
    st = state_of(request)
    info = st.auth.revoke_api_token(token_id)
    st.store.append_audit(who.name, "token_revoke", dict(token_id=token_id, name=info["name"]))
    return dict(info, revoked=True)


@router.post("/admin/guidelines", status_code=201, tags=["admin"])
def admin_guideline(body: GuidelineIn, request: Request, who: Principal = Depends(api_admin)) -> dict:
    """Publish a new guideline version (versions never change)."""
    return publish_guideline(state_of(request), who, body.version, body.markdown)


@router.get("/admin/audit", tags=["admin"])
def admin_audit(request: Request, who: Principal = Depends(api_admin), after_id: int = Query(0, ge=0, le=MAX_ID),
                limit: int = Query(200, ge=1, le=1000), action: Optional[str] = Query(None, max_length=200)) -> dict:
    """The append-only audit log, oldest first from after_id."""
    entries = state_of(request).store.audit_entries(after_id=after_id, action=action, limit=limit)
    return dict(entries=[dict(id=e.id, at=_iso(e.at), actor=e.actor, action=e.action, detail=e.detail)
                         for e in entries])


@router.post("/admin/andon/clear", tags=["admin", "andon"])
def admin_andon_clear(body: ClearIn, request: Request, who: Principal = Depends(api_admin)) -> dict:
    """Acknowledge the Andon pulls; with resume=true a paused run is set running again."""
    st = state_of(request)
    return andon_mod.clear(st.store, st.settings, who, st.labeling._text(body.note, "note") or "", body.resume)
