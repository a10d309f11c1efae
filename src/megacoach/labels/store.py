"""The durable label store: what human evaluators (and mock labelers) said, and about what.

One SQLAlchemy URL holds everything (SQLite file by default; PostgreSQL works the same). Opening a
store migrates it to the newest schema (Alembic, programmatically); a store written by newer code
is refused. Every write is one transaction; plain dataclass records (never ORM objects) come back.

    from megacoach.labels.records import NewSample
    from megacoach.labels.store import LabelStore

    store = LabelStore("sqlite:///runs/demo/labels.db")        # or a path, or "postgresql+psycopg://..."
    content = store.create_item(                                # query + K samples + item, one transaction
        "To be, or not", [12, 7, 99],
        [NewSample("to be.", [5, 6], policy="runs/demo/ckpt-0", iteration=0, seed=1, run_id="demo"),
         NewSample("a rose.", [8, 9], policy="runs/demo/ckpt-0", iteration=0, seed=1, run_id="demo")],
        split="train", batch="offline-0", source="offline")
    alice = store.get_or_create_labeler("alice", kind="person", role="labeler")
    store.add_comparison(content.item.id, chosen=1, labeler=alice, shown_order=[1, 0],
                         guideline_version="v1", time_taken_s=7.5)
    for c in store.comparisons(split="train", after_id=0):   # ComparisonRecord, canonical order
        c.query_token_ids, c.sample_token_ids, c.chosen
    store.position()                                            # max comparison id: checkpoint this

    with store.transaction():                                   # several writes, all or nothing
        ...

    store.create_items([dict(query_text=..., query_token_ids=..., samples=[...], batch=...), ...])  # bulk
    store.add_comparisons([dict(item_id=..., chosen=..., labeler="alice", shown_order=...), ...])  # bulk

Lower-level pieces: add_query / add_samples / add_item; add_skip / skips; items / get_item /
items_without_labels / item_contents; labelers / get_labeler / update_labeler; append_audit /
audit_entries (append-only); pull_andon / andon_pulls; set_run_status / get_run_status /
run_statuses; set_guideline / latest_guideline / get_guideline; session() for in-package queries.

The store is split by who uses it, and ``LabelStore`` combines the parts (every method is
``store.method(...)``): this module holds the engine, sessions, transactions and migration
(``StoreEngine``) and the training side (queries, samples, items, comparisons, position);
people.py the people administration (labelers, skips, guidelines, audit log); control.py run
control (run status, Andon cord); records.py the records, converters and input checks.

The CLI's `megacoach label auto / export / import`:

    from megacoach.labels.labelers import load_labeler, label_items
    from megacoach.labels.io import export_jsonl, export_dataset, import_labels
    label_items(store, load_labeler("vader:noise=0.7"), batch=None, seed=0)   # -> AutoLabelResult
    export_jsonl(store, "labels.jsonl", split=None)                            # -> rows written
    export_dataset(store, "labels_ds")                                         # datasets.Dataset
    import_labels(store, "offline_5k.json", tokenizer)   # OpenAI best-of-K (.json) or our .jsonl

Errors: bad input -> `DataError` (a doubled label -> `DuplicateLabelError`, a DataError); the database
cannot be opened / is locked / is newer than this code -> `StoreError`. Nothing is half-written.

SQLite: WAL journal, busy timeout (`busy_timeout_s`), foreign keys on, writes take the write lock at
BEGIN (``BEGIN IMMEDIATE``) so concurrent writers queue instead of failing: on a lock of the process
and a ``flock`` of ``<file>-writelock``, both woken at once, rather than in SQLite's polling busy
handler (the fallback for other programs' writers). Comparison ids therefore
grow in commit order, and ``comparisons(after_id=position)`` never misses a label. (On PostgreSQL two
writers can commit ids out of order; a reader that must not miss any should re-read a small window.)
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Self, Union

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import and_, create_engine, event, exists, func, insert, inspect, or_, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, aliased
from sqlalchemy.pool import StaticPool

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: SQLite's busy handler alone between processes
    fcntl = None  # type: ignore[assignment]

from megacoach.errors import DataError, MegacoachError, StoreError
from megacoach.labels.control import RunStatuses
from megacoach.labels.people import PeopleAdmin, labeler_row, latest_guideline_row
from megacoach.labels.records import (
    ComparisonRecord,
    DuplicateLabelError,
    LABEL_VIEWS,
    SPLITS,
    ItemContent,
    ItemRecord,
    LabelerRecord,
    LabelerRef,
    NewSample,
    QueryRecord,
    SampleRecord,
    check_choice,
    check_fields,
    check_int,
    check_item_fields,
    check_explanation,
    check_item_spec,
    check_label_extras,
    check_verdict,
    check_via,
    check_sample,
    check_shown_order,
    token_id_list,
)
from megacoach.labels.schema import (
    LABELER_KINDS,
    ComparisonRow,
    ItemRow,
    LabelerRow,
    QueryRow,
    SampleRow,
    item_rec,
    query_rec,
    sample_rec,
    utcnow,
)

DEFAULT_URL = "sqlite:///labels.db"
URL_ENV = "MEGACOACH_LABELS_URL"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_PG_MIGRATION_LOCK = 0x6D636F61  # pg_advisory_xact_lock key, "mcoa"
_IN_CHUNK = 500  # ids per IN (...) list


def _chunks(seq: Sequence[int], n: int = _IN_CHUNK) -> Iterator[Sequence[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class _WriteLock:
    """The write lock of one SQLite file in one process: a thread lock (the process's writers queue
    on it, woken at once) and an exclusive ``flock`` on ``<file>-writelock`` (processes queue on it
    in the kernel, woken at once). SQLite's own busy handler polls every 1 to 100 ms, which leaves the
    database idle while writers wait and lets one process's writers starve another's; it remains the
    fallback for writers that do not take this lock (other programs)."""

    def __init__(self, path: str) -> None:
        self.thread_lock = threading.Lock()
        self.fd: Optional[int] = None
        if fcntl is not None:
            try:
                self.fd = os.open(path + "-writelock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # e.g. a read-only folder: SQLite's busy handler alone
                self.fd = None

    def acquire(self, timeout_s: float) -> None:
        if not self.thread_lock.acquire(timeout=timeout_s):
            raise sqlite3.OperationalError(f"database is locked (waited {timeout_s:g} s for this process's writers)")
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)  # waits while another process's writer commits
            except OSError as e:
                self.thread_lock.release()
                raise sqlite3.OperationalError(f"cannot lock the database's writelock file: {e}") from e

    def release(self) -> None:
        try:
            if self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.thread_lock.release()


_WRITE_LOCKS: dict[tuple[int, str], _WriteLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: str) -> _WriteLock:
    """This process's write lock of the SQLite file (a new one after a fork: locks are not shared)."""
    key = (os.getpid(), path)
    lock = _WRITE_LOCKS.get(key)
    if lock is None:
        with _WRITE_LOCKS_GUARD:
            lock = _WRITE_LOCKS.setdefault(key, _WriteLock(path))
    return lock


