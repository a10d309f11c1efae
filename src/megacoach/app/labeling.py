"""What a human evaluator does: get the next item, label it (a best continuation, "equally good" or "none
acceptable"), skip it; the feedback on a missed gold item; their own progress."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.exc import IntegrityError

from megacoach.app.auth import Principal
from megacoach.app.errors import BadInput, Conflict, NotFound
from megacoach.app.metrics import quantile
from megacoach.app.settings import AppSettings
from megacoach.errors import DataError, StoreError
from megacoach.labels.assignment import Assigner
from megacoach.labels.records import VERDICTS, DuplicateLabelError
from megacoach.labels.schema import AppSecretRow, ComparisonRow, ItemLockRow, ItemRow, SkipRow, utcnow
from megacoach.labels.store import LabelStore


ORDER_SECRET = "shown_order"


def order_secret(store: LabelStore) -> bytes:
    """The server-side key of the shown order: made once (random), kept in the label store so that
    every process of the app, and every restart, shows a labeler the same order."""
    def read() -> Optional[bytes]:
        with store.session(write=False) as s:
            row = s.get(AppSecretRow, ORDER_SECRET)
            return bytes.fromhex(row.value) if row is not None else None

    found = read()
    if found is None:
        try:
            with store.session() as s, s.begin():
                s.add(AppSecretRow(name=ORDER_SECRET, value=secrets.token_hex(32), created_at=utcnow()))
        except IntegrityError:  # another process made it first
            pass
        found = read()
    if found is None:
        raise StoreError(f"label store {store.url}: cannot keep the app's {ORDER_SECRET!r} secret")
    return found


def keyed_order(secret: bytes, labeler_id: int, item_id: int, k: int) -> list[int]:
    """The order of an item's K continuations for one labeler: ``order[p]`` is the canonical index
    shown at position p. Stable for a labeler and item (reloads), different between labelers, and
    not computable without the server's secret (an HMAC per continuation)."""
    def key(i: int) -> bytes:
        return hmac.new(secret, f"order:{labeler_id}:{item_id}:{i}".encode(), hashlib.sha256).digest()

    return sorted(range(k), key=key)


def parse_choice(value: str) -> tuple[str, Optional[int]]:
    """A form's choice: a position "1".."K" (verdict "best"), "tie" (equally good) or "none" (none
    acceptable), as (verdict, position)."""
    v = (value or "").strip().lower()
    if v in ("tie", "none"):
        return v, None
    if v.isdigit() and 1 <= int(v) <= 100:
        return "best", int(v)
    raise BadInput("choice: expected a position (1, 2, ...), 'tie' (equally good) or 'none' (none acceptable)")


@dataclass(frozen=True)
class ShownItem:
    """An item as one labeler sees it: continuations in their shown order."""

    item_id: int
    k: int
    prompt: str
    continuations: list[str]  # in shown order (position 1..K)
    shown_order: list[int]  # shown position -> canonical index
    expires_at: dt.datetime


