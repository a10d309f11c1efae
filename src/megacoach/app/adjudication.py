"""Disagreements and their adjudication.

An ordinary item (neither gold nor calibration) is *disputed* once it has all the labels it asks for (its
overlap, at least the app's ``--overlap``) and two or more of them disagree: different best continuations,
or a best continuation beside "equally good" or "none acceptable". An
adjudicator (a labeler an admin allowed to, or an admin) sees every label of the item with its reason
(note), confidence and guideline version, and the skips with theirs, and decides: a best continuation,
"equally good" or "none acceptable", with a reason. The decision is a label of its own
(``comparisons.adjudication``, one per item); in the label store's training view the Values Coach learns
from the decision instead of the item's labels (``LabelStore.comparisons``). Nobody decides an item they
labeled themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.orm import aliased

from megacoach.app.auth import Principal
from megacoach.app.errors import BadInput, Conflict, NotFound
from megacoach.errors import DataError
from megacoach.labels.records import VERDICTS, DuplicateLabelError
from megacoach.labels.schema import ComparisonRow, ItemRow, LabelerRow, SkipRow
from megacoach.labels.store import LabelStore


def answer_key() -> Any:
    """One value per answer a label can give: the canonical index, or -2 (tie) / -3 (none acceptable)."""
    return case((ComparisonRow.verdict == "tie", -2), (ComparisonRow.verdict == "none", -3),
                else_=ComparisonRow.chosen)


def disputed_items(min_overlap: int = 1) -> Any:
    """SELECT item_id of the ordinary items that have their labels (as many as the item's overlap, at
    least ``min_overlap``) and whose labels disagree, decided or not."""
    wanted = case((ItemRow.overlap > min_overlap, ItemRow.overlap), else_=min_overlap)
    return (select(ComparisonRow.item_id)
            .join(ItemRow, ItemRow.id == ComparisonRow.item_id)
            .where(~ComparisonRow.adjudication, ~ItemRow.is_gold, ~ItemRow.is_calibration)
            .group_by(ComparisonRow.item_id)
            .having(func.count(func.distinct(answer_key())) > 1, func.count(ComparisonRow.id) >= func.max(wanted)))


def _decided(item_id: Any) -> Any:
    decision = aliased(ComparisonRow)
    return exists().where(decision.item_id == item_id, decision.adjudication)


@dataclass(frozen=True)
class Dispute:
    """A disputed item as an adjudicator sees it: continuations in canonical order (1..K)."""

    item_id: int
    prompt: str
    continuations: list[str]
    labels: list[dict[str, Any]]  # labeler, verdict, position (1-based canonical), note, confidence, ...
    skips: list[dict[str, Any]]
    decision: Optional[dict[str, Any]]
    labeled_by_you: bool


class Adjudication:
    def __init__(self, store: LabelStore, overlap: int = 1) -> None:
        self.store = store
        self.overlap = overlap  # the app's --overlap: an item is disputed once it has at least this many labels

    def _disputed(self) -> Any:
        return disputed_items(self.overlap)

    def counts(self) -> dict[str, int]:
        """Disputed items: open (no decision yet) and decided."""
        with self.store.session(write=False) as s:
            ids = self._disputed().subquery()
            total = s.scalar(select(func.count()).select_from(ids)) or 0
            decided = s.scalar(select(func.count()).select_from(ids).where(_decided(ids.c.item_id))) or 0
        return dict(open=int(total - decided), decided=int(decided))

    def open_items(self, who: Principal, limit: int = 100) -> list[int]:
        """Disputed items without a decision that ``who`` did not label, oldest first."""
        ids = self._disputed().subquery()
        mine = exists().where(ComparisonRow.item_id == ids.c.item_id, ComparisonRow.labeler_id == who.id)
        with self.store.session(write=False) as s:
            return [int(i) for i in s.scalars(select(ids.c.item_id).where(~_decided(ids.c.item_id), ~mine)
                                              .order_by(ids.c.item_id).limit(limit))]

    def _is_disputed(self, s: Any, item_id: int) -> bool:
        return bool(s.scalar(select(func.count()).select_from(
            self._disputed().where(ComparisonRow.item_id == item_id).subquery())))

    def dispute(self, who: Principal, item_id: int) -> Dispute:
        """A disputed item (open or decided) as its adjudicator sees it; any other item: NotFound (an
        adjudicator reads the labels of disagreements only)."""
        with self.store.session(write=False) as s:
            item = s.get(ItemRow, item_id)
            if item is None or not self._is_disputed(s, item_id):
                raise NotFound(f"item {item_id}: no such disagreement")
            rows = s.execute(select(ComparisonRow, LabelerRow.name)
                             .join(LabelerRow, LabelerRow.id == ComparisonRow.labeler_id)
                             .where(ComparisonRow.item_id == item_id).order_by(ComparisonRow.id)).all()
            skips = s.execute(select(SkipRow.reason, LabelerRow.name).join(LabelerRow, LabelerRow.id == SkipRow.labeler_id)
                              .where(SkipRow.item_id == item_id).order_by(SkipRow.id)).all()
        (content,) = self.store.item_contents([item_id])

        def view(c: ComparisonRow, name: str) -> dict[str, Any]:
            return dict(comparison_id=c.id, labeler=name, verdict=c.verdict,
                        position=None if c.chosen is None else c.chosen + 1, note=c.note or "",
                        confidence=c.confidence, guideline_version=c.guideline_version, flagged=bool(c.flagged),
                        time_taken_s=c.time_taken_s, created_at=c.created_at.isoformat())

        labels = [view(c, n) for c, n in rows if not c.adjudication]
        decision = next((view(c, n) for c, n in rows if c.adjudication), None)
        return Dispute(item_id, content.query.text, [x.text for x in content.samples], labels,
                       [dict(labeler=n, reason=r) for r, n in skips], decision,
                       any(c.labeler_id == who.id for c, _ in rows if not c.adjudication))

    def decide(self, who: Principal, item_id: int, verdict: str, position: Optional[int], note: Optional[str]) -> dict:
        """Decide a disputed item: ``position`` (1-based, canonical order) with verdict "best", or
        verdict "tie" / "none" without one; ``note``: the reason."""
        if verdict not in VERDICTS:
            raise BadInput(f"verdict: expected one of {', '.join(VERDICTS)}, got {verdict!r}")
        if (verdict == "best") != (position is not None):
            raise BadInput("choice: a decision names the best continuation, or says 'tie' or 'none'")
        with self.store.session(write=False) as s:
            item = s.get(ItemRow, item_id)
            if item is None:
                raise NotFound(f"item {item_id}: no such item")
            if position is not None and not 1 <= position <= item.k:
                raise BadInput(f"choice: expected a position 1..{item.k}, got {position}")
            disputed = self._is_disputed(s, item_id)
            labeled = s.scalar(select(ComparisonRow.id).where(and_(
                ComparisonRow.item_id == item_id, ComparisonRow.labeler_id == who.id, ~ComparisonRow.adjudication)))
        if not disputed:
            raise Conflict(f"item {item_id}: its labels do not disagree (or not all of them are in yet); there is "
                           "nothing to decide")
        if labeled is not None:
            raise Conflict(f"item {item_id}: you labeled it yourself; another adjudicator or admin decides it")
        chosen = None if position is None else position - 1
        try:
            with self.store.transaction():
                rec = self.store.add_comparison(item_id, chosen, who.id, verdict=verdict, adjudication=True,
                                                note=note, via=who.via, api_token_id=who.token_id)
                self.store.append_audit(who.name, "adjudicate", dict(
                    item_id=item_id, comparison_id=rec.id, verdict=verdict, chosen=chosen, note=note,
                    via=who.via, api_token_id=who.token_id))
        except DuplicateLabelError:
            raise Conflict(f"item {item_id} is decided already") from None
        except DataError as e:
            raise BadInput(str(e)) from None
        return dict(comparison_id=rec.id, item_id=item_id, verdict=verdict, chosen=chosen, position=position,
                    note=note, guideline_version=rec.guideline_version)
