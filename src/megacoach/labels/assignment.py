"""Which item a human evaluator labels next (assignment with overlap, calibration, gold and locks).

Rules
- Ordinary items need ``max(item.overlap, overlap setting)`` labels from different labelers
  (1 by default). An item assigned to a labeler is *locked* for them until the lock times out,
  so two people do not get the same item by accident; an expired lock frees the slot again.
- Calibration items (``is_calibration``) form a shared pool that every labeler labels once;
  gold items (``is_gold``, answered by researchers) are likewise shown to every labeler once.
  Both are mixed into the stream unmarked: the page looks the same for every item.
- A skipped item is never shown to the labeler who skipped it; their lock is released, so the
  item goes back to the queue for someone else.
- Order: among the oldest eligible items (a window of ``window`` items, oldest first so fresh
  batches are labeled promptly) each labeler gets a different, stable pseudo-random order, which
  mixes calibration and gold items in and keeps simultaneous labelers off the same item.
- The continuations are shown in a per-labeler random order, stable per (labeler, item):
  ``shown_order(labeler_id, item_id, k)[p]`` is the canonical index shown at position p.

Concurrency: a lock is taken optimistically (insert, commit, then re-count); when more labelers
than free slots raced for an item, the later locks (higher id) back off and try the next item.
This is safe across processes and on both SQLite and PostgreSQL; within one process a mutex
additionally serialises assignment to avoid needless retries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from sqlalchemy import case, delete, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from megacoach.app.models import ItemLockRow
from megacoach.labels.schema import ComparisonRow, ItemRow, SkipRow, utcnow


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()


def shown_order(labeler_id: int, item_id: int, k: int) -> list[int]:
    """The per-labeler random order of an item's K continuations (stable for a labeler and item)."""
    order = list(range(k))
    random.Random(int.from_bytes(_digest("order", labeler_id, item_id)[:8], "big")).shuffle(order)
    return order


def _mix_key(labeler_id: int, item_id: int) -> int:
    return int.from_bytes(_digest("mix", labeler_id, item_id)[:8], "big")


@dataclass(frozen=True)
class Assignment:
    item_id: int
    k: int
    shown_order: list[int]
    locked_at: dt.datetime
    expires_at: dt.datetime


