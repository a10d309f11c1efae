"""The Andon cord: any person can say "training is producing bad output"; enough pulls pause training.

How the pause reaches the trainer: the pull is written to ``andon_pulls`` and, once
``andon_pulls_to_pause`` different people have pulled since the last admin clear, the watched run's
``run_status`` becomes ``paused`` with ``detail["andon"] = {"reason", "pulls", "by", "at"}``. The
trainer polls ``LabelStore.get_run_status(run_id)`` and waits while it is not ``running``. An admin
clears the pulls (and may resume the run: status back to ``running``).

The watched run is ``settings.run_id`` if set, else the most recently updated run that is running
or paused (else the most recently updated run). Pulls made while no run exists have ``run_id``
NULL (they count for every run).

Floods: a person's pull counts once per run within ``andon_repeat_window_s``; repeats answer
"already pulled" and are audited (``andon_repeat``, with the client address); the web layer also
limits each person at each client address to ``andon_rate_per_min`` requests a minute, for all server
processes together (429 beyond; ``throttle.StoreRateLimit``). The dashboard lists who pulled and who
repeated.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import or_, select

from megacoach.app.auth import Principal
from megacoach.app.settings import AppSettings
from megacoach.labels.records import RunStatus
from megacoach.labels.schema import AndonClearRow, AndonPullRow, AuditRow, LabelerRow, RunStatusRow, utcnow
from megacoach.labels.store import LabelStore


@dataclass(frozen=True)
class AndonState:
    run: Optional[RunStatus]
    pulls: list[dict]  # active pulls: name, reason, at
    people: int  # distinct people among them
    needed: int

    @property
    def run_id(self) -> Optional[str]:
        return self.run.run_id if self.run else None


def watched_run(store: LabelStore, settings: AppSettings) -> Optional[RunStatus]:
    if settings.run_id:
        return store.get_run_status(settings.run_id)
    runs = store.run_statuses()
    live = [r for r in runs if r.status in ("running", "paused")]
    return (live or runs or [None])[0]


def _active_pulls(s, run_id: Optional[str]) -> list[tuple[AndonPullRow, str]]:
    """Pulls on this run (and on every run) after its latest clear."""
    clear_q = select(AndonClearRow.at).order_by(AndonClearRow.at.desc()).limit(1)
    run_cond = AndonPullRow.run_id.is_(None) if run_id is None else or_(
        AndonPullRow.run_id == run_id, AndonPullRow.run_id.is_(None))
    clear_cond = AndonClearRow.run_id.is_(None) if run_id is None else or_(
        AndonClearRow.run_id == run_id, AndonClearRow.run_id.is_(None))
    last_clear = s.scalar(clear_q.where(clear_cond))
    q = (select(AndonPullRow, LabelerRow.name).join(LabelerRow, LabelerRow.id == AndonPullRow.labeler_id)
         .where(run_cond).order_by(AndonPullRow.id))
    if last_clear is not None:
        q = q.where(AndonPullRow.at > last_clear)
    return [tuple(r) for r in s.execute(q)]


def state(store: LabelStore, settings: AppSettings) -> AndonState:
    run = watched_run(store, settings)
    with store.session(write=False) as s:
        rows = _active_pulls(s, run.run_id if run else None)
    pulls = [dict(name=name, reason=p.reason, at=p.at, run_id=p.run_id) for p, name in rows]
    return AndonState(run, pulls, len({p.labeler_id for p, _ in rows}), settings.andon_pulls_to_pause)


def pull(store: LabelStore, settings: AppSettings, who: Principal, reason: str, client: str = "unknown") -> dict:
    """Record a pull; pause the watched run when enough people pulled. Returns what happened.

    A person's pull counts once per run within ``andon_repeat_window_s`` (until an admin clears):
    a repeat is not recorded as a pull, only audited (``andon_repeat``), and the answer says
    ``already_pulled``. Every pull and repeat is audited with the client address."""
    run = watched_run(store, settings)
    run_id = run.run_id if run else None
    now = utcnow()
    needed = settings.andon_pulls_to_pause
    with store.session() as s, s.begin():
        rows = _active_pulls(s, run_id)
        since = now - dt.timedelta(seconds=settings.andon_repeat_window_s)
        mine = [p for p, _ in rows if p.labeler_id == who.id and p.run_id == run_id and p.at > since]
        if mine:  # already counted: nothing changes
            repeat = dict(run_id=run_id, reason=reason, client=client, via=who.via,
                          first_pull_at=mine[0].at.isoformat(), people=len({p.labeler_id for p, _ in rows}),
                          needed=needed, paused=False)
        else:
            repeat = None
            s.add(AndonPullRow(run_id=run_id, labeler_id=who.id, reason=reason, at=now))
            s.flush()
            rows = _active_pulls(s, run_id)
            people = len({p.labeler_id for p, _ in rows})
            paused = False
            if run_id is not None and people >= needed:
                row = s.get(RunStatusRow, run_id, populate_existing=True)
                if row is not None and row.status == "running":
                    detail = dict(row.detail or {})
                    detail["andon"] = dict(
                        reason=reason, pulls=people, by=sorted({name for _, name in rows}), at=now.isoformat(),
                        reasons=[p.reason for p, _ in rows][-10:],
                    )
                    # top-level reason/who: what the trainer's loop reads when it finds the run paused
                    detail["reason"] = reason
                    detail["who"] = ", ".join(detail["andon"]["by"])
                    row.status = "paused"
                    row.detail = detail
                    row.updated_at = now
                    paused = True
            store_detail = dict(run_id=run_id, reason=reason, people=people, needed=needed, paused=paused,
                                client=client, via=who.via)
    if repeat is not None:
        store.append_audit(who.name, "andon_repeat", repeat)
        return dict(repeat, already_pulled=True)
    store.append_audit(who.name, "andon_pull", store_detail)
    return dict(store_detail, already_pulled=False)


def repeats(store: LabelStore, settings: AppSettings) -> dict[str, int]:
    """Refused repeat pulls per person since the watched run's last clear (who floods the cord)."""
    run = watched_run(store, settings)
    run_id = run.run_id if run else None
    with store.session(write=False) as s:
        clear_cond = AndonClearRow.run_id.is_(None) if run_id is None else or_(
            AndonClearRow.run_id == run_id, AndonClearRow.run_id.is_(None))
        last_clear = s.scalar(select(AndonClearRow.at).where(clear_cond).order_by(AndonClearRow.at.desc()).limit(1))
        q = select(AuditRow.actor, AuditRow.detail).where(AuditRow.action == "andon_repeat")
        if last_clear is not None:
            q = q.where(AuditRow.at > last_clear)
        out: dict[str, int] = {}
        for actor, detail in s.execute(q.order_by(AuditRow.id.desc()).limit(10_000)):
            if isinstance(detail, dict) and detail.get("run_id") == run_id:
                out[actor] = out.get(actor, 0) + 1
    return out


