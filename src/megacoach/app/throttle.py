"""Throttles of the labeling app: failed log-ins and request rates.

Failed log-ins are counted per client address and per client address + account name
(``LoginThrottle``). After a few free failures a client must wait before its next try, the wait
doubling with each further failure (bounded). Nothing is keyed by the account alone, so no
amount of failures from elsewhere keeps the right password out.

The app keeps these counts in the label store (``StoreLoginThrottle``, table ``login_failures``), so
that every server process (``megacoach label serve --workers N``) and every restart slows down the same
clients; ``LoginThrottle`` with ``FailureTable`` is the same rule in memory, per process. The rule is
one (``backoff``): the store only changes where the counts live.

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
from typing import Hashable, Optional

from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session

from megacoach.app.settings import AppSettings
from megacoach.labels.schema import LoginFailureRow
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

    Refused tries are counted in this process only (they decide whether a refusal is worth an audit
    entry, and counting them in the store would make every refused try a write): with N processes a
    client in backoff is audited at most N times per failure instead of once.

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
        self._fails = 0
        self._refused: OrderedDict[tuple[str, float], int] = OrderedDict()  # (key, last failure) -> refused
        self._lock = threading.Lock()

    def delay(self, count: int) -> float:
        return backoff(count, self.free, self.backoff_s, self.max_s)

    def row_key(self, key: Hashable) -> str:
        parts = key if isinstance(key, tuple) else (key,)
        return hashlib.sha256("\x00".join((self.kind, *map(str, parts))).encode()).hexdigest()

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

    def refusal(self, key: Hashable) -> int:
        """Count a refused try (one made while waiting); returns how many this process has seen since
        the key's last failure."""
        with self.store.session(write=False) as s:
            found = self._row(s, key, self.clock())
        if found is None:
            return 0
        tag = (self.row_key(key), found[1])
        with self._lock:
            n = self._refused.pop(tag, 0) + 1
            self._refused[tag] = n
            while len(self._refused) > self.max_entries:
                self._refused.popitem(last=False)
        return n

    def fail(self, key: Hashable, now: Optional[float] = None, session: Optional[Session] = None) -> None:
        """One more failure of this key (its count starts again after ``forget_s`` without one)."""
        now = self.clock() if now is None else now
        if session is None:
            with self.store.session() as s, s.begin():
                self.fail(key, now, s)
            return
        rk = self.row_key(key)
        if session.get_bind().dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        t = LoginFailureRow.__table__
        stmt = insert(t).values(key=rk, kind=self.kind, failures=1, last_failed_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.key], set_=dict(
            failures=case((t.c.last_failed_at < now - self.forget_s, 1), else_=t.c.failures + 1),
            last_failed_at=now))
        session.execute(stmt)
        with self._lock:
            self._fails += 1
            prune = self._fails % self.prune_every == 0
        if prune:
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
    check, one write transaction per failure."""

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

    def fail(self, client: str, name: str) -> None:
        now = self.by_client.clock()
        with self.store.session() as s, s.begin():
            self.by_client.fail(client, now, s)
            self.by_pair.fail((client, _name_key(name)), now, s)


class RateLimit:
    """At most ``limit`` events per key within ``window_s`` (sliding window), bounded memory."""

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
