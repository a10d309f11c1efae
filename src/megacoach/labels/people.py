"""People administration in the label store: labelers, their skips, the guidelines, the audit log.

``PeopleAdmin`` is a mixin of ``LabelStore`` (store.py): its methods run in the store's sessions and
transactions. ``labeler_row`` and ``latest_guideline_row`` are the lookups the store's other parts
share (every label names a labeler and, by default, the latest guideline version).
"""

from __future__ import annotations

import numbers
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from megacoach.errors import DataError
from megacoach.labels.records import (
    AuditEntry,
    GuidelineRecord,
    LabelerRecord,
    LabelerRef,
    SkipRecord,
    check_choice,
    check_json,
)
from megacoach.labels.schema import (
    LABELER_KINDS,
    ROLES,
    AuditRow,
    GuidelineRow,
    ItemRow,
    LabelerRow,
    SkipRow,
    audit_rec,
    guideline_rec,
    labeler_rec,
    skip_rec,
)


def labeler_row(s: Session, labeler: LabelerRef, *, active: bool = True) -> LabelerRow:
    """The labeler row for an id, a name or a LabelerRecord; DataError if missing (or deactivated, with active)."""
    if isinstance(labeler, LabelerRecord):
        row = s.get(LabelerRow, labeler.id)
    elif isinstance(labeler, str):
        row = s.scalar(select(LabelerRow).where(LabelerRow.name == labeler))
    elif isinstance(labeler, numbers.Integral) and not isinstance(labeler, bool):
        row = s.get(LabelerRow, int(labeler))
    else:
        raise DataError(f"labeler: expected an id, a name or a LabelerRecord, got {labeler!r}")
    if row is None:
        raise DataError(f"labeler {labeler.name if isinstance(labeler, LabelerRecord) else labeler!r}: "
                        "no such labeler (create it with get_or_create_labeler)")
    if active and not row.active:
        raise DataError(f"labeler {row.name!r} is deactivated")
    return row


def latest_guideline_row(s: Session) -> Optional[GuidelineRow]:
    """The most recently published guideline, or None."""
    return s.scalar(select(GuidelineRow).order_by(GuidelineRow.created_at.desc(), GuidelineRow.id.desc()).limit(1))


