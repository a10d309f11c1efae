"""Quality and throughput measures of the human evaluators' labels (pure functions).

Inputs are plain `LabelFact` records (one per comparison, joined with its item and sample
provenance); the dashboard builds them from the store and renders what these return.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Optional, Sequence


@dataclass(frozen=True)
class LabelFact:
    """One comparison with what the quality measures need to know about its item."""

    item_id: int
    labeler_id: int
    chosen: Optional[int]  # canonical index (None for a tie or "none acceptable")
    k: int
    created_at: dt.datetime
    item_created_at: dt.datetime
    batch: str = ""
    source: str = ""
    is_gold: bool = False
    gold_choice: Optional[int] = None
    time_taken_s: Optional[float] = None
    too_fast: bool = False
    flagged: bool = False
    labeler_kind: str = "person"
    sample_iterations: tuple[Optional[int], ...] = field(default_factory=tuple)  # per canonical index
    samples_created_at: Optional[dt.datetime] = None  # the newest sample of the item
    verdict: str = "best"  # best | tie | none
    guideline_version: str = ""

    @property
    def answer(self) -> tuple[str, Optional[int]]:
        """What the label says: two labels agree when their answers are equal (a tie agrees with a tie)."""
        return (self.verdict, self.chosen if self.verdict == "best" else None)

    @property
    def hits_gold(self) -> bool:
        return self.verdict == "best" and self.chosen == self.gold_choice


@dataclass(frozen=True)
class Rate:
    n: int
    hits: int

    @property
    def rate(self) -> Optional[float]:
        return self.hits / self.n if self.n else None


def gold_accuracy(facts: Iterable[LabelFact]) -> dict[int, Rate]:
    """Per labeler: how often they chose the researchers' answer on gold items (a tie or "none
    acceptable" misses it)."""
    n: dict[int, int] = defaultdict(int)
    hit: dict[int, int] = defaultdict(int)
    for f in facts:
        if f.is_gold and f.gold_choice is not None:
            n[f.labeler_id] += 1
            hit[f.labeler_id] += int(f.hits_gold)
    return {lab: Rate(n[lab], hit[lab]) for lab in n}


def gold_accuracy_by_day(facts: Iterable[LabelFact]) -> dict[int, list[tuple[dt.date, Rate]]]:
    """Per labeler, their gold accuracy on each UTC day they labeled gold items, oldest first."""
    n: dict[tuple[int, dt.date], int] = defaultdict(int)
    hit: dict[tuple[int, dt.date], int] = defaultdict(int)
    for f in facts:
        if f.is_gold and f.gold_choice is not None:
            key = (f.labeler_id, f.created_at.astimezone(dt.timezone.utc).date())
            n[key] += 1
            hit[key] += int(f.hits_gold)
    out: dict[int, list[tuple[dt.date, Rate]]] = defaultdict(list)
    for lab, day in sorted(n):
        out[lab].append((day, Rate(n[(lab, day)], hit[(lab, day)])))
    return dict(out)


@dataclass(frozen=True)
class Agreement:
    overall: Rate  # over all pairs of labels on the same item
    chance: Optional[float]  # mean 1/K over those pairs (25% for best-of-4)
    per_pair: dict[tuple[int, int], Rate]  # (labeler a < labeler b)
    per_labeler: dict[int, Rate]  # a labeler against everyone else on shared items
    per_version: dict[str, Rate] = field(default_factory=dict)  # by guideline version ("v1 / v2": pairs across)


