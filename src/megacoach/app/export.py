"""Labels as JSON lines: item, samples with provenance, choice, labeler, batch, split, guideline, times."""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from megacoach.labels.store import ComparisonRecord, LabelStore

PAGE = 500


def label_json(c: ComparisonRecord) -> dict[str, Any]:
    return dict(
        comparison_id=c.id,
        item_id=c.item_id,
        query_id=c.query_id,
        query=c.query_text,
        query_token_ids=c.query_token_ids,
        samples=[dict(id=s.id, text=s.text, token_ids=s.token_ids, policy=s.policy, iteration=s.iteration,
                      seed=s.seed, run_id=s.run_id, created_at=s.created_at.isoformat()) for s in c.samples],
        chosen=c.chosen,
        chosen_sample_id=c.samples[c.chosen].id,
        shown_order=c.shown_order,
        confidence=c.confidence,
        note=c.note,
        flagged=c.flagged,
        too_fast=c.too_fast,
        time_taken_s=c.time_taken_s,
        labeler=c.labeler_name,
        labeler_kind=c.labeler_kind,
        batch=c.batch,
        split=c.split,
        source=c.item_source,
        is_gold=c.is_gold,
        gold_choice=c.gold_choice,
        is_calibration=c.is_calibration,
        guideline_version=c.guideline_version,
        item_created_at=c.item_created_at.isoformat(),
        created_at=c.created_at.isoformat(),
    )


def export_lines(store: LabelStore, *, labeler_kind: Optional[str] = None, split: Optional[str] = None,
                 after_id: int = 0) -> Iterator[bytes]:
    """Every label (id order) as one JSON line each, read page by page."""
    upto = store.position()
    pos = after_id
    while True:
        page = store.comparisons(split=split, after_id=pos, upto_id=upto, labeler_kind=labeler_kind, limit=PAGE)
        if not page:
            return
        yield "".join(json.dumps(label_json(c), ensure_ascii=False) + "\n" for c in page).encode()
        pos = page[-1].id
