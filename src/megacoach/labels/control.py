"""Run statuses in the label store: each run's status and the Andon cord (the trainer's side: runs.RunControl).

``RunStatuses`` is a mixin of ``LabelStore`` (store.py). The trainer writes its run's status (running,
paused, halted, finished) and polls it; any labeler may pull the Andon cord, and enough pulls make
the labeling app pause the run. ``set_run_status(..., unless=...)`` is a compare-and-set, so the
trainer's write cannot overwrite a pause made just before it.
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy import exc as sa_exc
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from megacoach.errors import DataError
from megacoach.labels.people import labeler_row
from megacoach.labels.records import AndonPull, LabelerRef, RunStatus, check_choice, check_int, check_json
from megacoach.labels.schema import RUN_STATUSES, AndonPullRow, LabelerRow, RunStatusRow, run_rec, utcnow


class RunStatuses:
    """The run-control side of ``LabelStore``: run statuses (with compare-and-set) and Andon pulls."""

    if TYPE_CHECKING:  # provided by LabelStore (store.py)
        def _read(self, doing: str) -> AbstractContextManager[Session]: ...

        def _write(self, doing: str) -> AbstractContextManager[Session]: ...

    # -- Andon cord and run status -------------------------------------------------------------------

    def pull_andon(self, labeler: LabelerRef, reason: str = "", run_id: Optional[str] = None) -> AndonPull:
        """A labeler pulls the Andon cord: training is producing bad output. run_id None: every run."""
        with self._write("pull the Andon cord") as s:
            lab = labeler_row(s, labeler)
            row = AndonPullRow(run_id=run_id, labeler_id=lab.id, reason=str(reason))
            s.add(row)
            s.flush()
            return AndonPull(row.id, row.run_id, row.labeler_id, lab.name, row.reason, row.at)

    def andon_pulls(self, run_id: Optional[str] = None, *, since: Optional[dt.datetime] = None,
                    after_id: int = 0) -> list[AndonPull]:
        """Pulls in id order. With run_id: pulls on that run plus pulls on every run (run_id NULL)."""
        stmt = (select(AndonPullRow, LabelerRow.name).join(LabelerRow, AndonPullRow.labeler_id == LabelerRow.id)
                .where(AndonPullRow.id > after_id).order_by(AndonPullRow.id))
        if run_id is not None:
            stmt = stmt.where(or_(AndonPullRow.run_id == run_id, AndonPullRow.run_id.is_(None)))
        if since is not None:
            stmt = stmt.where(AndonPullRow.at >= since)
        with self._read("read Andon pulls") as s:
            return [AndonPull(r.id, r.run_id, r.labeler_id, name, r.reason, r.at) for r, name in s.execute(stmt)]

    def set_run_status(self, run_id: str, status: str, iteration: Optional[int] = None,
                       detail: Optional[dict[str, Any]] = None, *, unless: tuple[str, ...] = ()) -> RunStatus:
        """Insert or update a training run's status (the trainer writes it; the app shows it).
        iteration/detail None keep the stored values. unless: statuses that must not be overwritten — checked and
        written in one transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: the row locked FOR UPDATE), so a pause
        set by the labeling app between the trainer's check and its write survives; the stored record is then
        returned unchanged."""
        if not isinstance(run_id, str) or not run_id:
            raise DataError(f"run_id: expected a non-empty string, got {run_id!r}")
        check_choice(status, "run status", RUN_STATUSES)
        if iteration is not None:
            check_int(iteration, "iteration", 0)
        if detail is not None:
            if not isinstance(detail, dict):
                raise DataError(f"run status detail: expected a dict, got {type(detail).__name__}")
            detail = check_json(detail, "run status detail")
        for u in unless:
            check_choice(u, "run status", RUN_STATUSES)
        with self._write("set the run status") as s:
            row = s.get(RunStatusRow, run_id, with_for_update=bool(unless), populate_existing=bool(unless))
            if row is not None and row.status in unless:
                return run_rec(row)
            if row is None:
                try:
                    with s.begin_nested():
                        row = RunStatusRow(run_id=run_id, status=status, iteration=iteration or 0, detail=detail or {})
                        s.add(row)
                    return run_rec(row)
                except sa_exc.IntegrityError:  # inserted concurrently: update it instead
                    row = s.get(RunStatusRow, run_id, populate_existing=True)
                    assert row is not None
            row.status = status
            if iteration is not None:
                row.iteration = iteration
            if detail is not None:
                row.detail = detail
            row.updated_at = utcnow()
            s.flush()
            return run_rec(row)

    def get_run_status(self, run_id: str) -> Optional[RunStatus]:
        with self._read("read the run status") as s:
            row = s.get(RunStatusRow, run_id)
            return None if row is None else run_rec(row)

    def run_statuses(self) -> list[RunStatus]:
        """All runs, most recently updated first."""
        with self._read("read run statuses") as s:
            stmt = select(RunStatusRow).order_by(RunStatusRow.updated_at.desc(), RunStatusRow.run_id)
            return [run_rec(r) for r in s.scalars(stmt)]