class Assigner:
    """Hands out items to labelers. ``session_factory()`` returns a new SQLAlchemy Session."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        overlap: int = 1,
        lock_timeout_s: float = 900.0,
        window: int = 64,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        if overlap < 1:
            raise ValueError("overlap must be >= 1")
        self.session_factory = session_factory
        self.overlap = overlap
        self.lock_timeout = dt.timedelta(seconds=lock_timeout_s)
        self.window = window
        self.clock = clock
        self._mutex = threading.Lock()

    # ----- queries -------------------------------------------------------------------------
    def _eligible(self, labeler_id: int, now: dt.datetime):
        """A select of item ids this labeler may be given now (oldest first)."""
        labels = select(func.count(ComparisonRow.id)).where(ComparisonRow.item_id == ItemRow.id).scalar_subquery()
        others_locks = (
            select(func.count(ItemLockRow.id))
            .where(
                ItemLockRow.item_id == ItemRow.id,
                ItemLockRow.labeler_id != labeler_id,
                ItemLockRow.expires_at > now,
            )
            .scalar_subquery()
        )
        need = _greatest(ItemRow.overlap, self.overlap)
        mine_labeled = exists().where(ComparisonRow.item_id == ItemRow.id, ComparisonRow.labeler_id == labeler_id)
        mine_skipped = exists().where(SkipRow.item_id == ItemRow.id, SkipRow.labeler_id == labeler_id)
        shared = or_(ItemRow.is_calibration, ItemRow.is_gold)
        return (
            select(ItemRow.id)
            .where(~mine_labeled, ~mine_skipped, or_(shared, labels + others_locks < need))
            .order_by(ItemRow.id)
        )

    def available_count(self, labeler_id: int, session: Optional[Session] = None) -> int:
        """How many items this labeler could be given now (their own lock included)."""
        now = self.clock()
        with _maybe_session(self.session_factory, session) as s:
            sub = self._eligible(labeler_id, now).subquery()
            return int(s.scalar(select(func.count()).select_from(sub)) or 0)

    def queue_length(self, session: Optional[Session] = None) -> int:
        """Ordinary items still short of labels (calibration and gold items not counted)."""
        with _maybe_session(self.session_factory, session) as s:
            labels = select(func.count(ComparisonRow.id)).where(ComparisonRow.item_id == ItemRow.id).scalar_subquery()
            need = _greatest(ItemRow.overlap, self.overlap)
            q = select(func.count(ItemRow.id)).where(~ItemRow.is_calibration, ~ItemRow.is_gold, labels < need)
            return int(s.scalar(q) or 0)

    def current_lock(self, session: Session, labeler_id: int, item_id: int) -> Optional[ItemLockRow]:
        """This labeler's lock on the item (expired or not), if any."""
        return session.scalar(
            select(ItemLockRow).where(ItemLockRow.item_id == item_id, ItemLockRow.labeler_id == labeler_id)
        )

    # ----- assignment ----------------------------------------------------------------------
    def next_item(self, labeler_id: int) -> Optional[Assignment]:
        """The item this labeler should label now, locked for them; None when nothing is left.

        A labeler who reloads the page gets the item they already hold (its lock is renewed)."""
        with self._mutex:
            return self._next_item(labeler_id)

    def _next_item(self, labeler_id: int) -> Optional[Assignment]:
        now = self.clock()
        with self.session_factory() as s:
            held = s.execute(
                select(ItemLockRow, ItemRow)
                .join(ItemRow, ItemRow.id == ItemLockRow.item_id)
                .where(
                    ItemLockRow.labeler_id == labeler_id,
                    ItemLockRow.expires_at > now,
                    ~exists().where(ComparisonRow.item_id == ItemRow.id, ComparisonRow.labeler_id == labeler_id),
                    ~exists().where(SkipRow.item_id == ItemRow.id, SkipRow.labeler_id == labeler_id),
                )
                .order_by(ItemLockRow.locked_at)
                .limit(1)
            ).first()
            if held is not None:
                lock, item = held
                lock.expires_at = now + self.lock_timeout
                locked_at = lock.locked_at
                s.commit()
                return Assignment(item.id, item.k, shown_order(labeler_id, item.id, item.k), locked_at, now + self.lock_timeout)
            tried: set[int] = set()
            for _ in range(8):  # a few rounds in case other processes win races
                ids = [i for i in s.scalars(self._eligible(labeler_id, now).limit(self.window)) if i not in tried]
                if not ids:
                    return None
                ids.sort(key=lambda i: _mix_key(labeler_id, i))
                for item_id in ids:
                    tried.add(item_id)
                    got = self._try_lock(s, labeler_id, item_id, now)
                    if got is not None:
                        return got
            return None

    def _try_lock(self, s: Session, labeler_id: int, item_id: int, now: dt.datetime) -> Optional[Assignment]:
        # A stale lock row of ours (expired) is replaced so that the new lock gets a fresh id.
        s.execute(delete(ItemLockRow).where(ItemLockRow.item_id == item_id, ItemLockRow.labeler_id == labeler_id))
        lock = ItemLockRow(item_id=item_id, labeler_id=labeler_id, locked_at=now, expires_at=now + self.lock_timeout)
        s.add(lock)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            return None
        item = s.get(ItemRow, item_id)
        if item is None:
            self._drop(s, lock)
            return None
        if not (item.is_calibration or item.is_gold):
            need = max(item.overlap, self.overlap)
            labels = s.scalar(select(func.count(ComparisonRow.id)).where(ComparisonRow.item_id == item_id)) or 0
            earlier = s.scalar(
                select(func.count(ItemLockRow.id)).where(
                    ItemLockRow.item_id == item_id,
                    ItemLockRow.labeler_id != labeler_id,
                    ItemLockRow.expires_at > now,
                    ItemLockRow.id < lock.id,
                )
            ) or 0
            if labels + earlier >= need:
                self._drop(s, lock)
                return None
        return Assignment(item.id, item.k, shown_order(labeler_id, item.id, item.k), now, lock.expires_at)

    @staticmethod
    def _drop(s: Session, lock: ItemLockRow) -> None:
        s.delete(lock)
        s.commit()

    def release(self, session: Session, labeler_id: int, item_id: int) -> None:
        """Drop this labeler's lock on the item (after a label or a skip); the caller commits."""
        session.execute(delete(ItemLockRow).where(ItemLockRow.item_id == item_id, ItemLockRow.labeler_id == labeler_id))


def _greatest(column, value: int):
    """max(column, value) in SQL, portable (SQLite's scalar max() and PostgreSQL's GREATEST differ)."""
    return case((column > value, column), else_=value)


class _maybe_session:
    def __init__(self, factory: Callable[[], Session], session: Optional[Session]) -> None:
        self.factory = factory
        self.session = session
        self.own: Optional[Session] = None

    def __enter__(self) -> Session:
        if self.session is not None:
            return self.session
        self.own = self.factory()
        return self.own

    def __exit__(self, *exc: object) -> None:
        if self.own is not None:
            self.own.close()
