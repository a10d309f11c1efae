"""The admin dashboard's numbers, read from the label store (people's labels only, unless noted)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any, Optional

from sqlalchemy import func, select

from megacoach.app import andon as andon_mod
from megacoach.app.metrics import (
    LabelFact,
    agreement,
    drift_canary,
    gold_accuracy,
    gold_accuracy_by_day,
    latencies_s,
    per_hour,
    quantile,
    win_rate_vs_initial,
)
from megacoach.app.settings import AppSettings
from megacoach.labels.assignment import Assigner
from megacoach.labels.schema import ComparisonRow, ItemRow, LabelerRow, SampleRow, SkipRow, utcnow
from megacoach.labels.store import LabelStore

MAX_FACTS = 50_000  # the newest labels the quality measures look at


def label_facts(store: LabelStore, person_only: bool = True, limit: int = MAX_FACTS) -> list[LabelFact]:
    """The newest labels (not adjudicators' decisions) as facts for the quality measures."""
    with store.session(write=False) as s:
        q = (select(ComparisonRow, ItemRow).join(ItemRow, ItemRow.id == ComparisonRow.item_id)
             .where(~ComparisonRow.adjudication).order_by(ComparisonRow.id.desc()).limit(limit))
        if person_only:
            q = q.where(ComparisonRow.labeler_kind == "person")
        rows = [tuple(r) for r in s.execute(q)]
        sample_ids = sorted({sid for _, it in rows for sid in it.sample_ids})
        samples: dict[int, tuple[Optional[int], dt.datetime]] = {}
        for i in range(0, len(sample_ids), 500):
            chunk = sample_ids[i : i + 500]
            for sid, it, at in s.execute(select(SampleRow.id, SampleRow.iteration, SampleRow.created_at)
                                         .where(SampleRow.id.in_(chunk))):
                samples[sid] = (it, at)
        facts = []
        for c, it in reversed(rows):
            info = [samples.get(sid, (None, it.created_at)) for sid in it.sample_ids]
            facts.append(LabelFact(
                item_id=it.id, labeler_id=c.labeler_id, chosen=c.chosen, k=it.k, created_at=c.created_at,
                item_created_at=it.created_at, batch=it.batch, source=it.source, is_gold=bool(it.is_gold),
                gold_choice=it.gold_choice, time_taken_s=c.time_taken_s, too_fast=bool(c.too_fast),
                flagged=bool(c.flagged), labeler_kind=c.labeler_kind,
                sample_iterations=tuple(x[0] for x in info),
                samples_created_at=max(x[1] for x in info) if info else None,
                verdict=c.verdict, guideline_version=c.guideline_version))
        return facts


def _alarm_line(a: Any) -> str:
    """A guard alarm (the guards' ``Alarm.as_dict()``, or any value) as one line."""
    if isinstance(a, dict):
        head = " ".join(str(a[k]) for k in ("action", "name") if a.get(k))
        return f"{head}: {a.get('message', '')}" if head else str(a.get("message", a))
    return str(a)


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(100.0 * x, 1)


def dashboard(store: LabelStore, settings: AppSettings, assigner: Assigner,
              disputes: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """Everything the admin dashboard shows, as plain JSON-able data (``disputes``: the open and decided
    disagreements, ``Adjudication.counts``)."""
    now = utcnow()
    facts = label_facts(store)
    with store.session(write=False) as s:
        labelers = {r.id: r for r in s.scalars(select(LabelerRow))}
        n_items = s.scalar(select(func.count(ItemRow.id))) or 0
        n_labels_all = s.scalar(select(func.count(ComparisonRow.id))) or 0
        skips_by = dict(s.execute(select(SkipRow.labeler_id, func.count(SkipRow.id)).group_by(SkipRow.labeler_id)).all())
        queue = assigner.queue_length(session=s)
    hourly = per_hour((f.created_at for f in facts), now, 24)
    lat = latencies_s([f for f in facts if (now - f.created_at) <= dt.timedelta(days=7)])
    agree = agreement(facts)
    gold = gold_accuracy(facts)
    gold_days = gold_accuracy_by_day(facts)
    canary = drift_canary(facts)
    wins = win_rate_vs_initial(facts)

    per: dict[int, dict[str, Any]] = defaultdict(lambda: dict(labels=0, last_hour=0, too_fast=0, flagged=0, times=[],
                                                              ties=0, nones=0))
    for f in facts:
        d = per[f.labeler_id]
        d["labels"] += 1
        d["ties"] += int(f.verdict == "tie")
        d["nones"] += int(f.verdict == "none")
        d["last_hour"] += int((now - f.created_at) <= dt.timedelta(hours=1))
        d["too_fast"] += int(f.too_fast)
        d["flagged"] += int(f.flagged)
        if f.time_taken_s is not None:
            d["times"].append(f.time_taken_s)
    people = []
    for lid, row in sorted(labelers.items()):
        if row.kind != "person":
            continue
        d = per.get(lid, dict(labels=0, last_hour=0, too_fast=0, flagged=0, times=[], ties=0, nones=0))
        g = gold.get(lid)
        a = agree.per_labeler.get(lid)
        people.append(dict(
            id=lid, name=row.name, role=row.role, adjudicator=bool(row.adjudicator), active=bool(row.active),
            labels=d["labels"], ties=d["ties"], none_acceptable=d["nones"],
            last_hour=d["last_hour"], too_fast=d["too_fast"], flagged=d["flagged"], skips=int(skips_by.get(lid, 0)),
            median_time_s=quantile(d["times"], 0.5),
            gold_n=g.n if g else 0, gold_accuracy_pct=_pct(g.rate) if g else None,
            gold_by_day=[dict(day=day.isoformat(), n=r.n, pct=_pct(r.rate)) for day, r in gold_days.get(lid, [])],
            agreement_n=a.n if a else 0, agreement_pct=_pct(a.rate) if a else None,
            disagreement_pct=_pct(1.0 - a.rate) if a and a.rate is not None else None))
    st = andon_mod.state(store, settings)
    runs = []
    for r in store.run_statuses()[:10]:
        detail = r.detail if isinstance(r.detail, dict) else {}
        alarms = detail.get("alarms") or detail.get("guard_alarms") or []
        alarms = alarms if isinstance(alarms, list) else [alarms]
        runs.append(dict(run_id=r.run_id, status=r.status, iteration=r.iteration, updated_at=r.updated_at.isoformat(),
                         alarms=[_alarm_line(a) for a in alarms], reason=str(detail.get("reason") or ""),
                         detail=detail))
    return dict(
        now=now.isoformat(),
        queue_length=int(queue),
        items=int(n_items),
        labels_all=int(n_labels_all),
        labels_people=len(facts),
        labels_last_hour=hourly[-1],
        labels_per_hour_24h=hourly,
        latency_s=dict(n=len(lat), p50=quantile(lat, 0.5), p90=quantile(lat, 0.9), max=max(lat) if lat else None),
        agreement=dict(pairs=agree.overall.n, pct=_pct(agree.overall.rate), chance_pct=_pct(agree.chance)),
        disagreement_by_version=[dict(version=v, pairs=r.n, agreement_pct=_pct(r.rate),
                                      disagreement_pct=_pct(1.0 - r.rate) if r.rate is not None else None)
                                 for v, r in agree.per_version.items()],
        disputes=dict(disputes or dict(open=0, decided=0)),
        verdicts=dict(best=sum(f.verdict == "best" for f in facts), tie=sum(f.verdict == "tie" for f in facts),
                      none=sum(f.verdict == "none" for f in facts)),
        canary=[dict(batch=p.batch, n=p.n, pct=_pct(p.rate)) for p in canary],
        win_rate=[dict(iteration=w.iteration, n=w.n, pct=_pct(w.rate), chance_pct=_pct(w.chance)) for w in wins],
        people=people,
        runs=runs,
        andon=dict(run_id=st.run_id, pulls=[dict(p, at=p["at"].isoformat()) for p in st.pulls], people=st.people,
                   needed=st.needed, repeats=andon_mod.repeats(store, settings)),
        too_fast_s=settings.too_fast_s,
    )


def sparkline(values: list[Optional[float]], width: int = 600, height: int = 150, lo: float = 0.0,
              hi: Optional[float] = None, half_line: Optional[float] = None) -> str:
    """An inline SVG polyline (server-drawn, no JavaScript) for the dashboard."""
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    top = hi if hi is not None else max([v for _, v in pts] + [1.0])
    span = (top - lo) or 1.0
    n = max(len(values) - 1, 1)
    pad = 12

    def xy(i: int, v: float) -> str:
        x = pad + (width - 2 * pad) * i / n
        y = height - pad - (height - 2 * pad) * (v - lo) / span
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img">']
    if half_line is not None:
        y = height - pad - (height - 2 * pad) * (half_line - lo) / span
        parts.append(f'<line class="half" x1="{pad}" x2="{width - pad}" y1="{y:.1f}" y2="{y:.1f}"/>')
    if pts:
        parts.append(f'<polyline class="line" points="{" ".join(xy(i, v) for i, v in pts)}"/>')
        if len(pts) <= 60:
            for i, v in pts:
                x, y = xy(i, v).split(",")
                parts.append(f'<circle class="dot" cx="{x}" cy="{y}" r="3"/>')
    parts.append(f'<text x="{pad}" y="{pad}">{top:g}</text><text x="{pad}" y="{height - 2}">{lo:g}</text></svg>')
    return "".join(parts)
