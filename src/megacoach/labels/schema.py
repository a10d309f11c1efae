"""The label store's tables (SQLAlchemy 2 typed declarative models).

These ORM classes are used by `megacoach.labels` (store.py and its parts, assignment.py) and by the
labeling app, which keeps its own tables here; everything else gets plain dataclass records from
`LabelStore`.

Tables
- ``queries``      prompts shown to the Apprentice (policy): text and token ids.
- ``samples``      one continuation of a query, with its provenance (policy checkpoint, iteration,
                   seed, run id).
- ``items``        one thing to label: a query and K >= 2 samples in a canonical order.
- ``comparisons``  the labels: which canonical sample a human evaluator (or a mock labeler) chose,
                   in which shown order, under which guideline version. Unique (item, labeler).
- ``skips``        an item a labeler skipped, with the reason.
- ``labelers``     people and programs; role admin | labeler | program.
- ``guidelines``   versioned labeling instructions (markdown).
- ``audit_log``    append-only log of who did what.
- ``andon_pulls``  the Andon cord: a labeler flags that training produces bad output.
- ``run_status``   written by the trainer, read by the app: running | paused | halted | finished.
- ``alembic_version`` (Alembic's own) holds the schema version.

The labeling app's tables (revision 0003_app_auth):
- ``web_sessions``   a log-in: SHA-256 of the session cookie, its CSRF token, expiry.
- ``invitations``    an invitation link (SHA-256 of its token) for a new labeler or admin.
- ``api_tokens``     bearer tokens for the trainer and scripts (SHA-256 stored), owned by a program
                     account or by the person who minted it; scopes and an expiry (rev 0004).
- ``item_locks``     an item assigned to a labeler, held until ``expires_at`` (assignment.py).
- ``andon_clears``   an admin acknowledged the Andon pulls of a run (pulls before it stop counting).
- ``app_secrets``    server-side secrets made once (rev 0005): the key of the shown order.

Revision 0006_assignment_index (serving many labelers from several processes):
- ``items.filled``   set by the assigner when an item needs nothing more from the ordinary queue (it has
                     its labels, or it is a calibration/gold item, which everyone gets from the shared
                     pool); ``ix_items_open`` (filled, id) and ``ix_items_open_source`` find the open
                     items without reading the finished ones; ``ix_items_is_calibration`` and
                     ``ix_items_is_gold`` find the shared pool; ``ix_skips_item_labeler`` answers "did
                     this labeler skip this item?" in one probe.

Revision 0007_login_failures: ``login_failures``, the log-in throttle's counts (failed log-ins per client
address and per client address + account name, with the time of the last one), so that every server
process of the app slows down the same clients.

Revision 0008_rate_limits: ``rate_limits``, the request rate limits' windows (the Andon cord's requests per
client address and person), and ``login_failures.refusal_noted_at``, so that every server process counts
the same requests and a throttled client's first refused try is audited once.

Revision 0009_verdicts_adjudication: ``comparisons.verdict`` (best | tie | none; ``chosen`` is NULL for a tie
or "none acceptable"), ``comparisons.adjudication`` (an adjudicator's decision on an item whose labels
disagree; at most one per item, ``uq_comparisons_adjudication``), ``items.gold_explanation`` (shown to a
labeler who misses a gold item) and ``labelers.adjudicator`` (a labeler who may decide disagreements).

Revision 0010_invitation_roles: ``invitations.role`` holds 20 characters, so that a person can be invited
as an ``adjudicator`` (accepting makes a labeler with ``labelers.adjudicator`` set).

Migrations live in ``megacoach/labels/migrations/versions`` (0001 initial, 0002 calibration/overlap,
too-fast flag, confidence, Andon cord and run status, 0003 the labeling app's tables, 0004 API token
scopes and expiry, and how each label arrived: ``comparisons.via`` / ``api_token_id``; 0005 the
app's server-side secrets; 0006 the assignment indexes; 0007 the log-in throttle's counts; 0008 the
rate limits' windows; 0009 ties, "none acceptable", adjudication and gold explanations; 0010 adjudicator
invitations). A new table goes into ``Base.metadata`` here with an Alembic revision whose
``down_revision`` is the current head; the store always migrates to head.

Times are stored as naive UTC in the database and returned as timezone-aware UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from megacoach.labels.records import (
    SPLITS,
    VERDICTS,
    AuditEntry,
    GuidelineRecord,
    ItemRecord,
    LabelerRecord,
    QueryRecord,
    RunStatus,
    SampleRecord,
    SkipRecord,
)

LABELER_KINDS = ("person", "program")
ROLES = ("admin", "labeler", "program")
RUN_STATUSES = ("running", "paused", "halted", "finished")

# Deterministic constraint names, so migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores naive UTC; returns aware UTC (same behaviour on SQLite and PostgreSQL)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Optional[dt.datetime], dialect: Any) -> Optional[dt.datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs a timezone-aware datetime")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: Optional[dt.datetime], dialect: Any) -> Optional[dt.datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class QueryRow(Base):
    __tablename__ = "queries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[int]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class SampleRow(Base):
    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[int]] = mapped_column(JSON)
    policy: Mapped[str] = mapped_column(String(500), default="")  # checkpoint path or name
    iteration: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    seed: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    run_id: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ItemRow(Base):
    """One thing to label: a query and K samples (``sample_ids`` in canonical order)."""

    __tablename__ = "items"
    __table_args__ = (
        CheckConstraint("k >= 2", name="k_at_least_2"),
        CheckConstraint(_in("split", SPLITS), name="split"),
        Index("ix_items_batch_split", "batch", "split"),
        Index("ix_items_open", "filled", "id"),  # rev 0006: the ordinary queue, oldest first
        Index("ix_items_open_source", "filled", "source", "id"),  # rev 0006: the same, for --item-source
        Index("ix_items_is_calibration", "is_calibration"),  # rev 0006: the shared pool
        Index("ix_items_is_gold", "is_gold"),  # rev 0006
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), index=True)
    k: Mapped[int] = mapped_column(Integer)
    sample_ids: Mapped[list[int]] = mapped_column(JSON)
    batch: Mapped[str] = mapped_column(String(200), default="")
    split: Mapped[str] = mapped_column(String(10), default="train")
    source: Mapped[str] = mapped_column(String(50), default="offline")  # offline|online|import|canary|...
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_choice: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    is_calibration: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # rev 0002
    overlap: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # rev 0002; >= 1 (checked by the store)
    run_id: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # rev 0006, written by the assigner (labels/assignment.py) only: True once the item needs nothing more
    # from the ordinary queue. An index hint, never the truth: the assigner still counts labels and locks.
    filled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    gold_explanation: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # rev 0009


class LabelerRow(Base):
    __tablename__ = "labelers"
    __table_args__ = (
        CheckConstraint(_in("kind", LABELER_KINDS), name="kind"),
        CheckConstraint(_in("role", ROLES), name="role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(10))
    role: Mapped[str] = mapped_column(String(10))
    password_hash: Mapped[Optional[str]] = mapped_column(String(500), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # rev 0009: a labeler who may also decide disagreements (the app's "adjudicator" role)
    adjudicator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


CHOSEN_MATCHES_VERDICT = "(verdict = 'best' AND chosen IS NOT NULL) OR (verdict <> 'best' AND chosen IS NULL)"


class ComparisonRow(Base):
    """A label: ``chosen`` is a canonical index 0..K-1 (NULL for a tie or "none acceptable", rev 0009);
    ``shown_order[p]`` is the canonical index shown at position p. ``split`` is copied from the item.
    One label per (item, labeler); ``adjudication`` rows are adjudicators' decisions, one per item."""

    __tablename__ = "comparisons"
    __table_args__ = (
        UniqueConstraint("item_id", "labeler_id", name="uq_comparisons_item_labeler"),
        CheckConstraint("chosen >= 0", name="chosen_nonnegative"),
        CheckConstraint(_in("labeler_kind", LABELER_KINDS), name="labeler_kind"),
        CheckConstraint(_in("split", SPLITS), name="split"),
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),  # rev 0009
        CheckConstraint(CHOSEN_MATCHES_VERDICT, name="chosen_matches_verdict"),  # rev 0009
        Index("uq_comparisons_adjudication", "item_id", unique=True,  # rev 0009: one decision per item
              sqlite_where=text("adjudication"), postgresql_where=text("adjudication")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    chosen: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    shown_order: Mapped[list[int]] = mapped_column(JSON)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    labeler_kind: Mapped[str] = mapped_column(String(10))
    guideline_version: Mapped[str] = mapped_column(String(100), default="")
    time_taken_s: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    too_fast: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # rev 0002
    confidence: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)  # rev 0002, e.g. 1..5
    split: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # rev 0004: how the label reached the store: "session" (a person's log-in in the app), "token"
    # (an API token, whose id is kept), None (written with the store's API, or imported)
    via: Mapped[Optional[str]] = mapped_column(String(10), nullable=True)
    api_token_id: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # rev 0009: best | tie | none, and whether this is an adjudicator's decision
    verdict: Mapped[str] = mapped_column(String(10), default="best", server_default="best")
    adjudication: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class SkipRow(Base):
    __tablename__ = "skips"
    __table_args__ = (Index("ix_skips_item_labeler", "item_id", "labeler_id"),)  # rev 0006: "did they skip it?"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class GuidelineRow(Base):
    __tablename__ = "guidelines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(100), unique=True)
    markdown: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), default="")


