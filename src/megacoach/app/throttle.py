"""Throttles of the labeling app: failed log-ins and request rates.

Failed log-ins are counted per client address and per client address + account name
(``LoginThrottle``). After a few free failures a client must wait before its next try, the wait
doubling with each further failure (bounded). Nothing is keyed by the account alone, so no
amount of failures from elsewhere keeps the right password out.

The app keeps these counts in the label store (``StoreLoginThrottle``, table ``login_failures``), so
that every server process (``megacoach label serve --workers N``) and every restart slows down the same
clients; ``LoginThrottle`` with ``FailureTable`` is the same rule in memory, per process. The rule is
one (``backoff``): the store only changes where the counts live. A throttled client's first refused try
after a failure is noted in the store too (``refusal_noted_at``), so it is audited once in all.

Request rates (the Andon cord's requests per client address and person) are limited in a sliding
window: ``StoreRateLimit`` keeps the windows in the store (table ``rate_limits``), so the limit and the
audit of a key's first refusal in a window hold for all server processes together; ``RateLimit`` is the
same rule in memory, per process.

Memory is bounded: each table holds at most ``max_entries`` keys. When full, it first forgets
expired entries, then clients that are not being slowed down (least recently failed first);
clients in backoff go last, so a spray of other names cannot make it forget the one it attacks.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import unicodedata
from collections import OrderedDict, deque
from typing import Any, Hashable, Optional

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.orm import Session

from megacoach.app.settings import AppSettings
from megacoach.labels.schema import LoginFailureRow, RateLimitRow
from megacoach.labels.store import LabelStore


def backoff(count: int, free: int, backoff_s: float, max_s: float) -> float:
    """Seconds a key must wait after its ``count``-th failure: nothing for the first ``free - 1``;
    after failure number ``free + n``, ``min(max_s, backoff_s * 2**n)``."""
    if count < free:
        return 0.0
    return min(max_s, backoff_s * 2.0 ** min(count - free, 60))


class _Entry:
    __slots__ = ("count", "last", "refused")

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.refused = 0


class FailureTable:
    """Failures per key with exponential backoff: the first ``free`` failures cost nothing; after
    failure number ``free + n`` the key must wait ``min(max_s, backoff_s * 2**n)`` seconds.
    A key's history is forgotten ``forget_s`` after its last failure."""

    def __init__(self, free: int, backoff_s: float, max_s: float, forget_s: float, max_entries: int) -> None:
        self.free = free
        self.backoff_s = backoff_s
        self.max_s = max_s
        self.forget_s = forget_s
        self.max_entries = max_entries
        self._light: OrderedDict[Hashable, _Entry] = OrderedDict()  # below ``free``, oldest failure first
        self._heavy: OrderedDict[Hashable, _Entry] = OrderedDict()  # in backoff, oldest failure first
        self._lock = threading.Lock()

    clock = staticmethod(time.monotonic)

    def delay(self, count: int) -> float:
        return backoff(count, self.free, self.backoff_s, self.max_s)

    def _get(self, key: Hashable, now: float) -> Optional[_Entry]:
        e = self._light.get(key) or self._heavy.get(key)
        if e is not None and now - e.last > self.forget_s:
            self._light.pop(key, None)
            self._heavy.pop(key, None)
            return None
        return e

    def wait(self, key: Hashable, now: Optional[float] = None) -> float:
        """Seconds this key must still wait before its next try (0: it may try now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            e = self._get(key, now)
            return 0.0 if e is None else max(0.0, e.last + self.delay(e.count) - now)

    def refusal(self, key: Hashable) -> int:
        """Count a refused try (one made while waiting); returns how many since the last failure."""
        with self._lock:
            e = self._light.get(key) or self._heavy.get(key)
            if e is None:
                return 0
            e.refused += 1
            return e.refused

    def fail(self, key: Hashable, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            e = self._get(key, now)
            self._light.pop(key, None)
            self._heavy.pop(key, None)
            e = e or _Entry()
            e.count += 1
            e.last = now
            e.refused = 0
            (self._heavy if e.count >= self.free else self._light)[key] = e
            self._evict(now)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._light.pop(key, None)
            self._heavy.pop(key, None)

    def _evict(self, now: float) -> None:
        for table in (self._light, self._heavy):  # expired entries first (the oldest are at the front)
            while table and now - next(iter(table.values())).last > self.forget_s:
                table.popitem(last=False)
        while len(self._light) + len(self._heavy) > self.max_entries:
            (self._light if self._light else self._heavy).popitem(last=False)

    def __len__(self) -> int:
        return len(self._light) + len(self._heavy)


def _name_key(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip().casefold()


def _row_key(kind: str, key: Hashable) -> str:
    """A store row's key: SHA-256 of the kind and the key's parts (no address or name in the clear)."""
    parts = key if isinstance(key, tuple) else (key,)
    return hashlib.sha256("\x00".join((kind, *map(str, parts))).encode()).hexdigest()


class _PruneTally:
    """When a store-backed table prunes: True on every ``every``-th event counted in this process (from any
    request thread)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._count = 0
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            self._count += 1
            return self._count % self.every == 0


