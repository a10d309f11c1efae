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

How an item is found (revision 0006): ``items.filled`` marks the items that need nothing more from
the ordinary queue (they have their labels, or they are calibration/gold items, served from the shared
pool); the assigner reads the open items through the index ``ix_items_open`` (filled, id), oldest first,
and the shared pool through ``ix_items_is_calibration`` / ``ix_items_is_gold``. Finished items are not
read again: the assigner marks an item filled when it finds it full (at the holder's next assignment, or
when a scan passes it, e.g. after labels from the command line). The mark only skips items; whether an
item has room is always counted from its labels and locks. A server that runs with a larger ``--overlap``
than the marks were made with re-checks them once when it starts (every server on one store should use
the same ``--overlap``). A scan still reads the open items this labeler cannot take (held by others,
skipped or already labeled by them while others still need to label them), which is a few per labeler.

Concurrency: an assignment reads its candidates first, without holding the write lock (a read
transaction; on SQLite in WAL mode readers do not wait for the writer), then, in a short write
transaction, re-checks the chosen candidate, locks it and commits. On SQLite writers take turns
(``BEGIN IMMEDIATE``, and within one process the store's write lock), so the re-check is exact. On
PostgreSQL the re-check first locks the item's row (``SELECT ... FOR NO KEY UPDATE``), so two processes
that race for the last free slot of an item take turns, and the later one sees the earlier one's lock.
A candidate taken meanwhile is passed over (and, when all are, the assigner looks again). A lock whose
holder has labeled or skipped the item no longer counts, and is deleted at the holder's next assignment
(no extra commit per label). Nothing here is kept per process except statement caches and a call
counter, so any number of server processes can share one store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from sqlalchemy import and_, bindparam, case, delete, exists, false, func, insert, or_, select, true, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from megacoach.errors import StoreError
from megacoach.labels.schema import ComparisonRow, ItemLockRow, ItemRow, SkipRow, UTCDateTime, utcnow

_IN_CHUNK = 500  # ids per IN (...) list
# The assigner's queries are Core statements over the tables (no ORM objects: half the overhead per query)
_ITEMS, _LABELS, _LOCKS, _SKIPS = ItemRow.__table__, ComparisonRow.__table__, ItemLockRow.__table__, SkipRow.__table__
_RETRY_SQLSTATES = ("40P01", "40001")  # PostgreSQL: deadlock detected, serialization failure


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()


def shown_order(labeler_id: int, item_id: int, k: int) -> list[int]:
    """The per-labeler random order of an item's K continuations (stable for a labeler and item)."""
    order = list(range(k))
    random.Random(int.from_bytes(_digest("order", labeler_id, item_id)[:8], "big")).shuffle(order)
    return order


def _mix_key(labeler_id: int, item_id: int) -> int:
    """This labeler's stable pseudo-random rank of an item (orders candidates; nothing stores it)."""
    return int.from_bytes(hashlib.blake2b(b"%d:%d" % (labeler_id, item_id), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Assignment:
    item_id: int
    k: int
    shown_order: list[int]
    locked_at: dt.datetime
    expires_at: dt.datetime


@dataclass
class _Look:
    """What the read phase of one assignment found."""

    mine: list  # this labeler's locks (rows of the "mine" statement), oldest first
    held: Optional[Any]  # the one of them on an item they have not finished, unexpired (renewed, not replaced)
    candidates: list[int]  # item ids with room for this labeler, in this labeler's mixed order
    full: list[int]  # open (unfilled) items found full, or shared: to be marked filled


class Assigner:
    """Hands out items to labelers. ``session_factory()`` returns a new SQLAlchemy Session for writes
    (on SQLite its transactions take the write lock at BEGIN); ``read_session_factory()`` one for the
    reads that find the candidates (default: ``session_factory``; pass the store's read sessions so
    that finding candidates does not hold the write lock)."""

    ROUNDS = 4  # looks per assignment when other labelers took every candidate meanwhile

    def __init__(
        self,
        session_factory: Callable[[], Session],
        overlap: int = 1,
        lock_timeout_s: float = 900.0,
        window: int = 64,
        clock: Callable[[], dt.datetime] = utcnow,
        sources: Optional[Sequence[str]] = None,
        read_session_factory: Optional[Callable[[], Session]] = None,
    ) -> None:
        if overlap < 1:
            raise ValueError("overlap must be >= 1")
        self.session_factory = session_factory
        self.read_session_factory = read_session_factory or session_factory
        self.overlap = overlap
        self.lock_timeout = dt.timedelta(seconds=lock_timeout_s)
        self.window = window
        self.clock = clock
        self.sources = tuple(sources) if sources else None  # only items of these sources (None: all)
        # Marks made by a server with a smaller overlap may be too early for this one: re-checked once.
        self._marks_checked = overlap == 1
        self._calls = 0
        self._stmts: dict = {}

    # ----- queries -------------------------------------------------------------------------
    def _source_filter(self) -> list:
        return [_ITEMS.c.source.in_(self.sources)] if self.sources else []

    def _need(self):
        return _greatest(_ITEMS.c.overlap, self.overlap)

    @staticmethod
    def _labels():
        return select(func.count(_LABELS.c.id)).where(_LABELS.c.item_id == _ITEMS.c.id).scalar_subquery()

    @staticmethod
    def _shared():
        return or_(_ITEMS.c.is_calibration == true(), _ITEMS.c.is_gold == true())

    @staticmethod
    def _open_locks(now, labeler_id=None):
        """Unexpired locks on the item whose holder has not labeled or skipped it yet (other than
        ``labeler_id``'s own)."""
        done = or_(
            exists().where(_LABELS.c.item_id == _LOCKS.c.item_id, _LABELS.c.labeler_id == _LOCKS.c.labeler_id),
            exists().where(_SKIPS.c.item_id == _LOCKS.c.item_id, _SKIPS.c.labeler_id == _LOCKS.c.labeler_id),
        )
        q = select(func.count(_LOCKS.c.id)).where(_LOCKS.c.item_id == _ITEMS.c.id, _LOCKS.c.expires_at > now, ~done)
        if labeler_id is not None:
            q = q.where(_LOCKS.c.labeler_id != labeler_id)
        return q.scalar_subquery()

    def _row_columns(self, me, now) -> list:
        """What decides whether labeler ``me`` may take an item now (one row per item)."""
        return [
            _ITEMS.c.id, _ITEMS.c.k, _ITEMS.c.source, self._shared().label("shared"), self._need().label("need"),
            self._labels().label("labels"), self._open_locks(now, me).label("others"),
            exists().where(_LABELS.c.item_id == _ITEMS.c.id, _LABELS.c.labeler_id == me).label("mine_labeled"),
            exists().where(_SKIPS.c.item_id == _ITEMS.c.id, _SKIPS.c.labeler_id == me).label("mine_skipped"),
        ]

    def _stmt(self, name: str):
        """The statements of an assignment, built once with bind parameters (me, now, after, item)."""
        if name in self._stmts:
            return self._stmts[name]
        me, now = bindparam("me"), bindparam("now", type_=UTCDateTime)
        if name == "mine":  # this labeler's locks, oldest first, and whether they finished the item
            finished = or_(
                exists().where(_LABELS.c.item_id == _LOCKS.c.item_id, _LABELS.c.labeler_id == me),
                exists().where(_SKIPS.c.item_id == _LOCKS.c.item_id, _SKIPS.c.labeler_id == me),
            )
            stmt = (select(_LOCKS.c.id, _LOCKS.c.item_id, _LOCKS.c.locked_at, _LOCKS.c.expires_at,
                           _ITEMS.c.k, finished.label("finished"))
                    .join(_ITEMS, _ITEMS.c.id == _LOCKS.c.item_id)
                    .where(_LOCKS.c.labeler_id == me).order_by(_LOCKS.c.locked_at, _LOCKS.c.id))
        elif name == "scan":  # the oldest open items with room for this labeler (index ix_items_open[_source])
            mine_labeled = exists().where(_LABELS.c.item_id == _ITEMS.c.id, _LABELS.c.labeler_id == me)
            mine_skipped = exists().where(_SKIPS.c.item_id == _ITEMS.c.id, _SKIPS.c.labeler_id == me)
            stmt = (select(_ITEMS.c.id)
                    .where(_ITEMS.c.filled == false(), ~self._shared(), ~mine_labeled, ~mine_skipped,
                           self._labels() + self._open_locks(now, me) < self._need(), *self._source_filter())
                    .order_by(_ITEMS.c.id).limit(self.window))
        elif name in ("sweep", "sweep_all"):  # open items that are full after all (labels from elsewhere), or shared
            upto = [_ITEMS.c.id <= bindparam("upto")] if name == "sweep" else []
            stmt = (select(_ITEMS.c.id)
                    .where(_ITEMS.c.filled == false(), *upto, *self._source_filter(),
                           or_(self._shared(), self._labels() >= self._need()))
                    .order_by(_ITEMS.c.id).limit(_IN_CHUNK))
        elif name == "shared":  # calibration and gold items this labeler has not done
            stmt = (select(_ITEMS.c.id).where(
                self._shared(), ~exists().where(_LABELS.c.item_id == _ITEMS.c.id, _LABELS.c.labeler_id == me),
                ~exists().where(_SKIPS.c.item_id == _ITEMS.c.id, _SKIPS.c.labeler_id == me), *self._source_filter())
                .order_by(_ITEMS.c.id).limit(self.window))
        elif name == "check":  # one candidate, re-checked in the write transaction
            stmt = select(*self._row_columns(me, now)).where(_ITEMS.c.id == bindparam("item"))
        elif name in ("mark", "markable"):  # items found full (:full), or finished just now and full (:done)
            cond = and_(_ITEMS.c.filled == false(), or_(
                _ITEMS.c.id.in_(bindparam("full", expanding=True)),
                and_(_ITEMS.c.id.in_(bindparam("done", expanding=True)),
                     or_(self._shared(), self._labels() >= self._need()))))
            if name == "mark":
                stmt = update(_ITEMS).where(cond).values(filled=True)
            else:  # PostgreSQL: only rows no other transaction holds, so marking never waits
                stmt = select(_ITEMS.c.id).where(cond).with_for_update(skip_locked=True, key_share=True)
        elif name == "mark_ids":
            stmt = update(_ITEMS).where(_ITEMS.c.id.in_(bindparam("ids", expanding=True))).values(filled=True)
        elif name == "drop_mine":  # this labeler's finished or expired locks, by id
            stmt = delete(_LOCKS).where(_LOCKS.c.id.in_(bindparam("ids", expanding=True)))
        elif name == "renew":
            stmt = update(_LOCKS).where(_LOCKS.c.id == bindparam("lock")).values(
                expires_at=bindparam("expires", type_=UTCDateTime))
        elif name == "row_lock":  # PostgreSQL: assignments racing for one item take turns
            stmt = select(_ITEMS.c.id).where(_ITEMS.c.id == bindparam("item")).with_for_update(key_share=True)
        elif name == "lock":
            stmt = insert(_LOCKS)
        else:
            raise KeyError(name)
        self._stmts[name] = stmt
        return stmt

    def _has_room(self, row) -> bool:
        if row.mine_labeled or row.mine_skipped:
            return False
        return bool(row.shared) or row.labels + row.others < row.need

    def available_count(self, labeler_id: int, session: Optional[Session] = None) -> int:
        """How many items this labeler could be given now (their own lock included)."""
        now = self.clock()
        me = labeler_id
        mine_labeled = exists().where(_LABELS.c.item_id == _ITEMS.c.id, _LABELS.c.labeler_id == me)
        mine_skipped = exists().where(_SKIPS.c.item_id == _ITEMS.c.id, _SKIPS.c.labeler_id == me)
        ordinary = and_(_ITEMS.c.filled == false(), ~self._shared(),
                        self._labels() + self._open_locks(now, me) < self._need())
        q = select(func.count(_ITEMS.c.id)).where(or_(self._shared(), ordinary), ~mine_labeled, ~mine_skipped,
                                                 *self._source_filter())
        with _maybe_session(self.read_session_factory, session) as s:
            return int(s.scalar(q) or 0)

    def queue_length(self, session: Optional[Session] = None) -> int:
        """Ordinary items still short of labels (calibration and gold items not counted)."""
        with _maybe_session(self.read_session_factory, session) as s:
            q = select(func.count(_ITEMS.c.id)).where(
                _ITEMS.c.filled == false(), ~self._shared(), self._labels() < self._need(), *self._source_filter())
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
        now = self.clock()
        self._calls += 1
        for _ in range(self.ROUNDS):
            try:
                if not self._marks_checked:
                    self._recheck_marks()
                look = self._look(labeler_id, now)
                got, look_again = self._take(labeler_id, now, look)
            except DBAPIError as e:
                if getattr(e.orig, "sqlstate", None) in _RETRY_SQLSTATES:  # PostgreSQL chose this one to back off
                    continue
                raise StoreError(f"label store: cannot assign an item: {str(e.orig).strip() or e}") from e
            if got is not None or not look_again:
                return got
        return None

    SWEEP_EVERY = 50  # assignments (per process) between sweeps for items that are full but not marked

    def _look(self, labeler_id: int, now: dt.datetime) -> _Look:
        """The read phase: this labeler's locks, then (unless they hold an item) the candidates."""
        with self.read_session_factory() as s:
            mine = s.execute(self._stmt("mine"), dict(me=labeler_id)).all()
            held = next((r for r in mine if not r.finished and r.expires_at > now), None)
            if held is not None:
                return _Look(mine, held, [], [])
            ordinary = list(s.scalars(self._stmt("scan"), dict(me=labeler_id, now=now)))
            shared = list(s.scalars(self._stmt("shared"), dict(me=labeler_id)))
            full: list[int] = []
            if not ordinary or self._calls % self.SWEEP_EVERY == 0:
                # Items labeled past the app are full but not marked: the scan reads (and passes over) them
                # until they are; this finds those it passes (up to its last candidate), to be marked.
                if ordinary:
                    full = list(s.scalars(self._stmt("sweep"), dict(upto=ordinary[-1])))
                else:
                    full = list(s.scalars(self._stmt("sweep_all")))
        ids = ordinary + shared
        ids.sort(key=lambda i: _mix_key(labeler_id, i))
        return _Look(mine, None, ids, full)

    def _take(self, labeler_id: int, now: dt.datetime, look: _Look) -> tuple[Optional[Assignment], bool]:
        """The write phase: tidy this labeler's locks, mark full items, then renew the held lock or lock
        the first candidate that still has room. Returns (assignment, whether to look again)."""
        expires = now + self.lock_timeout
        with self.session_factory() as s:
            serialised = s.get_bind().dialect.name == "sqlite"  # writers take turns: re-checks are exact
            # Finished or expired locks no longer count: deleted by id (this labeler's own rows; finishing
            # is for good, so what the read phase saw still holds). The items just finished may be full.
            stale = [r for r in look.mine if r is not look.held]
            if stale:
                s.execute(self._stmt("drop_mine"), dict(ids=[r.id for r in stale]))
            done = [r.item_id for r in stale if r.finished]
            for i, chunk in enumerate(_chunks(look.full) if look.full else [[]]):
                self._mark(s, list(chunk), done if i == 0 else [], serialised)
            if self._calls % 200 == 1:
                self._drop_expired_locks(s, now, serialised)
            if not serialised:
                s.commit()  # PostgreSQL: the tidying commits apart from the row locks taken below
            if look.held is not None:
                held = look.held
                renewed = s.execute(self._stmt("renew"), dict(lock=held.id, expires=expires)).rowcount
                s.commit()
                if renewed != 1:  # it ended meanwhile (e.g. labeled in another tab): look again
                    return None, True
                return Assignment(held.item_id, held.k, shown_order(labeler_id, held.item_id, held.k),
                                  held.locked_at, expires), False
            for item_id in look.candidates:
                if not serialised:  # racing processes take turns on the item's row
                    s.execute(self._stmt("row_lock"), dict(item=item_id))
                row = s.execute(self._stmt("check"), dict(me=labeler_id, now=now, item=item_id)).first()
                if row is None or not self._has_room(row):
                    if not serialised:
                        s.rollback()  # releases the row lock
                    continue
                try:
                    s.execute(self._stmt("lock"), dict(item_id=item_id, labeler_id=labeler_id, locked_at=now,
                                                        expires_at=expires))
                    s.commit()
                except IntegrityError:  # this labeler's own concurrent request locked it first
                    s.rollback()
                    return None, True
                return Assignment(item_id, row.k, shown_order(labeler_id, item_id, row.k), now, expires), False
            s.commit()
            return None, bool(look.candidates)

    def _mark(self, s: Session, full: list[int], done: list[int], serialised: bool) -> None:
        """Mark filled the items found full (``full``) and those of ``done`` that are full now. On
        PostgreSQL only the rows no other transaction holds (SKIP LOCKED): marking never waits, so it
        cannot deadlock; an item passed over is marked by a later assignment."""
        if not full and not done:
            return
        params = dict(full=full or [0], done=done or [0])  # (no item has id 0)
        if not serialised:
            ids = list(s.scalars(self._stmt("markable"), params))
            if ids:
                s.execute(self._stmt("mark_ids"), dict(ids=ids))
            return
        s.execute(self._stmt("mark"), params)

    def _drop_expired_locks(self, s: Session, now: dt.datetime, serialised: bool) -> None:
        """Delete locks expired long ago (they no longer count; this keeps the table small)."""
        old = _LOCKS.c.expires_at < now - self.lock_timeout
        if not serialised:  # only rows no other transaction holds: never waits
            ids = list(s.scalars(select(_LOCKS.c.id).where(old).with_for_update(skip_locked=True)))
            if not ids:
                return
            old = _LOCKS.c.id.in_(ids)
        s.execute(delete(_LOCKS).where(old).execution_options(synchronize_session=False))

    def _recheck_marks(self) -> None:
        """Unmark ordinary items marked filled with fewer labels than this server's overlap needs."""
        with self.session_factory() as s:
            s.execute(update(_ITEMS).where(_ITEMS.c.filled == true(), ~self._shared(), self._labels() < self._need())
                      .values(filled=False).execution_options(synchronize_session=False))
            s.commit()
        self._marks_checked = True

    def release(self, session: Session, labeler_id: int, item_id: int) -> None:
        """Drop this labeler's lock on the item; the caller commits. (Optional: a lock whose holder
        labeled or skipped the item no longer counts, and goes at the holder's next assignment.)"""
        session.execute(delete(ItemLockRow).where(ItemLockRow.item_id == item_id, ItemLockRow.labeler_id == labeler_id))


def _chunks(seq: Sequence[int], n: int = _IN_CHUNK):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


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