class Labeling:
    def __init__(self, store: LabelStore, settings: AppSettings, assigner: Assigner,
                 secret: Optional[bytes] = None) -> None:
        self.store = store
        self.settings = settings
        self.assigner = assigner
        self.secret = secret if secret is not None else order_secret(store)

    def order(self, labeler_id: int, item_id: int, k: int) -> list[int]:
        """This labeler's shown order of the item (see ``keyed_order``)."""
        return keyed_order(self.secret, labeler_id, item_id, k)

    def next_item(self, who: Principal) -> Optional[ShownItem]:
        """Assign (and lock) the item this labeler should label now: a write, for POST requests.
        The item they already hold comes back (its hold renewed)."""
        got = self.assigner.next_item(who.id)
        if got is None:
            return None
        return self._shown(who, got.item_id, got.k, got.expires_at)

    def held_item(self, who: Principal) -> Optional[ShownItem]:
        """The item this labeler holds now (unexpired, not yet labeled or skipped), or None.
        Read only: what a page GET shows."""
        now = utcnow()
        mine = ItemLockRow.labeler_id == who.id
        done = or_(
            exists().where(ComparisonRow.item_id == ItemLockRow.item_id, ComparisonRow.labeler_id == who.id),
            exists().where(SkipRow.item_id == ItemLockRow.item_id, SkipRow.labeler_id == who.id),
        )
        with self.store.session(write=False) as s:
            row = s.execute(select(ItemLockRow.item_id, ItemLockRow.expires_at, ItemRow.k)
                            .join(ItemRow, ItemRow.id == ItemLockRow.item_id)
                            .where(mine, ItemLockRow.expires_at > now, ~done)
                            .order_by(ItemLockRow.locked_at).limit(1)).first()
        if row is None:
            return None
        return self._shown(who, row.item_id, row.k, row.expires_at)

    def _shown(self, who: Principal, item_id: int, k: int, expires_at: dt.datetime) -> ShownItem:
        order = self.order(who.id, item_id, k)
        (content,) = self.store.item_contents([item_id])
        texts = [content.samples[c].text for c in order]
        return ShownItem(item_id, k, content.query.text, texts, order, expires_at)

    def submit(self, who: Principal, item_id: int, position: Optional[int], *, verdict: str = "best",
               client_elapsed_s: Optional[float] = None, flagged: bool = False, note: Optional[str] = None,
               confidence: Optional[int] = None) -> dict:
        """Record a label: ``position`` is the 1-based position the labeler picked in their shown order
        (verdict "best"); with verdict "tie" (equally good) or "none" (none acceptable) there is none.
        On a gold item the labeler missed, ``gold`` in the answer holds the expected choice and why."""
        note = self._text(note, "note")
        if confidence is not None and not 1 <= confidence <= 5:
            raise BadInput("confidence: expected 1..5")
        if verdict not in VERDICTS:
            raise BadInput(f"verdict: expected one of {', '.join(VERDICTS)}, got {verdict!r}")
        if verdict != "best" and position is not None:
            raise BadInput(f"choice: a {verdict!r} label picks no continuation")
        if verdict == "best" and position is None:
            raise BadInput("choice: pick the best continuation (or say they are equally good, or none is acceptable)")
        now = utcnow()
        with self.store.session(write=False) as s:  # one read transaction for the checks
            found = s.execute(select(ItemRow.k, ItemRow.is_gold).where(ItemRow.id == item_id)).first()
            if found is None:
                raise NotFound(f"item {item_id}: no such item")
            k, is_gold = found
            if position is not None and not 1 <= position <= k:
                raise BadInput(f"choice: expected a position 1..{k}, got {position}")
            lock = self.assigner.current_lock(s, who.id, item_id)
            locked_at = lock.locked_at if lock is not None else None
            done = s.scalar(select(ComparisonRow.id).where(ComparisonRow.item_id == item_id,
                                                          ComparisonRow.labeler_id == who.id))
            skipped = s.scalar(select(SkipRow.id).where(SkipRow.item_id == item_id, SkipRow.labeler_id == who.id))
        if skipped is not None:
            raise Conflict(f"item {item_id}: you skipped it; take the next item")
        if done is not None:
            raise Conflict(f"item {item_id}: you already labeled it (label {done}); take the next item")
        if locked_at is None:
            raise Conflict(f"item {item_id} is not assigned to you (its hold may have been released); "
                           "take the next item")
        server_s = max(0.0, (now - locked_at).total_seconds())
        taken = server_s
        if client_elapsed_s is not None and math.isfinite(client_elapsed_s) and client_elapsed_s >= 0:
            taken = min(client_elapsed_s, server_s + 1.0)  # the page's own clock, never beyond the server's
        too_fast = taken < self.settings.too_fast_s
        order = self.order(who.id, item_id, k)
        chosen = order[position - 1] if position is not None else None
        try:
            with self.store.transaction():
                rec = self.store.add_comparison(
                    item_id, chosen, who.id, shown_order=order, time_taken_s=round(taken, 3), flagged=flagged,
                    note=note, too_fast=too_fast, confidence=confidence, via=who.via, api_token_id=who.token_id,
                    verdict=verdict)
                detail = dict(item_id=item_id, comparison_id=rec.id, verdict=verdict, chosen=chosen, position=position,
                              time_taken_s=round(taken, 3), too_fast=too_fast, guideline_version=rec.guideline_version,
                              via=who.via, api_token_id=who.token_id)
                self.store.append_audit(who.name, "label", detail)
                if flagged:
                    self.store.append_audit(who.name, "flag", dict(item_id=item_id, comparison_id=rec.id, note=note))
        except DuplicateLabelError:
            raise Conflict(f"item {item_id}: you already labeled it; take the next item") from None
        except DataError as e:
            raise BadInput(str(e)) from None
        # The lock stays until this labeler's next assignment deletes it (it no longer counts).
        return dict(comparison_id=rec.id, item_id=item_id, verdict=verdict, chosen=chosen, position=position,
                    too_fast=too_fast, time_taken_s=round(taken, 3), flagged=flagged,
                    guideline_version=rec.guideline_version,
                    gold=self.gold_feedback(who, item_id) if is_gold else None)

    def gold_feedback(self, who: Principal, item_id: int) -> Optional[dict]:
        """When ``who`` labeled gold item ``item_id`` and missed its answer (another continuation, a tie or
        "none acceptable"): the expected choice, as the position they saw it at and its text, what they
        said, and the researchers' explanation. None otherwise (a hit, an ordinary item, no label)."""
        with self.store.session(write=False) as s:
            row = s.execute(select(ComparisonRow.chosen, ComparisonRow.verdict, ComparisonRow.shown_order,
                                   ItemRow.is_gold, ItemRow.gold_choice, ItemRow.gold_explanation)
                            .join(ItemRow, ItemRow.id == ComparisonRow.item_id)
                            .where(ComparisonRow.item_id == item_id, ComparisonRow.labeler_id == who.id,
                                   ~ComparisonRow.adjudication)).first()
        if row is None or not row.is_gold or row.gold_choice is None:
            return None
        if row.verdict == "best" and row.chosen == row.gold_choice:
            return None
        (content,) = self.store.item_contents([item_id])
        order = list(row.shown_order)
        expected_position = order.index(row.gold_choice) + 1
        yours = (dict(verdict="best", position=order.index(row.chosen) + 1) if row.verdict == "best"
                 else dict(verdict=row.verdict, position=None))
        return dict(item_id=item_id, expected_position=expected_position,
                    expected_text=content.samples[row.gold_choice].text, prompt=content.query.text,
                    explanation=row.gold_explanation or "", yours=yours)

    def skip(self, who: Principal, item_id: int, reason: str) -> dict:
        """Skip an item with a reason: it goes back to the queue for someone else."""
        reason = self._text(reason, "reason") or ""
        if not reason.strip():
            raise BadInput("reason: say why you skip (choose a reason or type one)")
        if self.store.get_item(item_id) is None:
            raise NotFound(f"item {item_id}: no such item")
        with self.store.session(write=False) as s:
            if self.assigner.current_lock(s, who.id, item_id) is None:
                raise Conflict(f"item {item_id} is not assigned to you; take the next item")
            if s.scalar(select(SkipRow.id).where(SkipRow.item_id == item_id, SkipRow.labeler_id == who.id)):
                raise Conflict(f"item {item_id}: you already skipped it")
            if s.scalar(select(ComparisonRow.id).where(ComparisonRow.item_id == item_id,
                                                       ComparisonRow.labeler_id == who.id)):
                raise Conflict(f"item {item_id}: you already labeled it")
        try:
            with self.store.transaction():
                rec = self.store.add_skip(item_id, who.id, reason)
                self.store.append_audit(who.name, "skip", dict(item_id=item_id, skip_id=rec.id, reason=reason,
                                                               via=who.via, api_token_id=who.token_id))
        except DataError as e:
            raise BadInput(str(e)) from None
        return dict(skip_id=rec.id, item_id=item_id, reason=reason)

    def progress(self, who: Principal) -> dict:
        now = utcnow()
        with self.store.session(write=False) as s:
            mine = and_(ComparisonRow.labeler_id == who.id, ~ComparisonRow.adjudication)
            total = s.scalar(select(func.count(ComparisonRow.id)).where(mine)) or 0
            last_hour = s.scalar(select(func.count(ComparisonRow.id)).where(
                mine, ComparisonRow.created_at > now - dt.timedelta(hours=1))) or 0
            today = s.scalar(select(func.count(ComparisonRow.id)).where(
                mine, ComparisonRow.created_at > now - dt.timedelta(hours=24))) or 0
            flagged = s.scalar(select(func.count(ComparisonRow.id)).where(mine, ComparisonRow.flagged)) or 0
            too_fast = s.scalar(select(func.count(ComparisonRow.id)).where(mine, ComparisonRow.too_fast)) or 0
            times = [t for t in s.scalars(select(ComparisonRow.time_taken_s).where(mine).order_by(
                ComparisonRow.id.desc()).limit(500)) if t is not None]
            skips = s.scalar(select(func.count(SkipRow.id)).where(SkipRow.labeler_id == who.id)) or 0
            available = self.assigner.available_count(who.id, session=s)
        return dict(labeler=who.name, labels_total=int(total), labels_last_hour=int(last_hour),
                    labels_today=int(today), flagged_total=int(flagged), too_fast_total=int(too_fast),
                    skips_total=int(skips), median_time_s=quantile(times, 0.5), available=int(available))

    def _text(self, value: Optional[str], what: str) -> Optional[str]:
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadInput(f"{what}: expected text")
        if len(value) > self.settings.max_text_chars:
            raise BadInput(f"{what}: at most {self.settings.max_text_chars} characters")
        if "\x00" in value:
            raise BadInput(f"{what}: NUL characters are not allowed")
        value = value.strip()
        return value or None