class PeopleAdmin:
    """The people side of ``LabelStore``: labelers (people and programs), skips, guidelines, audit log."""

    if TYPE_CHECKING:  # provided by LabelStore (store.py)
        def _read(self, doing: str) -> AbstractContextManager[Session]: ...

        def _write(self, doing: str) -> AbstractContextManager[Session]: ...

    # -- labelers ----------------------------------------------------------------------------------

    def get_or_create_labeler(self, name: str, kind: str = "person", role: Optional[str] = None,
                              password_hash: Optional[str] = None) -> LabelerRecord:
        """The labeler called `name`, created if missing. kind person|program; role admin|labeler for
        people (default labeler), program for programs. An existing labeler of another kind -> DataError."""
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"labeler name: expected a non-empty string, got {name!r}")
        check_choice(kind, "labeler kind", LABELER_KINDS)
        role = role or ("program" if kind == "program" else "labeler")
        check_choice(role, "labeler role", ROLES)
        if (kind == "program") != (role == "program"):
            raise DataError(f"labeler {name!r}: role {role!r} does not fit kind {kind!r} "
                            "(programs have role 'program'; people 'admin' or 'labeler')")
        with self._write("add a labeler") as s:
            row = s.scalar(select(LabelerRow).where(LabelerRow.name == name))
            if row is None:
                try:
                    with s.begin_nested():
                        row = LabelerRow(name=name, kind=kind, role=role, password_hash=password_hash, active=True)
                        s.add(row)
                except sa_exc.IntegrityError:  # created concurrently
                    row = s.scalar(select(LabelerRow).where(LabelerRow.name == name))
                    assert row is not None
            if row.kind != kind:
                raise DataError(f"labeler {name!r} exists as a {row.kind}, not a {kind}")
            return labeler_rec(row)

    def get_labeler(self, labeler: LabelerRef) -> Optional[LabelerRecord]:
        """By id or name; None if missing."""
        with self._read("read a labeler") as s:
            try:
                return labeler_rec(labeler_row(s, labeler, active=False))
            except DataError:
                return None

    def labelers(self) -> list[LabelerRecord]:
        with self._read("read labelers") as s:
            return [labeler_rec(r) for r in s.scalars(select(LabelerRow).order_by(LabelerRow.id))]

    def update_labeler(self, labeler: LabelerRef, *, active: Optional[bool] = None, role: Optional[str] = None,
                       password_hash: Optional[str] = None, adjudicator: Optional[bool] = None) -> LabelerRecord:
        """Change a labeler's active flag, role (people only), password hash, or whether a labeler may
        decide disagreements (``adjudicator``: labelers only; admins decide them anyway)."""
        with self._write("update a labeler") as s:
            row = labeler_row(s, labeler, active=False)
            if active is not None:
                row.active = bool(active)
            if role is not None:
                check_choice(role, "labeler role", ROLES)
                if (row.kind == "program") != (role == "program"):
                    raise DataError(f"labeler {row.name!r}: role {role!r} does not fit kind {row.kind!r}")
                row.role = role
            if password_hash is not None:
                row.password_hash = password_hash
            if adjudicator is not None:
                if adjudicator and row.role != "labeler":
                    raise DataError(f"labeler {row.name!r}: only a labeler can be made an adjudicator "
                                    f"(role {row.role!r})")
                row.adjudicator = bool(adjudicator)
            if row.role != "labeler":
                row.adjudicator = False
            s.flush()
            return labeler_rec(row)

    # -- skips ---------------------------------------------------------------------------------------

    def add_skip(self, item_id: int, labeler: LabelerRef, reason: str = "") -> SkipRecord:
        """A labeler skipped an item (with a reason); the item stays available to others."""
        with self._write("add a skip") as s:
            if s.get(ItemRow, item_id) is None:
                raise DataError(f"item {item_id}: no such item")
            row = SkipRow(item_id=item_id, labeler_id=labeler_row(s, labeler).id, reason=str(reason))
            s.add(row)
            s.flush()
            return skip_rec(row)

    def skips(self, *, item_id: Optional[int] = None, labeler: Optional[LabelerRef] = None) -> list[SkipRecord]:
        with self._read("read skips") as s:
            stmt = select(SkipRow).order_by(SkipRow.id)
            if item_id is not None:
                stmt = stmt.where(SkipRow.item_id == item_id)
            if labeler is not None:
                stmt = stmt.where(SkipRow.labeler_id == labeler_row(s, labeler, active=False).id)
            return [skip_rec(r) for r in s.scalars(stmt)]

    # -- guidelines ----------------------------------------------------------------------------------

    def set_guideline(self, version: str, markdown: str, created_by: str = "") -> GuidelineRecord:
        """Publish guideline `version` (it becomes the latest). Versions are immutable: the same version
        with other text -> DataError; with the same text it is returned unchanged."""
        if not isinstance(version, str) or not version.strip():
            raise DataError(f"guideline version: expected a non-empty string, got {version!r}")
        if not isinstance(markdown, str):
            raise DataError("guideline markdown: expected a string")
        with self._write("publish a guideline") as s:
            row = s.scalar(select(GuidelineRow).where(GuidelineRow.version == version))
            if row is not None:
                if row.markdown != markdown:
                    raise DataError(f"guideline version {version!r} already exists with other text; "
                                    "publish a new version")
                return guideline_rec(row)
            row = GuidelineRow(version=version, markdown=markdown, created_by=str(created_by))
            s.add(row)
            s.flush()
            return guideline_rec(row)

    def latest_guideline(self) -> Optional[GuidelineRecord]:
        with self._read("read guidelines") as s:
            row = latest_guideline_row(s)
            return None if row is None else guideline_rec(row)

    def get_guideline(self, version: str) -> Optional[GuidelineRecord]:
        with self._read("read guidelines") as s:
            row = s.scalar(select(GuidelineRow).where(GuidelineRow.version == version))
            return None if row is None else guideline_rec(row)

    def guidelines(self) -> list[GuidelineRecord]:
        with self._read("read guidelines") as s:
            return [guideline_rec(r) for r in s.scalars(select(GuidelineRow).order_by(GuidelineRow.id))]

    # -- audit log (append-only) ---------------------------------------------------------------------

    def append_audit(self, actor: str, action: str, detail: Optional[dict[str, Any]] = None) -> AuditEntry:
        """Append to the audit log (who did what). There is no update or delete."""
        if not isinstance(actor, str) or not isinstance(action, str) or not action:
            raise DataError(f"audit entry: actor and action must be strings, got {actor!r}, {action!r}")
        if detail is not None and not isinstance(detail, dict):
            raise DataError(f"audit detail: expected a dict, got {type(detail).__name__}")
        detail = check_json(detail or {}, "audit detail")
        with self._write("append to the audit log") as s:
            row = AuditRow(actor=actor, action=action, detail=detail)
            s.add(row)
            s.flush()
            return audit_rec(row)

    def audit_entries(self, *, after_id: int = 0, actor: Optional[str] = None, action: Optional[str] = None,
                      limit: Optional[int] = None) -> list[AuditEntry]:
        stmt = select(AuditRow).where(AuditRow.id > after_id).order_by(AuditRow.id)
        if actor is not None:
            stmt = stmt.where(AuditRow.actor == actor)
        if action is not None:
            stmt = stmt.where(AuditRow.action == action)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read("read the audit log") as s:
            return [audit_rec(r) for r in s.scalars(stmt)]