def clear(store: LabelStore, settings: AppSettings, who: Principal, note: str, resume: bool) -> dict:
    """An admin acknowledges the pulls (they stop counting); with ``resume`` a paused run runs again."""
    run = watched_run(store, settings)
    run_id = run.run_id if run else None
    now = utcnow()
    resumed = False
    with store.session() as s, s.begin():
        s.add(AndonClearRow(run_id=run_id, labeler_id=who.id, note=note, at=now))
        if resume and run_id is not None:
            row = s.get(RunStatusRow, run_id, populate_existing=True)
            if row is not None and row.status == "paused":
                detail = dict(row.detail or {})
                if "andon" in detail:
                    detail["andon_cleared"] = dict(by=who.name, note=note, at=now.isoformat(), was=detail.pop("andon"))
                    detail.pop("reason", None)
                    detail.pop("who", None)
                row.status = "running"
                row.detail = detail
                row.updated_at = now
                resumed = True
    out = dict(run_id=run_id, note=note, resumed=resumed)
    store.append_audit(who.name, "andon_clear", out)
    return out


def banner(st: AndonState) -> Optional[dict]:
    """What the banner on every page says, or None when all is well."""
    run = st.run
    if run is not None and run.status in ("paused", "halted"):
        andon = run.detail.get("andon") if isinstance(run.detail, dict) else None
        if run.status == "paused" and andon:
            by = ", ".join(andon.get("by", [])) or "a labeler"
            text = f"Training run {run.run_id} is PAUSED: the Andon cord was pulled by {by}: {andon.get('reason', '')}"
        else:
            why = _alarm_text(run.detail)
            text = f"Training run {run.run_id} is {run.status.upper()}" + (f": {why}" if why else "")
        return dict(kind=run.status, text=text)
    if st.pulls:
        last = st.pulls[-1]
        where = f"run {st.run_id}" if st.run_id else "training (no run active yet)"
        return dict(kind="pulled",
                    text=f"Andon cord pulled on {where} by {last['name']}: {last['reason']} "
                         f"({st.people} of {st.needed} pulls needed to pause)")
    return None


def _alarm_text(detail: object) -> str:
    if not isinstance(detail, dict):
        return ""
    for key in ("reason", "halt_reason", "message"):
        if isinstance(detail.get(key), str):
            return detail[key]
    alarms = detail.get("alarms") or detail.get("guard_alarms")
    if isinstance(alarms, list) and alarms:
        return "; ".join(str(a.get("message", a) if isinstance(a, dict) else a) for a in alarms[:3])
    return ""
