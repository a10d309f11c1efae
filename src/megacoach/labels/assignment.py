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

Concurrency: on SQLite every assignment is one write transaction (the store begins writes with
BEGIN IMMEDIATE, so writers take turns): find, lock, commit. Elsewhere (PostgreSQL) a lock is
taken optimistically (insert, commit, then re-count); when more labelers than free slots raced for
an item, the later locks (higher id) back off and try the next item. Within one process a mutex
serialises assignment to avoid needless retries. A lock whose holder has labeled or skipped the
item no longer counts, and is deleted at the holder's next assignment (no extra commit per label).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from sqlalchemy import and_, bindparam, case, delete, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from megacoach.labels.schema import ComparisonRow, ItemLockRow, ItemRow, SkipRow, UTCDateTime, utcnow


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
    """Hands out items to labelers. ``session_factory()`` returns a new SQLAlchemy Session (on
    SQLite a write session, whose transactions take the write lock at BEGIN)."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        overlap: int = 1,
        lock_timeout_s: float = 900.0,
        window: int = 64,
        clock: Callable[[], dt.datetime] = utcnow,
        sources: Optional[Sequence[str]] = None,
    ) -> None:
        if overlap < 1:
            raise ValueError("overlap must be >= 1")
        self.session_factory = session_factory
        self.overlap = overlap
        self.lock_timeout = dt.timedelta(seconds=lock_timeout_s)
        self.window = window
        self.clock = clock
        self.sources = tuple(sources) if sources else None  # only items of these sources (None: all)
        self._mutex = threading.Lock()
        # Ordinary items below ``_floor`` have all the labels they need. Label counts only grow, so
        # the floor only rises; it never passes items younger than FLOOR_GRACE (on PostgreSQL an
        # item with a lower id can commit after one with a higher id).
        self._floor = 0
        self._calls = 0
        self._stmts: dict = {}

    FLOOR_GRACE = dt.timedelta(minutes=10)

    # ----- queries -------------------------------------------------------------------------
    def _source_filter(self) -> list:
        return [ItemRow.source.in_(self.sources)] if self.sources else []

    def _need(self):
        return _greatest(ItemRow.overlap, self.overlap)

    @staticmethod
    def _labels():
        return select(func.count(ComparisonRow.id)).where(ComparisonRow.item_id == ItemRow.id).scalar_subquery()

    @staticmethod
    def _open_locks(now, labeler_id=None):
        """Unexpired locks on the item whose holder has not labeled or skipped it yet (other than
        ``labeler_id``'s own)."""
        done = or_(
            exists().where(ComparisonRow.item_id == ItemLockRow.item_id, ComparisonRow.labeler_id == ItemLockRow.labeler_id),
            exists().where(SkipRow.item_id == ItemLockRow.item_id, SkipRow.labeler_id == ItemLockRow.labeler_id),
        )
        q = select(func.count(ItemLockRow.id)).where(ItemLockRow.item_id == ItemRow.id, ItemLockRow.expires_at > now, ~done)
        if labeler_id is not None:
            q = q.where(ItemLockRow.labeler_id != labeler_id)
        return q.scalar_subquery()

    def _eligible(self, shared: Optional[bool] = None, limit: Optional[int] = None):
        """A select of item ids labeler ``:me`` may be given at ``:now`` (oldest first); built once
        per variant with bind parameters me, now, floor. shared: True only calibration/gold items,
        False only ordinary ones (id >= floor), None both."""
        key = (shared, limit)
        if key in self._stmts:
            return self._stmts[key]
        me, now, floor = bindparam("me"), bindparam("now", type_=UTCDateTime), bindparam("floor")
        mine_labeled = exists().where(ComparisonRow.item_id == ItemRow.id, ComparisonRow.labeler_id == me)
        mine_skipped = exists().where(SkipRow.item_id == ItemRow.id, SkipRow.labeler_id == me)
        is_shared = or_(ItemRow.is_calibration, ItemRow.is_gold)
        has_room = self._labels() + self._open_locks(now, me) < self._need()
        if shared is True:
            cond = is_shared
        elif shared is False:
            cond = and_(~is_shared, has_room, ItemRow.id >= floor)
        else:
            cond = or_(is_shared, has_room)
        stmt = select(ItemRow.id).where(~mine_labeled, ~mine_skipped, cond, *self._source_filter()).order_by(ItemRow.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        self._stmts[key] = stmt
        return stmt

    def available_count(self, labeler_id: int, session: Optional[Session] = None) -> int:
        """How many items this labeler could be given now (their own lock included)."""
        now = self.clock()
        with _maybe_session(self.session_factory, session) as s:
            total = 0
            for shared in (True, False):
                sub = self._eligible(shared).subquery()
                q = select(func.count()).select_from(sub)
                total += int(s.scalar(q, dict(me=labeler_id, now=now, floor=self._floor)) or 0)
            return total

    def queue_length(self, session: Optional[Session] = None) -> int:
        """Ordinary items still short of labels (calibration and gold items not counted)."""
        with _maybe_session(self.session_factory, session) as s:
            q = select(func.count(ItemRow.id)).where(
                ~ItemRow.is_calibration, ~ItemRow.is_gold, ItemRow.id >= self._floor, self._labels() < self._need(),
                *self._source_filter())
            return int(s.scalar(q) or 0)

    def current_lock(self, session: Session, labeler_id: int, item_id: int) -> Optional[ItemLockRow]:
        """This labeler's lock on the item (expired or not), if any."""
        return session.scalar(
            select(ItemLockRow).where(ItemLockRow.item_id == item_id, ItemLockRow.labeler_id == labeler_id)
        )

    def _raise_floor(self, s: Session, now: dt.datetime) -> None:
        first_open = s.scalar(
            select(func.min(ItemRow.id)).where(
                ItemRow.id >= self._floor, ~ItemRow.is_calibration, ~ItemRow.is_gold, *self._source_filter(),
                or_(self._labels() < self._need(), ItemRow.created_at > now - self.FLOOR_GRACE)))
        if first_open is None:
            first_open = (s.scalar(select(func.max(ItemRow.id))) or 0) + 1
            young = s.scalar(select(func.min(ItemRow.id)).where(ItemRow.created_at > now - self.FLOOR_GRACE))
            if young is not None:
                first_open = min(first_open, young)
        self._floor = max(self._floor, int(first_open))

    # ----- assignment ----------------------------------------------------------------------
    def next_item(self, labeler_id: int) -> Optional[Assignment]:
        """The item this labeler should label now, locked for them; None when nothing is left.

        A labeler who reloads the page gets the item they already hold (its lock is renewed)."""
        with self._mutex:
            return self._next_item(labeler_id)

    def _next_item(self, labeler_id: int) -> Optional[Assignment]:
        now = self.clock()
        with self.session_factory() as s:
            serialised = s.get_bind().dialect.name == "sqlite"  # BEGIN IMMEDIATE: one writer at a time
            self._calls += 1
            # This labeler's finished locks (item labeled or skipped) go now, in this transaction.
            finished = or_(
                exists().where(ComparisonRow.item_id == ItemLockRow.item_id, ComparisonRow.labeler_id == labeler_id),
                exists().where(SkipRow.item_id == ItemLockRow.item_id, SkipRow.labeler_id == labeler_id),
            )
            s.execute(delete(ItemLockRow).where(ItemLockRow.labeler_id == labeler_id, finished))
            if self._calls % 200 == 1:
                s.execute(delete(ItemLockRow).where(ItemLockRow.expires_at < now - self.lock_timeout))
            if self._calls % 20 == 1:
                self._raise_floor(s, now)
            held = s.execute(
                select(ItemLockRow, ItemRow)
                .join(ItemRow, ItemRow.id == ItemLockRow.item_id)
                .where(ItemLockRow.labeler_id == labeler_id, ItemLockRow.expires_at > now)
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
                params = dict(me=labeler_id, now=now, floor=self._floor)
                ids = list(s.scalars(self._eligible(False, self.window), params))
                ids += list(s.scalars(self._eligible(True, self.window), params))
                ids = [i for i in ids if i not in tried]
                if not ids:
                    s.commit()
                    return None
                ids.sort(key=lambda i: _mix_key(labeler_id, i))
                for item_id in ids:
                    tried.add(item_id)
                    got = self._try_lock(s, labeler_id, item_id, now, serialised)
                    if got is not None:
                        return got
            s.commit()
            return None

    def _try_lock(self, s: Session, labeler_id: int, item_id: int, now: dt.datetime,
                  serialised: bool) -> Optional[Assignment]:
        item = s.get(ItemRow, item_id)
        if item is None:
            return None
        k = item.k
        # A stale lock row of ours (expired) is replaced so that the new lock gets a fresh id.
        s.execute(delete(ItemLockRow).where(ItemLockRow.item_id == item_id, ItemLockRow.labeler_id == labeler_id))
        lock = ItemLockRow(item_id=item_id, labeler_id=labeler_id, locked_at=now, expires_at=now + self.lock_timeout)
        s.add(lock)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            return None
        if not serialised:  # concurrent writers: re-count, the later locks back off
            shared, need = item.is_calibration or item.is_gold, max(item.overlap, self.overlap)
            if not shared:
                labels = s.scalar(select(func.count(ComparisonRow.id)).where(ComparisonRow.item_id == item_id)) or 0
                earlier = s.scalar(
                    select(func.count(ItemLockRow.id)).where(
                        ItemLockRow.item_id == item_id,
                        ItemLockRow.labeler_id != labeler_id,
                        ItemLockRow.expires_at > now,
                        ItemLockRow.id < lock.id,
                        ~exists().where(ComparisonRow.item_id == item_id, ComparisonRow.labeler_id == ItemLockRow.labeler_id),
                        ~exists().where(SkipRow.item_id == item_id, SkipRow.labeler_id == ItemLockRow.labeler_id),
                    )
                ) or 0
                if labels + earlier >= need:
                    s.delete(lock)
                    s.commit()
                    return None
            s.commit()
        return Assignment(item_id, k, shown_order(labeler_id, item_id, k), now, now + self.lock_timeout)

    def release(self, session: Session, labeler_id: int, item_id: int) -> None:
        """Drop this labeler's lock on the item; the caller commits. (Optional: a lock whose holder
        labeled or skipped the item no longer counts, and goes at the holder's next assignment.)"""
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