def agreement(facts: Iterable[LabelFact]) -> Agreement:
    """Labeler-labeler agreement: for every item labeled by two or more labelers, every pair. Two labels
    agree when they give the same answer: the same best continuation, or both "equally good", or both
    "none acceptable" (so ties and "none acceptable" count, as answers of their own)."""
    by_item: dict[int, list[LabelFact]] = defaultdict(list)
    for f in facts:
        by_item[f.item_id].append(f)
    pair_n: dict[tuple[int, int], int] = defaultdict(int)
    pair_hit: dict[tuple[int, int], int] = defaultdict(int)
    lab_n: dict[int, int] = defaultdict(int)
    lab_hit: dict[int, int] = defaultdict(int)
    ver_n: dict[str, int] = defaultdict(int)
    ver_hit: dict[str, int] = defaultdict(int)
    total = hits = 0
    chance_sum = 0.0
    for labels in by_item.values():
        for a, b in combinations(sorted(labels, key=lambda x: x.labeler_id), 2):
            if a.labeler_id == b.labeler_id:
                continue
            same = int(a.answer == b.answer)
            versions = sorted({a.guideline_version, b.guideline_version})
            ver = " / ".join(versions)
            ver_n[ver] += 1
            ver_hit[ver] += same
            key = (a.labeler_id, b.labeler_id)
            pair_n[key] += 1
            pair_hit[key] += same
            for lab in key:
                lab_n[lab] += 1
                lab_hit[lab] += same
            total += 1
            hits += same
            chance_sum += 1.0 / max(a.k, 1)
    return Agreement(
        overall=Rate(total, hits),
        chance=chance_sum / total if total else None,
        per_pair={k: Rate(pair_n[k], pair_hit[k]) for k in pair_n},
        per_labeler={k: Rate(lab_n[k], lab_hit[k]) for k in lab_n},
        per_version={k: Rate(ver_n[k], ver_hit[k]) for k in sorted(ver_n)},
    )


@dataclass(frozen=True)
class CanaryPoint:
    batch: str
    first_at: dt.datetime
    n: int
    preferred: int  # labels choosing canonical sample 0 of the canary item

    @property
    def rate(self) -> Optional[float]:
        return self.preferred / self.n if self.n else None


def drift_canary(facts: Iterable[LabelFact], source: str = "canary") -> list[CanaryPoint]:
    """Per batch, how often the fixed canary comparison (items with ``source == 'canary'``, the
    same query and samples in every batch) is decided for its canonical sample 0. A drifting
    rate means the labelers' standards are drifting."""
    n: dict[str, int] = defaultdict(int)
    pref: dict[str, int] = defaultdict(int)
    first: dict[str, dt.datetime] = {}
    for f in facts:
        if f.source != source:
            continue
        n[f.batch] += 1
        pref[f.batch] += int(f.verdict == "best" and f.chosen == 0)
        first[f.batch] = min(first.get(f.batch, f.item_created_at), f.item_created_at)
    points = [CanaryPoint(b, first[b], n[b], pref[b]) for b in n]
    return sorted(points, key=lambda p: (p.first_at, p.batch))


@dataclass(frozen=True)
class WinPoint:
    iteration: int
    n: int
    wins: int
    chance: float  # what a coin would give: share of the item's samples from the trained policy

    @property
    def rate(self) -> Optional[float]:
        return self.wins / self.n if self.n else None


def win_rate_vs_initial(facts: Iterable[LabelFact], initial_iteration: int = 0) -> list[WinPoint]:
    """The trained policy's win rate against the initial policy, from people's labels, by iteration.

    An item counts when its samples come from both the initial policy (iteration
    ``initial_iteration``) and one later iteration t; a label is a win for iteration t when the
    chosen sample is one of the later policy's.
    """
    n: dict[int, int] = defaultdict(int)
    wins: dict[int, int] = defaultdict(int)
    chance: dict[int, float] = defaultdict(float)
    for f in facts:
        if f.labeler_kind != "person" or not f.sample_iterations:
            continue
        its = f.sample_iterations
        later = {i for i in its if i is not None and i != initial_iteration}
        if initial_iteration not in its or len(later) != 1 or None in its:
            continue
        (t,) = later
        if f.verdict != "best" or f.chosen is None or not 0 <= f.chosen < len(its):
            continue  # a tie or "none acceptable" is no win for either policy
        n[t] += 1
        wins[t] += int(its[f.chosen] == t)
        chance[t] += sum(1 for i in its if i == t) / len(its)
    return [WinPoint(t, n[t], wins[t], chance[t] / n[t]) for t in sorted(n)]


def per_hour(times: Iterable[dt.datetime], now: dt.datetime, hours: int = 24) -> list[int]:
    """Counts per hour over the last ``hours`` hours, oldest first (the last entry is the past hour)."""
    counts = [0] * hours
    for t in times:
        age_h = (now - t).total_seconds() / 3600.0
        if 0 <= age_h < hours:
            counts[hours - 1 - int(age_h)] += 1
    return counts


def quantile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-quantile (nearest-rank, q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latencies_s(facts: Iterable[LabelFact]) -> list[float]:
    """Labeling latency of each label: from the newest sample of its item being created to the label."""
    out = []
    for f in facts:
        start = f.samples_created_at or f.item_created_at
        out.append(max(0.0, (f.created_at - start).total_seconds()))
    return out