def _insert(session: Session) -> Any:
    """The ``insert`` of the session's dialect (PostgreSQL or SQLite: both have ON CONFLICT)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


class LoginThrottle:
    """Failed log-ins per client address and per client address + name (see the module doc)."""

    def __init__(self, settings: AppSettings) -> None:
        s = settings
        self.by_client = FailureTable(s.login_client_free_failures, s.login_backoff_s, s.login_backoff_max_s,
                                      s.login_forget_s, s.login_throttle_entries)
        self.by_pair = FailureTable(s.login_free_failures, s.login_backoff_s, s.login_backoff_max_s,
                                    s.login_forget_s, s.login_throttle_entries)

    def retry_after(self, client: str, name: str) -> int:
        """Whole seconds this client must wait before trying this name again (0: it may try now)."""
        wait = max(self.by_client.wait(client), self.by_pair.wait((client, _name_key(name))))
        return int(math.ceil(wait)) if wait > 0 else 0

    def refusal(self, client: str, name: str) -> int:
        """Count a refused try; 1 for the first one since the last failure (worth an audit entry)."""
        return max(self.by_client.refusal(client), self.by_pair.refusal((client, _name_key(name))))

    def fail(self, client: str, name: str) -> None:
        now = self.by_client.clock()
        self.by_client.fail(client, now)
        self.by_pair.fail((client, _name_key(name)), now)

    def success(self, client: str, name: str) -> None:
        """The right password: this client's failures for this name are forgotten (its failures
        for other names still count)."""
        self.by_pair.forget((client, _name_key(name)))

    def size(self) -> int:
        return len(self.by_client) + len(self.by_pair)


class StoreFailureTable:
    """``FailureTable``'s rule with the counts in the label store's ``login_failures`` (one row per key,
    ``kind`` telling the tables apart), so that every server process sees the same counts. Times are
    wall-clock seconds (``time.time``), which all processes share.

    Refused tries are not counted (that would make every refused try a write); only the first since a
    key's last failure is noted in its row (``refusal_noted_at``, cleared by each failure), one write per
    failure at most, so that it is audited once whichever process refused it.

    Bounded like ``FailureTable``: every ``prune_every`` failures (in this process) the expired rows
    go, then, while there are more than ``max_entries``, the least recently failed clients that are
    not being slowed down, and the clients in backoff last."""

    clock = staticmethod(time.time)

    def __init__(self, store: LabelStore, kind: str, free: int, backoff_s: float, max_s: float, forget_s: float,
                 max_entries: int) -> None:
        self.store = store
        self.kind = kind
        self.free = free
        self.backoff_s = backoff_s
        self.max_s = max_s
        self.forget_s = forget_s
        self.max_entries = max_entries
        self.prune_every = max(1, min(100, max_entries // 100))
        self._prunes = _PruneTally(self.prune_every)  # counts failures

    def delay(self, count: int) -> float:
        return backoff(count, self.free, self.backoff_s, self.max_s)

    def row_key(self, key: Hashable) -> str:
        return _row_key(self.kind, key)

    def _row(self, s: Session, key: Hashable, now: float) -> Optional[tuple[int, float]]:
        row = s.execute(select(LoginFailureRow.failures, LoginFailureRow.last_failed_at)
                        .where(LoginFailureRow.key == self.row_key(key))).first()
        if row is None or now - row.last_failed_at > self.forget_s:
            return None
        return int(row.failures), float(row.last_failed_at)

    def wait(self, key: Hashable, now: Optional[float] = None, session: Optional[Session] = None) -> float:
        """Seconds this key must still wait before its next try (0: it may try now)."""
        now = self.clock() if now is None else now
        if session is None:
            with self.store.session(write=False) as s:
                return self.wait(key, now, s)
        found = self._row(session, key, now)
        if found is None:
            return 0.0
        count, last = found
        return max(0.0, last + self.delay(count) - now)

    def noted(self, s: Session, key: Hashable, now: float) -> Optional[bool]:
        """Whether a refused try since the key's last failure was noted already (None: no failures)."""
        t = LoginFailureRow.__table__
        row = s.execute(select(t.c.last_failed_at, t.c.refusal_noted_at).where(t.c.key == self.row_key(key))).first()
        if row is None or now - row.last_failed_at > self.forget_s:
            return None
        return row.refusal_noted_at is not None

    def note(self, s: Session, key: Hashable, now: float) -> bool:
        """Note a refused try in the key's row; True when it is the first since the key's last failure
        (of all processes': one of them wins)."""
        t = LoginFailureRow.__table__
        return s.execute(update(t).where(t.c.key == self.row_key(key), t.c.refusal_noted_at.is_(None),
                                         t.c.last_failed_at >= now - self.forget_s)
                         .values(refusal_noted_at=now)).rowcount == 1

    def refusal(self, key: Hashable) -> int:
        """A refused try (one made while waiting): 1 for the first since the key's last failure, in any
        process (worth an audit entry); 2 for a later one; 0 when the key has no failures. Only the first
        is written."""
        now = self.clock()
        with self.store.session(write=False) as s:
            noted = self.noted(s, key, now)
        if noted is None:
            return 0
        if noted:
            return 2
        with self.store.session() as s, s.begin():
            return 1 if self.note(s, key, now) else 2

    def fail(self, key: Hashable, now: Optional[float] = None, session: Optional[Session] = None) -> None:
        """One more failure of this key (its count starts again after ``forget_s`` without one)."""
        now = self.clock() if now is None else now
        if session is None:
            with self.store.session() as s, s.begin():
                self.fail(key, now, s)
            return
        t = LoginFailureRow.__table__
        stmt = _insert(session)(t).values(key=self.row_key(key), kind=self.kind, failures=1, last_failed_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.key], set_=dict(
            failures=case((t.c.last_failed_at < now - self.forget_s, 1), else_=t.c.failures + 1),
            last_failed_at=now, refusal_noted_at=None))
        session.execute(stmt)
        if self._prunes.due():
            self._prune(session, now)

    def _prune(self, s: Session, now: float) -> None:
        t = LoginFailureRow.__table__
        mine = t.c.kind == self.kind
        s.execute(delete(t).where(mine, t.c.last_failed_at < now - self.forget_s))
        over = int(s.scalar(select(func.count()).select_from(t).where(mine)) or 0) - self.max_entries
        if over > 0:  # clients not being slowed down first, the least recently failed first
            in_backoff = case((t.c.failures >= self.free, 1), else_=0)
            doomed = select(t.c.key).where(mine).order_by(in_backoff, t.c.last_failed_at).limit(over)
            s.execute(delete(t).where(t.c.key.in_(doomed.scalar_subquery())))

    def forget(self, key: Hashable) -> None:
        with self.store.session() as s, s.begin():
            s.execute(delete(LoginFailureRow).where(LoginFailureRow.key == self.row_key(key)))

    def __len__(self) -> int:
        with self.store.session(write=False) as s:
            return int(s.scalar(select(func.count()).select_from(LoginFailureRow)
                                .where(LoginFailureRow.kind == self.kind)) or 0)