def _sqlite_connection_class(path: str, timeout_s: float) -> type:
    """sqlite3 connections to the file at ``path`` whose write transactions hold the file's write lock
    (``_WriteLock``) from BEGIN IMMEDIATE to COMMIT or ROLLBACK."""
    path = os.path.realpath(path)

    class _WriteLockedConnection(sqlite3.Connection):
        _held: Optional[_WriteLock] = None

        def take_write_lock(self) -> None:
            lock = _write_lock(path)
            lock.acquire(timeout_s)
            self._held = lock

        def drop_write_lock(self) -> None:
            lock, self._held = self._held, None
            if lock is not None:
                lock.release()

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self.drop_write_lock()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self.drop_write_lock()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self.drop_write_lock()

    return _WriteLockedConnection


def normalize_url(url: Optional[str]) -> str:
    """None -> $MEGACOACH_LABELS_URL or the default SQLite file; a bare path -> a SQLite URL."""
    if url is None or url == "":
        url = os.environ.get(URL_ENV) or DEFAULT_URL
    if "://" not in url:
        url = "sqlite:///" + str(Path(url).expanduser())
    return url


# ---------------------------------------------------------------------------------------------------


class StoreEngine:
    """The database under ``LabelStore``: engine, sessions and transactions, error translation, and
    the schema (migrated on open). The store's parts (``LabelStore`` and its mixins) run in these."""

    def __init__(self, url: Optional[str] = None, *, busy_timeout_s: float = 30.0, echo: bool = False,
                 pool_size: Optional[int] = None):
        """``pool_size``: connections kept open (SQLAlchemy's default 5, and as many again beyond them
        while busy); a server should keep at least two per thread that uses the store."""
        self.url = normalize_url(url)
        try:
            self._safe_url = make_url(self.url).render_as_string(hide_password=True)
        except sa_exc.ArgumentError as e:
            raise StoreError(f"label store URL {url!r} is not a database URL: {e}") from e
        self.busy_timeout_s = float(busy_timeout_s)
        self.pool_size = pool_size
        self._local = threading.local()
        self._engine = self._make_engine(echo)
        self._write_engine = self._engine.execution_options(megacoach_write=True)
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    # -- engine, transactions, errors -------------------------------------------------------------

    def _make_engine(self, echo: bool) -> Engine:
        u = make_url(self.url)
        kwargs: dict[str, Any] = {"echo": echo}
        connect_args: dict[str, Any] = {}
        sqlite = u.get_backend_name() == "sqlite"
        memory = sqlite and u.database in (None, "", ":memory:")
        if sqlite:
            connect_args.update(timeout=self.busy_timeout_s, check_same_thread=False)
            if memory:  # one shared connection, else every connection is a new empty database
                kwargs["poolclass"] = StaticPool
            elif self.pool_size:
                kwargs.update(pool_size=self.pool_size, max_overflow=self.pool_size)
            if not memory:
                connect_args["factory"] = _sqlite_connection_class(u.database, self.busy_timeout_s)
        else:
            kwargs["pool_pre_ping"] = True
            if self.pool_size:
                kwargs.update(pool_size=self.pool_size, max_overflow=self.pool_size)
            if u.get_backend_name() == "postgresql":
                connect_args["connect_timeout"] = max(1, int(self.busy_timeout_s))
        try:
            engine = create_engine(u, connect_args=connect_args, **kwargs)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as e:
            raise StoreError(f"label store {self._safe_url}: cannot use this URL: {e}") from e
        if sqlite:
            busy_ms = int(self.busy_timeout_s * 1000)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # the driver must not BEGIN on its own; we do, below
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
                cur.execute("PRAGMA foreign_keys = ON")
                if not memory:
                    cur.execute("PRAGMA journal_mode = WAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Any) -> None:
                # Writers take the write lock up front: they wait (busy timeout) instead of failing
                # with "database is locked" when upgrading a read lock mid-transaction.
                immediate = conn.get_execution_options().get("megacoach_write", False)
                if not immediate:
                    conn.exec_driver_sql("BEGIN")
                    return
                dbapi_conn = conn.connection.dbapi_connection
                take = getattr(dbapi_conn, "take_write_lock", None)
                if take is not None:
                    take()  # this process's writers queue here (see _sqlite_connection_class)
                try:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                except BaseException:
                    if take is not None:
                        dbapi_conn.drop_write_lock()
                    raise

        return engine

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except MegacoachError:
            raise
        except sa_exc.IntegrityError as e:
            raise DataError(f"label store: cannot {doing}: rejected by the database ({e.orig})") from e
        except sa_exc.DBAPIError as e:  # OperationalError (locked, unreachable), ProgrammingError, ...
            cause = str(e.orig).strip() or type(e.orig).__name__
            raise StoreError(f"label store {self._safe_url}: cannot {doing}: {cause}") from e
        except sa_exc.SQLAlchemyError as e:
            raise StoreError(f"label store {self._safe_url}: cannot {doing}: {e}") from e

    @contextmanager
    def _write(self, doing: str) -> Iterator[Session]:
        outer: Optional[Session] = getattr(self._local, "session", None)
        with self._errors(doing):
            if outer is not None:  # inside store.transaction(): a savepoint, so a rejected write
                with outer.begin_nested():  # (e.g. a doubled label) leaves the rest intact
                    yield outer
                return
            with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
                yield s

    @contextmanager
    def _read(self, doing: str) -> Iterator[Session]:
        outer: Optional[Session] = getattr(self._local, "session", None)
        if outer is not None:
            with self._errors(doing):
                yield outer
            return
        with self._errors(doing), Session(self._engine) as s, s.begin():
            yield s

    @contextmanager
    def transaction(self) -> Iterator[Self]:
        """All store writes inside the block (in this thread) commit together or not at all."""
        if getattr(self._local, "session", None) is not None:
            yield self
            return
        with self._errors("write"), Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            self._local.session = s
            try:
                yield self
            finally:
                self._local.session = None

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (reads; SQLite transactions begin deferred)."""
        return self._engine

    def session(self, write: bool = True) -> Session:
        """A new ORM Session, for modules of megacoach that need queries this class does not offer
        (e.g. labels/assignment.py). ``with store.session() as s, s.begin(): ...``. With write=True a
        SQLite transaction takes the write lock at BEGIN (writers queue instead of failing). Turn rows
        into records before they leave the module; errors are not translated here."""
        return Session(self._write_engine if write else self._engine, expire_on_commit=False)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LabelStore({self._safe_url!r})"

    # -- schema ------------------------------------------------------------------------------------

    @staticmethod
    def _alembic_config() -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        return cfg

    @classmethod
    def code_schema_version(cls) -> str:
        """The newest schema revision this code knows (Alembic head)."""
        heads = ScriptDirectory.from_config(cls._alembic_config()).get_heads()
        if len(heads) != 1:
            raise StoreError(f"label store migrations have {len(heads)} heads ({', '.join(heads)}); expected one")
        return heads[0]

    def schema_version(self) -> Optional[str]:
        """The schema revision recorded in the database."""
        with self._errors("read the schema version"), self._engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
        return heads[0] if heads else None

    def _migrate(self) -> None:
        cfg = self._alembic_config()
        script = ScriptDirectory.from_config(cfg)
        head = self.code_schema_version()
        known = {rev.revision for rev in script.walk_revisions()}

        def check(conn: Any) -> bool:
            """True when an upgrade is needed; StoreError when the database is newer or foreign."""
            current = MigrationContext.configure(conn).get_current_heads()
            unknown = [r for r in current if r not in known]
            if unknown:
                raise StoreError(
                    f"label store {self._safe_url}: its schema version {', '.join(unknown)} is newer than this "
                    f"code's ({head}); upgrade megacoach to open it (nothing was written)")
            if not current and inspect(conn).has_table("comparisons"):
                raise StoreError(f"label store {self._safe_url}: has tables but no schema version "
                                 "(alembic_version); not a megacoach label store?")
            return tuple(current) != (head,)

        with self._errors("open"):
            with self._engine.connect() as conn:
                needed = check(conn)
                conn.rollback()
            if not needed:
                return
            with self._write_engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                if check(conn):  # re-check under the write lock: another process may have migrated
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")


class LabelStore(PeopleAdmin, RunStatuses, StoreEngine):
    """Durable store of queries, samples, items and the comparisons (labels) human evaluators make.

    Thread-safe (one store may be shared by threads); each process opens its own. The training side
    (queries, samples, items, comparisons, position) is here; labelers, skips, guidelines and the
    audit log come from ``PeopleAdmin`` (people.py), run status and the Andon cord from
    ``RunStatuses`` (control.py)."""

    # -- queries, samples, items -------------------------------------------------------------------

    def add_query(self, text: str, token_ids: Sequence[int], source: str = "") -> QueryRecord:
        """Store a query (prompt) shown to the Apprentice."""
        if not isinstance(text, str):
            raise DataError(f"query text: expected a string, got {type(text).__name__}")
        ids = token_id_list(token_ids, "query token_ids")
        with self._write("add a query") as s:
            row = QueryRow(text=text, token_ids=ids, source=str(source))
            s.add(row)
            s.flush()
            return query_rec(row)

    def add_samples(self, query_id: int, samples: Sequence[NewSample]) -> list[SampleRecord]:
        """Store continuations of a query, with provenance (policy checkpoint, iteration, seed, run)."""
        checked = [check_sample(x, f"sample {i}") for i, x in enumerate(samples)]
        with self._write("add samples") as s:
            if s.get(QueryRow, query_id) is None:
                raise DataError(f"query {query_id}: no such query")
            rows = [SampleRow(query_id=query_id, **c) for c in checked]
            s.add_all(rows)
            s.flush()
            return [sample_rec(r) for r in rows]

    def add_item(self, query: Union[int, QueryRecord], samples: Sequence[Union[int, SampleRecord]],
                 k: Optional[int] = None, *, split: str = "train", batch: str = "", source: str = "offline",
                 is_gold: bool = False, gold_choice: Optional[int] = None, is_calibration: bool = False,
                 overlap: int = 1, run_id: Optional[str] = None, gold_explanation: Optional[str] = None) -> ItemRecord:
        """An item to label: a stored query and K >= 2 of its stored samples (this order is canonical)."""
        gold_explanation = check_explanation(gold_explanation, "gold_explanation")
        query_id = query.id if isinstance(query, QueryRecord) else query
        sample_ids = [x.id if isinstance(x, SampleRecord) else x for x in samples]
        sample_ids = [check_int(x, f"sample id {i}", 1) for i, x in enumerate(sample_ids)]
        if k is not None and k != len(sample_ids):
            raise DataError(f"item: k={k} but {len(sample_ids)} samples given")
        k = len(sample_ids)
        check_item_fields(k, split, source, is_gold, gold_choice, overlap)
        if len(set(sample_ids)) != k:
            raise DataError(f"item: sample ids repeat: {sample_ids}")
        with self._write("add an item") as s:
            if s.get(QueryRow, query_id) is None:
                raise DataError(f"query {query_id}: no such query")
            found = {r.id: r.query_id for r in s.scalars(select(SampleRow).where(SampleRow.id.in_(sample_ids)))}
            for sid in sample_ids:
                if sid not in found:
                    raise DataError(f"sample {sid}: no such sample")
                if found[sid] != query_id:
                    raise DataError(f"sample {sid} continues query {found[sid]}, not query {query_id}")
            row = ItemRow(query_id=query_id, k=k, sample_ids=sample_ids, batch=str(batch), split=split,
                          source=source, is_gold=bool(is_gold), gold_choice=gold_choice,
                          is_calibration=bool(is_calibration), overlap=overlap, run_id=run_id,
                          gold_explanation=gold_explanation)
            s.add(row)
            s.flush()
            return item_rec(row)

    def create_item(self, query_text: str, query_token_ids: Sequence[int], samples: Sequence[NewSample], *,
                    query_source: str = "", split: str = "train", batch: str = "", source: str = "offline",
                    is_gold: bool = False, gold_choice: Optional[int] = None, is_calibration: bool = False,
                    overlap: int = 1, run_id: Optional[str] = None,
                    gold_explanation: Optional[str] = None) -> ItemContent:
        """Query + its K samples + the item, in one transaction (the trainer's and importers' path)."""
        return self.create_items([dict(query_text=query_text, query_token_ids=query_token_ids, samples=samples,
                                       query_source=query_source, split=split, batch=batch, source=source,
                                       is_gold=is_gold, gold_choice=gold_choice, is_calibration=is_calibration,
                                       overlap=overlap, run_id=run_id, gold_explanation=gold_explanation)])[0]

    def create_items(self, specs: Sequence[dict[str, Any]]) -> list[ItemContent]:
        """Many `create_item` calls (same keyword names, as dicts) in one transaction, with bulk inserts.
        Everything is validated before anything is written."""
        checked = [check_item_spec(spec, f"item {i}") for i, spec in enumerate(specs)]
        with self._write("add items") as s:
            return self._insert_items(s, checked)

    @staticmethod
    def _insert_items(s: Session, specs: list[dict[str, Any]]) -> list[ItemContent]:
        """Bulk insert of already-checked item specs (queries, samples, items), returning the contents."""
        if not specs:
            return []
        now = utcnow()
        q_params = [dict(text=x["query_text"], token_ids=x["query_token_ids"], source=x["query_source"],
                         created_at=x["created_at"] or now) for x in specs]
        q_ids = list(s.scalars(insert(QueryRow).returning(QueryRow.id, sort_by_parameter_order=True), q_params))
        s_params = [dict(query_id=qid, created_at=x["created_at"] or now, **smp)
                    for qid, x in zip(q_ids, specs) for smp in x["samples"]]
        s_ids = list(s.scalars(insert(SampleRow).returning(SampleRow.id, sort_by_parameter_order=True), s_params))
        i_params, pos = [], 0
        per_item_sids = []
        for qid, x in zip(q_ids, specs):
            sids = s_ids[pos : pos + len(x["samples"])]
            pos += len(x["samples"])
            per_item_sids.append(sids)
            i_params.append(dict(query_id=qid, k=len(sids), sample_ids=sids, batch=x["batch"], split=x["split"],
                                 source=x["source"], is_gold=x["is_gold"], gold_choice=x["gold_choice"],
                                 is_calibration=x["is_calibration"], overlap=x["overlap"], run_id=x["run_id"],
                                 created_at=x["created_at"] or now, gold_explanation=x["gold_explanation"]))
        i_ids = list(s.scalars(insert(ItemRow).returning(ItemRow.id, sort_by_parameter_order=True), i_params))
        out = []
        for iid, qid, qp, sids, ip, x in zip(i_ids, q_ids, q_params, per_item_sids, i_params, specs):
            query = QueryRecord(qid, qp["text"], qp["token_ids"], qp["source"], qp["created_at"])
            samples = [SampleRecord(sid, qid, smp["text"], smp["token_ids"], smp["policy"], smp["iteration"],
                                    smp["seed"], smp["run_id"], ip["created_at"])
                       for sid, smp in zip(sids, x["samples"])]
            item = ItemRecord(iid, qid, ip["k"], sids, ip["batch"], ip["split"], ip["source"], ip["is_gold"],
                              ip["gold_choice"], ip["is_calibration"], ip["overlap"], ip["run_id"], ip["created_at"],
                              ip["gold_explanation"])
            out.append(ItemContent(item, query, samples))
        return out

    def get_item(self, item_id: int) -> Optional[ItemRecord]:
        with self._read("read an item") as s:
            row = s.get(ItemRow, item_id)
            return None if row is None else item_rec(row)

    def item_contents(self, item_ids: Sequence[int]) -> list[ItemContent]:
        """Items with their query and samples (canonical order), in the order asked; unknown id -> DataError."""
        ids = list(item_ids)
        with self._read("read items") as s:
            items: dict[int, ItemRow] = {}
            for chunk in _chunks(ids):
                items.update({r.id: r for r in s.scalars(select(ItemRow).where(ItemRow.id.in_(chunk)))})
            missing = [i for i in ids if i not in items]
            if missing:
                raise DataError(f"item {missing[0]}: no such item")
            queries = self._queries_by_id(s, {r.query_id for r in items.values()})
            samples = self._samples_by_id(s, {sid for r in items.values() for sid in r.sample_ids})
            return [ItemContent(item_rec(items[i]), queries[items[i].query_id],
                                [samples[sid] for sid in items[i].sample_ids]) for i in ids]

    @staticmethod
    def _queries_by_id(s: Session, ids: Iterable[int]) -> dict[int, QueryRecord]:
        out: dict[int, QueryRecord] = {}
        for chunk in _chunks(sorted(ids)):
            out.update({r.id: query_rec(r) for r in s.scalars(select(QueryRow).where(QueryRow.id.in_(chunk)))})
        return out

    @staticmethod
    def _samples_by_id(s: Session, ids: Iterable[int]) -> dict[int, SampleRecord]:
        out: dict[int, SampleRecord] = {}
        for chunk in _chunks(sorted(ids)):
            out.update({r.id: sample_rec(r) for r in s.scalars(select(SampleRow).where(SampleRow.id.in_(chunk)))})
        return out

    def items(self, *, batch: Optional[str] = None, split: Optional[str] = None, source: Optional[str] = None,
              after_id: int = 0, limit: Optional[int] = None) -> list[ItemRecord]:
        """Items in id order, optionally filtered."""
        stmt = select(ItemRow).where(ItemRow.id > after_id).order_by(ItemRow.id)
        stmt = self._item_filters(stmt, batch, split, source)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read("read items") as s:
            return [item_rec(r) for r in s.scalars(stmt)]

    @staticmethod
    def _item_filters(stmt: Any, batch: Optional[str], split: Optional[str], source: Optional[str]) -> Any:
        if batch is not None:
            stmt = stmt.where(ItemRow.batch == batch)
        if split is not None:
            stmt = stmt.where(ItemRow.split == split)
        if source is not None:
            stmt = stmt.where(ItemRow.source == source)
        return stmt

    def items_without_labels(self, *, labeler: Optional[LabelerRef] = None, batch: Optional[str] = None,
                             split: Optional[str] = None, source: Optional[str] = None,
                             limit: Optional[int] = None) -> list[ItemRecord]:
        """Items nobody has labeled yet, in id order; with `labeler`: items that labeler has not labeled."""
        with self._read("read unlabeled items") as s:
            cond = ComparisonRow.item_id == ItemRow.id
            if labeler is not None:
                cond = and_(cond, ComparisonRow.labeler_id == labeler_row(s, labeler, active=False).id)
            stmt = select(ItemRow).where(~exists().where(cond)).order_by(ItemRow.id)
            stmt = self._item_filters(stmt, batch, split, source)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [item_rec(r) for r in s.scalars(stmt)]

    # -- comparisons (labels) ----------------------------------------------------------------------

    @staticmethod
    def _label_values(item: ItemRow, lab: LabelerRow, where: str, chosen: Any, shown_order: Any,
                      guideline_version: str, time_taken_s: Any, flagged: Any, note: Any, too_fast: Any,
                      confidence: Any, created_at: Optional[dt.datetime], via: Any = None,
                      api_token_id: Any = None, verdict: Any = "best", adjudication: Any = False) -> dict[str, Any]:
        check_via(where, via, api_token_id)
        verdict, chosen = check_verdict(f"{where}item {item.id}: ", verdict, chosen, item.k)
        values = dict(
            item_id=item.id, chosen=chosen, verdict=verdict, adjudication=bool(adjudication),
            shown_order=check_shown_order(shown_order, item.k, f"{where}item {item.id}: shown_order"),
            labeler_id=lab.id, labeler_kind=lab.kind, guideline_version=str(guideline_version),
            time_taken_s=None if time_taken_s is None else float(time_taken_s), flagged=bool(flagged), note=note,
            too_fast=bool(too_fast), confidence=None if confidence is None else int(confidence), split=item.split,
            via=via, api_token_id=api_token_id)
        if created_at is not None:
            values["created_at"] = created_at
        return values

    def add_comparison(self, item_id: int, chosen: Optional[int], labeler: LabelerRef, *,
                       shown_order: Optional[Sequence[int]] = None, guideline_version: Optional[str] = None,
                       time_taken_s: Optional[float] = None, flagged: bool = False, note: Optional[str] = None,
                       too_fast: bool = False, confidence: Optional[int] = None, via: Optional[str] = None,
                       api_token_id: Optional[int] = None, verdict: str = "best",
                       adjudication: bool = False) -> ComparisonRecord:
        """Record that `labeler` judged canonical sample `chosen` best in item `item_id` (verdict "best"),
        or that the best ones are equally good (verdict "tie", chosen None), or that none is acceptable
        (verdict "none", chosen None).

        shown_order: shown position -> canonical index (identity if None). guideline_version: defaults
        to the latest guideline ("" if none). via: how the label arrived ("session", "token" with its
        api_token_id, None). adjudication: an adjudicator's decision on the item (one per item; the
        training view uses it instead of the item's labels). A second label by the same labeler ->
        DuplicateLabelError."""
        check_label_extras("", time_taken_s, note, confidence, None)
        with self._write("add a label") as s:
            item = s.get(ItemRow, item_id)
            if item is None:
                raise DataError(f"item {item_id}: no such item")
            lab = labeler_row(s, labeler)
            if guideline_version is None:
                latest = latest_guideline_row(s)
                guideline_version = latest.version if latest is not None else ""
            values = self._label_values(item, lab, "", chosen, shown_order, guideline_version, time_taken_s, flagged,
                                        note, too_fast, confidence, None, via, api_token_id, verdict, adjudication)
            prior = s.scalar(select(ComparisonRow.id).where(ComparisonRow.item_id == item_id,
                                                            ComparisonRow.labeler_id == lab.id))
            if prior is not None:
                raise DuplicateLabelError(f"item {item_id} already has a label from labeler {lab.name!r} "
                                          f"(comparison {prior}); one label per item and labeler")
            if adjudication and s.scalar(select(ComparisonRow.id).where(ComparisonRow.item_id == item_id,
                                                                        ComparisonRow.adjudication)) is not None:
                raise DuplicateLabelError(f"item {item_id} is decided already; one adjudication per item")
            row = ComparisonRow(**values)
            try:
                with s.begin_nested():
                    s.add(row)
            except sa_exc.IntegrityError as e:  # a concurrent writer got there first (PostgreSQL)
                raise DuplicateLabelError(f"item {item_id} already has a label from labeler {lab.name!r}; "
                                          f"one label per item and labeler ({e.orig})") from e
            return self._comparison_records(s, [(row, item, lab.name)])[0]

    def add_comparisons(self, labels: Sequence[dict[str, Any]]) -> list[int]:
        """Many labels in one transaction with a bulk insert (importers). Each dict has add_comparison's
        argument names (item_id, chosen, labeler, shown_order, ...) plus an optional aware `created_at`.
        Any bad or doubled label -> DataError / DuplicateLabelError naming it, and nothing is written.
        Returns the new comparison ids in order."""
        allowed = {"item_id", "chosen", "labeler", "shown_order", "guideline_version", "time_taken_s", "flagged",
                   "note", "too_fast", "confidence", "created_at", "via", "verdict", "adjudication"}
        for i, spec in enumerate(labels):
            check_fields(spec, allowed, ("item_id", "chosen", "labeler"), f"label {i}")
            check_label_extras(f"label {i}: ", spec.get("time_taken_s"), spec.get("note"),
                                     spec.get("confidence"), spec.get("created_at"))
        if not labels:
            return []
        with self._write("add labels") as s:
            item_ids = sorted({check_int(x["item_id"], f"label {i}: item_id", 1) for i, x in enumerate(labels)})
            items: dict[int, ItemRow] = {}
            taken: set[tuple[int, int]] = set()
            for chunk in _chunks(item_ids):
                items.update({r.id: r for r in s.scalars(select(ItemRow).where(ItemRow.id.in_(chunk)))})
                taken.update((a, b) for a, b in s.execute(
                    select(ComparisonRow.item_id, ComparisonRow.labeler_id).where(ComparisonRow.item_id.in_(chunk))))
            latest = latest_guideline_row(s)
            default_version = latest.version if latest is not None else ""
            labelers: dict[Any, LabelerRow] = {}
            params = []
            for i, x in enumerate(labels):
                where = f"label {i}: "
                item = items.get(x["item_id"])
                if item is None:
                    raise DataError(f"{where}item {x['item_id']}: no such item")
                ref = x["labeler"]
                key = ref.id if isinstance(ref, LabelerRecord) else ref
                if key not in labelers:
                    try:
                        labelers[key] = labeler_row(s, ref)
                    except DataError as e:
                        raise DataError(f"{where}{e}") from None
                lab = labelers[key]
                if (item.id, lab.id) in taken:
                    raise DuplicateLabelError(f"{where}item {item.id} already has a label from labeler {lab.name!r}; "
                                              "one label per item and labeler")
                taken.add((item.id, lab.id))
                version = x.get("guideline_version")
                params.append(self._label_values(
                    item, lab, where, x["chosen"], x.get("shown_order"),
                    default_version if version is None else version, x.get("time_taken_s"), x.get("flagged", False),
                    x.get("note"), x.get("too_fast", False), x.get("confidence"), x.get("created_at"), x.get("via"),
                    None, x.get("verdict", "best"), x.get("adjudication", False)))
            now = utcnow()
            for p in params:
                p.setdefault("created_at", now)
            try:
                return list(s.scalars(insert(ComparisonRow).returning(ComparisonRow.id, sort_by_parameter_order=True),
                                      params))
            except sa_exc.IntegrityError as e:
                raise DuplicateLabelError(f"labels: one label per item and labeler ({e.orig})") from e

    def _comparison_records(self, s: Session, rows: list[tuple[ComparisonRow, ItemRow, str]]) -> list[ComparisonRecord]:
        queries = self._queries_by_id(s, {it.query_id for _, it, _ in rows})
        samples = self._samples_by_id(s, {sid for _, it, _ in rows for sid in it.sample_ids})
        out = []
        for c, it, name in rows:
            q = queries[it.query_id]
            out.append(ComparisonRecord(
                id=c.id, item_id=it.id, query_id=q.id, query_text=q.text, query_token_ids=q.token_ids,
                samples=[samples[sid] for sid in it.sample_ids], chosen=c.chosen, shown_order=list(c.shown_order),
                labeler_id=c.labeler_id, labeler_name=name, labeler_kind=c.labeler_kind,
                guideline_version=c.guideline_version, time_taken_s=c.time_taken_s, flagged=bool(c.flagged),
                note=c.note, too_fast=bool(c.too_fast), confidence=c.confidence, split=c.split, batch=it.batch,
                item_source=it.source, is_gold=bool(it.is_gold), gold_choice=it.gold_choice,
                is_calibration=bool(it.is_calibration), item_created_at=it.created_at, created_at=c.created_at,
                via=c.via, api_token_id=c.api_token_id, verdict=c.verdict, adjudication=bool(c.adjudication),
                gold_explanation=it.gold_explanation))
        return out

    @staticmethod
    def _view(stmt: Any, view: str) -> Any:
        """The labels of a view: "all", or "training": the "best" labels the Values Coach's K-way softmax
        learns from (ties and "none acceptable" stay out), and for an item an adjudicator decided only the
        decision (its labels stay out)."""
        if check_choice(view, "view", LABEL_VIEWS) == "all":
            return stmt
        decision = aliased(ComparisonRow)
        decided = exists().where(decision.item_id == ComparisonRow.item_id, decision.adjudication)
        return stmt.where(ComparisonRow.verdict == "best", or_(ComparisonRow.adjudication, ~decided))

    def comparisons(self, split: Optional[str] = None, after_id: Optional[int] = None, *,
                    upto_id: Optional[int] = None, batch: Optional[str] = None, labeler_kind: Optional[str] = None,
                    labeler: Optional[LabelerRef] = None, limit: Optional[int] = None,
                    view: str = "training") -> list[ComparisonRecord]:
        """Labels in id order (id > after_id, id <= upto_id), each with query and samples in canonical order.

        ``view="training"`` (the default: what the Values Coach and the guards read) gives the labels that
        name a best continuation, with an adjudicator's decision in place of the labels of the item it
        decided; ``view="all"`` gives every label as recorded, ties, "none acceptable" and decisions too
        (exports, the labeling app)."""
        stmt = (select(ComparisonRow, ItemRow, LabelerRow.name)
                .join(ItemRow, ComparisonRow.item_id == ItemRow.id)
                .join(LabelerRow, ComparisonRow.labeler_id == LabelerRow.id)
                .order_by(ComparisonRow.id))
        stmt = self._view(stmt, view)
        if split is not None:
            stmt = stmt.where(ComparisonRow.split == check_choice(split, "split", SPLITS))
        if after_id is not None:
            stmt = stmt.where(ComparisonRow.id > after_id)
        if upto_id is not None:
            stmt = stmt.where(ComparisonRow.id <= upto_id)
        if batch is not None:
            stmt = stmt.where(ItemRow.batch == batch)
        if labeler_kind is not None:
            stmt = stmt.where(ComparisonRow.labeler_kind == check_choice(labeler_kind, "labeler kind", LABELER_KINDS))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read("read labels") as s:
            if labeler is not None:
                stmt = stmt.where(ComparisonRow.labeler_id == labeler_row(s, labeler, active=False).id)
            rows = [(c, it, name) for c, it, name in s.execute(stmt)]
            return self._comparison_records(s, rows)

    def count_comparisons(self, split: Optional[str] = None, *, labeler_kind: Optional[str] = None,
                          view: str = "training") -> int:
        """How many labels ``comparisons`` would give (``view``: "training" by default, or "all")."""
        stmt = self._view(select(func.count(ComparisonRow.id)), view)
        if split is not None:
            stmt = stmt.where(ComparisonRow.split == check_choice(split, "split", SPLITS))
        if labeler_kind is not None:
            stmt = stmt.where(ComparisonRow.labeler_kind == labeler_kind)
        with self._read("count labels") as s:
            return int(s.scalar(stmt) or 0)

    def position(self) -> int:
        """The largest comparison id (0 when empty): the trainer checkpoints it and later asks for
        ``comparisons(after_id=position)``."""
        with self._read("read the label position") as s:
            return int(s.scalar(select(func.max(ComparisonRow.id))) or 0)
