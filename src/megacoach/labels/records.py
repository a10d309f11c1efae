"""The label store's records: the plain dataclasses that cross its API, and their checks.

``LabelStore`` (store.py) returns these, never ORM rows: queries, samples, items (``ItemContent``: an
item with its query and samples), labelers, comparisons (labels, with everything the Values Coach
needs), skips, guidelines, audit entries, Andon pulls and run statuses. ``NewSample`` is a sample to
store. The pure input checks of the store's methods live here too. Nothing here touches a database or
imports SQLAlchemy (the ORM rows and their row -> record converters are schema.py's), so a process that
trains without a store never loads it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megacoach.errors import DataError


SPLITS = ("train", "valid")  # the label splits: the Values Coach trains on one and is validated on the other
# what a label says: "best" (``chosen`` is the best continuation), "tie" (the best ones are equally good: no
# single best) or "none" (none is acceptable). Only "best" labels enter the Values Coach's K-way softmax.
VERDICTS = ("best", "tie", "none")
# which labels ``LabelStore.comparisons`` gives: "training" (what the Values Coach learns from: "best" labels,
# and for an item an adjudicator decided only the decision) or "all" (every label as recorded)
LABEL_VIEWS = ("training", "all")


class DuplicateLabelError(DataError):
    """The labeler already labeled this item: one label per (item, labeler)."""


# ---------------------------------------------------------------------------------------------------
# Records that cross the API boundary


@dataclass(frozen=True, slots=True)
class QueryRecord:
    id: int
    text: str
    token_ids: list[int]
    source: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SampleRecord:
    id: int
    query_id: int
    text: str
    token_ids: list[int]
    policy: str
    iteration: Optional[int]
    seed: Optional[int]
    run_id: Optional[str]
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class ItemRecord:
    id: int
    query_id: int
    k: int
    sample_ids: list[int]  # canonical order
    batch: str
    split: str
    source: str
    is_gold: bool
    gold_choice: Optional[int]
    is_calibration: bool
    overlap: int
    run_id: Optional[str]
    created_at: dt.datetime
    gold_explanation: Optional[str] = None  # why gold_choice is right: shown to a labeler who misses it


@dataclass(frozen=True, slots=True)
class ItemContent:
    """An item with its query and its K samples (canonical order): what a labeler is shown."""

    item: ItemRecord
    query: QueryRecord
    samples: list[SampleRecord]


@dataclass(frozen=True, slots=True)
class LabelerRecord:
    id: int
    name: str
    kind: str
    role: str
    active: bool
    created_at: dt.datetime
    password_hash: Optional[str] = field(default=None, repr=False)
    adjudicator: bool = False  # a labeler who also decides disagreements (the app's "adjudicator" role)


@dataclass(frozen=True, slots=True)
class ComparisonRecord:
    """One label with everything the Values Coach (reward model) needs, samples in canonical order.

    ``chosen`` indexes ``samples`` (None when ``verdict`` is "tie" or "none"); ``shown_order[p]`` is the
    canonical index shown at position p. ``adjudication``: an adjudicator's decision on an item whose
    labels disagree (it replaces them in the training view)."""

    id: int
    item_id: int
    query_id: int
    query_text: str
    query_token_ids: list[int]
    samples: list[SampleRecord]
    chosen: Optional[int]
    shown_order: list[int]
    labeler_id: int
    labeler_name: str
    labeler_kind: str
    guideline_version: str
    time_taken_s: Optional[float]
    flagged: bool
    note: Optional[str]
    too_fast: bool
    confidence: Optional[int]
    split: str
    batch: str
    item_source: str
    is_gold: bool
    gold_choice: Optional[int]
    is_calibration: bool
    item_created_at: dt.datetime
    created_at: dt.datetime
    via: Optional[str] = None  # "session" | "token" (the app) | None (the store's API, an import)
    api_token_id: Optional[int] = None  # the API token a label came through (via "token")
    verdict: str = "best"  # best | tie | none (VERDICTS)
    adjudication: bool = False
    gold_explanation: Optional[str] = None

    @property
    def k(self) -> int:
        return len(self.samples)

    @property
    def sample_token_ids(self) -> list[list[int]]:
        return [s.token_ids for s in self.samples]

    @property
    def sample_texts(self) -> list[str]:
        return [s.text for s in self.samples]


@dataclass(frozen=True, slots=True)
class SkipRecord:
    id: int
    item_id: int
    labeler_id: int
    reason: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class GuidelineRecord:
    version: str
    markdown: str
    created_at: dt.datetime
    created_by: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: dt.datetime
    actor: str
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AndonPull:
    id: int
    run_id: Optional[str]  # None: pulled on every run
    labeler_id: int
    labeler_name: str
    reason: str
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class RunStatus:
    run_id: str
    status: str  # running | paused | halted | finished
    iteration: int
    detail: dict[str, Any]
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class NewSample:
    """A sample to store: text, token ids and provenance (which Apprentice checkpoint, when)."""

    text: str
    token_ids: Sequence[int]
    policy: str = ""
    iteration: Optional[int] = None
    seed: Optional[int] = None
    run_id: Optional[str] = None


LabelerRef = Union[int, str, LabelerRecord]


# ---------------------------------------------------------------------------------------------------
# Validation helpers (pure)


def token_id_list(value: Any, what: str) -> list[int]:
    """A list of non-negative ints (numpy ints accepted), else DataError naming `what`."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise DataError(f"{what}: expected a list of token ids, got {type(value).__name__}")
    out: list[int] = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise DataError(f"{what}[{i}]: expected a non-negative integer token id, got {t!r}")
        out.append(int(t))
    return out