class AuditRow(Base):
    """Append-only: the store offers append and read, never update or delete."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AndonPullRow(Base):
    """Revision 0002. Any labeler may pull the Andon cord on a run (or on all runs: run_id NULL)."""

    __tablename__ = "andon_pulls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[Optional[str]] = mapped_column(String(200), nullable=True, index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class RunStatusRow(Base):
    """Revision 0002. One row per training run; written by the trainer, read by the app."""

    __tablename__ = "run_status"
    __table_args__ = (CheckConstraint(_in("status", RUN_STATUSES), name="status"),)

    run_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(10))
    iteration: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # e.g. guard alarms
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


# ---------------------------------------------------------------------------------------------------
# The labeling app's tables (revision 0003_app_auth)


class WebSessionRow(Base):
    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class InvitationRow(Base):
    __tablename__ = "invitations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))  # labeler | adjudicator | admin (rev 0010: 20 characters)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime, nullable=True)
    labeler_id: Mapped[Optional[int]] = mapped_column(ForeignKey("labelers.id"), nullable=True)


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime, nullable=True)
    # rev 0004: what the token may do (comma-separated scopes), until when, minted by whom
    scopes: Mapped[str] = mapped_column(String(200), default="", server_default="")
    expires_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200), default="", server_default="")


class ItemLockRow(Base):
    __tablename__ = "item_locks"
    __table_args__ = (
        UniqueConstraint("item_id", "labeler_id", name="uq_item_locks_item_labeler"),
        Index("ix_item_locks_expires_at", "expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    locked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AndonClearRow(Base):
    __tablename__ = "andon_clears"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[Optional[str]] = mapped_column(String(200), nullable=True, index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    note: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class AppSecretRow(Base):
    """Revision 0005. Server-side secrets of the labeling app, made once (random) and shared by
    all its processes: ``shown_order`` keys the order in which each labeler sees an item's
    continuations, so that the order cannot be computed from the labeler's and the item's ids."""

    __tablename__ = "app_secrets"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class LoginFailureRow(Base):
    """Revision 0007. The log-in throttle's count for one key (``app/throttle.py``): failed log-ins of a
    client address (kind ``client``) or of a client address for one account name (kind ``pair``). The
    key is a SHA-256 of the kind, the address and the name, so neither addresses nor typed names are
    kept in the clear. ``last_failed_at`` is seconds since the epoch (the backoff's arithmetic is in
    seconds); nothing is keyed by the account alone. Revision 0008: ``refusal_noted_at``, when a refused
    try since the last failure was first seen (NULL: none yet), so that it is audited once whichever
    process refused it."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_kind_last", "kind", "last_failed_at"),)

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    failures: Mapped[int] = mapped_column(Integer)
    last_failed_at: Mapped[float] = mapped_column(Float)
    refusal_noted_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)


