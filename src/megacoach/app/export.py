"""Labels as JSON lines, in megacoach's export format (``megacoach.labels.io``), so that a download
from the app imports again with ``megacoach label import``: item, query, samples with provenance,
verdict (best, tie, none) and choice, adjudication, shown order, labeler, batch, split, guideline version, time on task, flag, note, times."""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from megacoach.labels.io import comparison_to_dict
from megacoach.labels.records import ComparisonRecord
from megacoach.labels.store import LabelStore

PAGE = 500


def label_json(c: ComparisonRecord) -> dict[str, Any]:
    return comparison_to_dict(c)


def export_lines(store: LabelStore, *, labeler_kind: Optional[str] = None, split: Optional[str] = None,
                 after_id: int = 0) -> Iterator[bytes]:
    """Every label as recorded (id order, up to the newest at the start; ties, "none acceptable" and
    adjudicators' decisions too) as one JSON line each, page by page."""
    upto = store.position()
    pos = after_id
    while True:
        page = store.comparisons(split=split, after_id=pos, upto_id=upto, labeler_kind=labeler_kind, limit=PAGE,
                                 view="all")
        if not page:
            return
        yield "".join(json.dumps(label_json(c), ensure_ascii=False) + "\n" for c in page).encode()
        pos = page[-1].id