def check_int(value: Any, what: str, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{what}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise DataError(f"{what}: expected {rng}, got {value}")
    return int(value)


def check_choice(value: Any, what: str, values: Sequence[str]) -> str:
    if value not in values:
        raise DataError(f"{what}: expected one of {', '.join(values)}, got {value!r}")
    return value


def check_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise DataError(f"{what}: not JSON-serialisable ({e})") from e


def check_shown_order(shown_order: Optional[Sequence[int]], k: int, what: str = "shown_order") -> list[int]:
    """Identity when None; else must be a permutation of 0..k-1 (shown position -> canonical index)."""
    if shown_order is None:
        return list(range(k))
    order = [check_int(x, f"{what}[{i}]", 0, k - 1) for i, x in enumerate(shown_order)]
    if sorted(order) != list(range(k)):
        raise DataError(f"{what}: expected a permutation of 0..{k - 1}, got {list(shown_order)}")
    return order


def check_sample(x: NewSample, what: str) -> dict[str, Any]:
    """A NewSample checked, as the column values of its row."""
    if not isinstance(x, NewSample):
        raise DataError(f"{what}: expected a NewSample, got {type(x).__name__}")
    if not isinstance(x.text, str):
        raise DataError(f"{what} text: expected a string, got {type(x.text).__name__}")
    return dict(
        text=x.text, token_ids=token_id_list(x.token_ids, f"{what} token_ids"), policy=str(x.policy),
        iteration=None if x.iteration is None else check_int(x.iteration, f"{what} iteration", 0),
        seed=None if x.seed is None else check_int(x.seed, f"{what} seed", -(2**63)),
        run_id=None if x.run_id is None else str(x.run_id))


def check_item_fields(k: int, split: str, source: str, is_gold: bool, gold_choice: Optional[int],
                      overlap: int) -> None:
    """The checks an item's own fields get (K, split, source, gold choice, overlap)."""
    check_int(k, "k (samples per item)", 2)
    check_choice(split, "split", SPLITS)
    if not isinstance(source, str) or not source:
        raise DataError(f"item source: expected a non-empty string, got {source!r}")
    if gold_choice is not None:
        check_int(gold_choice, "gold_choice", 0, k - 1)
    elif is_gold:
        raise DataError("gold item: gold_choice is required when is_gold is set")
    check_int(overlap, "overlap (labels wanted per item)", 1)


def check_fields(spec: dict[str, Any], allowed: set[str], required: Sequence[str], what: str) -> None:
    """DataError naming `what` when `spec` has a field outside `allowed` or lacks one of `required`."""
    unknown = set(spec) - allowed
    if unknown:
        raise DataError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
    for req in required:
        if req not in spec:
            raise DataError(f"{what}: missing field {req!r}")


def check_item_spec(spec: dict[str, Any], what: str) -> dict[str, Any]:
    """One ``create_items`` spec checked, with its defaults filled in (samples as ``check_sample`` returns)."""
    allowed = {"query_text", "query_token_ids", "samples", "query_source", "split", "batch", "source",
               "is_gold", "gold_choice", "is_calibration", "overlap", "run_id", "created_at", "gold_explanation"}
    check_fields(spec, allowed, ("query_text", "query_token_ids", "samples"), what)
    if not isinstance(spec["query_text"], str):
        raise DataError(f"{what} query_text: expected a string")
    samples = [check_sample(x, f"{what} sample {j}") for j, x in enumerate(spec["samples"])]
    out = dict(query_text=spec["query_text"], query_source=str(spec.get("query_source", "")),
               query_token_ids=token_id_list(spec["query_token_ids"], f"{what} query_token_ids"),
               samples=samples, split=spec.get("split", "train"), batch=str(spec.get("batch", "")),
               source=spec.get("source", "offline"), is_gold=bool(spec.get("is_gold", False)),
               gold_choice=spec.get("gold_choice"), is_calibration=bool(spec.get("is_calibration", False)),
               overlap=spec.get("overlap", 1), run_id=spec.get("run_id"), created_at=spec.get("created_at"),
               gold_explanation=check_explanation(spec.get("gold_explanation"), f"{what} gold_explanation"))
    try:
        check_item_fields(len(samples), out["split"], out["source"], out["is_gold"], out["gold_choice"],
                          out["overlap"])
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    return out


def check_explanation(value: Any, what: str) -> Optional[str]:
    """A gold item's explanation: text or None (empty text: None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{what}: expected a string or None, got {type(value).__name__}")
    return value.strip() or None


def check_verdict(where: str, verdict: Any, chosen: Any, k: int) -> tuple[str, Optional[int]]:
    """A label's verdict and choice: "best" with a canonical index 0..k-1, or "tie" / "none" without one."""
    check_choice(verdict, f"{where}verdict", VERDICTS)
    if verdict == "best":
        if chosen is None:
            raise DataError(f"{where}chosen: a 'best' label names the chosen continuation")
        return verdict, check_int(chosen, f"{where}chosen", 0, k - 1)
    if chosen is not None:
        raise DataError(f"{where}chosen: a {verdict!r} label chooses no continuation (got {chosen!r})")
    return verdict, None


LABEL_VIAS = ("session", "token")


def check_via(where: str, via: Any, api_token_id: Any) -> None:
    """How a label arrived: via None | "session" | "token"; a token id only (and always) with "token"."""
    if via is not None and via not in LABEL_VIAS:
        raise DataError(f"{where}via: expected one of {', '.join(LABEL_VIAS)} or none, got {via!r}")
    if api_token_id is not None and (via != "token" or isinstance(api_token_id, bool)
                                     or not isinstance(api_token_id, int) or api_token_id < 1):
        raise DataError(f"{where}api_token_id: a positive token id, only for labels made via a token")


def check_label_extras(where: str, time_taken_s: Any, note: Any, confidence: Any, created_at: Any) -> None:
    """The checks a label's optional fields get (time taken, note, confidence, created_at)."""
    if time_taken_s is not None and (not isinstance(time_taken_s, numbers.Real) or isinstance(time_taken_s, bool)
                                     or not math.isfinite(time_taken_s) or time_taken_s < 0):
        raise DataError(f"{where}time_taken_s: expected a finite number >= 0 or None, got {time_taken_s!r}")
    if confidence is not None:
        check_int(confidence, f"{where}confidence", 0)
    if note is not None and not isinstance(note, str):
        raise DataError(f"{where}note: expected a string or None, got {type(note).__name__}")
    if created_at is not None and (not isinstance(created_at, dt.datetime) or created_at.tzinfo is None):
        raise DataError(f"{where}created_at: expected a timezone-aware datetime, got {created_at!r}")