class RateLimitRow(Base):
    """Revision 0008. A request rate limit's window for one key (``app/throttle.py``; kind ``andon``: the
    Andon cord's requests of one person from one client address). The key is a SHA-256 of the kind and
    the key's parts, so no address is kept in the clear. ``hits``: the times of the requests let through
    within the window, oldest first (at most the limit); ``refusal_noted_at``: when a refusal was last
    audited; ``last_at``: the latest of them (rows older than the window mean nothing and are pruned).
    Times are seconds since the epoch."""

    __tablename__ = "rate_limits"
    __table_args__ = (Index("ix_rate_limits_kind_last", "kind", "last_at"),)

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    hits: Mapped[list[float]] = mapped_column(JSON)
    last_at: Mapped[float] = mapped_column(Float)
    refusal_noted_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)


# ---------------------------------------------------------------------------------------------------
# Row -> record


def query_rec(r: QueryRow) -> QueryRecord:
    return QueryRecord(r.id, r.text, list(r.token_ids), r.source, r.created_at)


def sample_rec(r: SampleRow) -> SampleRecord:
    return SampleRecord(r.id, r.query_id, r.text, list(r.token_ids), r.policy, r.iteration, r.seed,
                        r.run_id, r.created_at)


def item_rec(r: ItemRow) -> ItemRecord:
    return ItemRecord(r.id, r.query_id, r.k, list(r.sample_ids), r.batch, r.split, r.source, bool(r.is_gold),
                      r.gold_choice, bool(r.is_calibration), r.overlap, r.run_id, r.created_at, r.gold_explanation)


def labeler_rec(r: LabelerRow) -> LabelerRecord:
    return LabelerRecord(r.id, r.name, r.kind, r.role, bool(r.active), r.created_at, r.password_hash,
                         bool(r.adjudicator))


def skip_rec(r: SkipRow) -> SkipRecord:
    return SkipRecord(r.id, r.item_id, r.labeler_id, r.reason, r.created_at)


def guideline_rec(r: GuidelineRow) -> GuidelineRecord:
    return GuidelineRecord(r.version, r.markdown, r.created_at, r.created_by)


def audit_rec(r: AuditRow) -> AuditEntry:
    return AuditEntry(r.id, r.at, r.actor, r.action, dict(r.detail or {}))


def run_rec(r: RunStatusRow) -> RunStatus:
    return RunStatus(r.run_id, r.status, r.iteration, dict(r.detail or {}), r.updated_at)