class StoreLoginThrottle(LoginThrottle):
    """``LoginThrottle`` with its two tables in the label store (what the app uses): one read for a
    check, one write transaction per failure; a refused try costs one more read, and the first since a
    failure one more write."""

    def __init__(self, store: LabelStore, settings: AppSettings) -> None:
        s = settings
        self.store = store
        self.by_client = StoreFailureTable(store, "client", s.login_client_free_failures, s.login_backoff_s,
                                           s.login_backoff_max_s, s.login_forget_s, s.login_throttle_entries)
        self.by_pair = StoreFailureTable(store, "pair", s.login_free_failures, s.login_backoff_s,
                                         s.login_backoff_max_s, s.login_forget_s, s.login_throttle_entries)

    def retry_after(self, client: str, name: str) -> int:
        now = self.by_client.clock()
        with self.store.session(write=False) as s:
            wait = max(self.by_client.wait(client, now, s), self.by_pair.wait((client, _name_key(name)), now, s))
        return int(math.ceil(wait)) if wait > 0 else 0

    def refusal(self, client: str, name: str) -> int:
        """A refused try: 1 for the first one since the last failure, in any process (worth an audit
        entry), else 2 (0 without failures). As ``LoginThrottle.refusal``'s maximum of the two tables:
        1 only when each table with failures notes its first refused try now. One read; one write
        only for a first refused try."""
        now = self.by_client.clock()
        keys = ((self.by_client, client), (self.by_pair, (client, _name_key(name))))
        with self.store.session(write=False) as s:
            live = [(table, key, noted) for table, key in keys
                    if (noted := table.noted(s, key, now)) is not None]
        if not live:
            return 0
        fresh = [(table, key) for table, key, noted in live if not noted]
        claimed = []
        if fresh:
            with self.store.session() as s, s.begin():
                claimed = [table.note(s, key, now) for table, key in fresh]
        return 1 if len(fresh) == len(live) and all(claimed) else 2

    def fail(self, client: str, name: str) -> None:
        now = self.by_client.clock()
        with self.store.session() as s, s.begin():
            self.by_client.fail(client, now, s)
            self.by_pair.fail((client, _name_key(name)), now, s)


class RateLimit:
    """At most ``limit`` events per key within ``window_s`` (sliding window), bounded memory; in this
    process only (``StoreRateLimit`` is the same rule for all processes)."""

    def __init__(self, limit: int, window_s: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._events: OrderedDict[Hashable, deque[float]] = OrderedDict()
        self._noted: OrderedDict[Hashable, float] = OrderedDict()  # when a refusal of the key was last noted
        self._lock = threading.Lock()

    def hit(self, key: Hashable, now: Optional[float] = None) -> int:
        """Count one event; returns 0 when allowed, else the whole seconds until the next is allowed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._events.pop(key, None) or deque()
            while q and now - q[0] >= self.window_s:
                q.popleft()
            self._events[key] = q  # most recently used last
            while len(self._events) > self.max_keys:
                self._events.popitem(last=False)
            if len(q) >= self.limit:
                return max(1, int(math.ceil(q[0] + self.window_s - now)))
            q.append(now)
            return 0

    def note_refusal(self, key: Hashable, now: Optional[float] = None) -> bool:
        """True for the first refusal of this key within a window (worth an audit entry), else False."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._noted.pop(key, None)
            first = last is None or now - last >= self.window_s
            self._noted[key] = now if first else last
            while len(self._noted) > self.max_keys:
                self._noted.popitem(last=False)
            return first


class StoreRateLimit:
    """``RateLimit``'s rule with the windows in the label store's ``rate_limits`` (one row per key,
    ``kind`` telling the limits apart), so that all server processes together let through at most
    ``limit`` events per key within ``window_s``, and note a key's first refusal in a window once. Times
    are wall-clock seconds (``time.time``), which all processes share.

    An event refused costs one read (and the first refusal in a window one write); one let through, one
    write transaction: a key's first event in the window is one insert, later ones are re-checked under
    the key's row lock (on SQLite under the store's write lock), so two processes never let through more
    than ``limit`` between them.

    Bounded like ``RateLimit``: every ``prune_every`` events let through (in this process), in a
    transaction of its own, the rows older than the window go (they hold nothing that still counts),
    then, while there are more than ``max_keys``, the least recently used."""

    clock = staticmethod(time.time)

    def __init__(self, store: LabelStore, kind: str, limit: int, window_s: float, max_keys: int = 100_000) -> None:
        self.store = store
        self.kind = kind
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self.prune_every = max(1, min(100, max_keys // 100))
        self._prunes = _PruneTally(self.prune_every)  # counts events let through

    def row_key(self, key: Hashable) -> str:
        return _row_key(self.kind, key)

    def _live(self, hits: Optional[list[float]], now: float) -> list[float]:
        """The events still in the window, oldest first."""
        return sorted(t for t in hits or () if now - t < self.window_s)

    def _wait(self, live: list[float], now: float) -> int:
        return max(1, int(math.ceil(live[0] + self.window_s - now)))

    def hit(self, key: Hashable, now: Optional[float] = None) -> int:
        """Count one event; returns 0 when allowed, else the whole seconds until the next is allowed."""
        now = self.clock() if now is None else now
        t = RateLimitRow.__table__
        rk = self.row_key(key)
        with self.store.session(write=False) as s:
            live = self._live(s.scalar(select(t.c.hits).where(t.c.key == rk)), now)
        if len(live) >= self.limit:
            return self._wait(live, now)
        with self.store.session() as s, s.begin():
            first = _insert(s)(t).values(key=rk, kind=self.kind, hits=[now], last_at=now)
            if s.scalar(first.on_conflict_do_nothing(index_elements=[t.c.key]).returning(t.c.key)) is None:
                live = self._live(s.scalar(select(t.c.hits).where(t.c.key == rk).with_for_update()), now)
                if len(live) >= self.limit:  # another process let the last ones through meanwhile
                    return self._wait(live, now)
                s.execute(update(t).where(t.c.key == rk).values(hits=[*live, now], last_at=now))
        if self._prunes.due():
            self._prune(now)
        return 0

    def note_refusal(self, key: Hashable, now: Optional[float] = None) -> bool:
        """True for the first refusal of this key within a window, in any process (worth an audit
        entry), else False."""
        now = self.clock() if now is None else now
        t = RateLimitRow.__table__
        rk = self.row_key(key)
        with self.store.session(write=False) as s:
            noted = s.scalar(select(t.c.refusal_noted_at).where(t.c.key == rk))
        if noted is not None and now - noted < self.window_s:
            return False
        stale = or_(t.c.refusal_noted_at.is_(None), t.c.refusal_noted_at <= now - self.window_s)
        with self.store.session() as s, s.begin():
            stmt = _insert(s)(t).values(key=rk, kind=self.kind, hits=[], last_at=now, refusal_noted_at=now)
            return s.scalar(stmt.on_conflict_do_update(
                index_elements=[t.c.key], set_=dict(refusal_noted_at=now, last_at=now), where=stale)
                .returning(t.c.key)) is not None

    def _prune(self, now: float) -> None:
        t = RateLimitRow.__table__
        mine = t.c.kind == self.kind
        with self.store.session() as s, s.begin():
            s.execute(delete(t).where(mine, t.c.last_at <= now - self.window_s))
            over = int(s.scalar(select(func.count()).select_from(t).where(mine)) or 0) - self.max_keys
            if over > 0:  # the least recently used first
                doomed = select(t.c.key).where(mine).order_by(t.c.last_at).limit(over)
                s.execute(delete(t).where(t.c.key.in_(doomed.scalar_subquery())))

    def __len__(self) -> int:
        with self.store.session(write=False) as s:
            return int(s.scalar(select(func.count()).select_from(RateLimitRow)
                                .where(RateLimitRow.kind == self.kind)) or 0)
