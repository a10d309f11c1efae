"""Mock labelers: programs that play the human evaluators (paper section 3.1.1).

A labeler sees a query and K responses (in the order shown) and returns the index of the best one.
Programs are labelers of kind 'program'; their labels go through the same store API as people's.

- `VaderLabeler`: the VADER sentiment compound score of each response; picks the most positive
  (ties broken by the rng). The paper's mock used a sentiment classifier's log-odds the same way.
- `NoisyLabeler(base, agreement)`: agrees with `base` with probability `agreement`, else picks
  uniformly among the other K-1 responses (real labelers agree with researchers ~40-77%).
- `InvertedLabeler(base)`: prefers what `base` likes least (the section 4.4 bug, as a labeler).
- `load_labeler(spec)`: "vader", "vader:invert", "vader:noise=0.7" (= agreement 0.7; "agree=0.7"
  is the same), modifiers chain left to right ("vader:invert:agree=0.9"); a leading "mock:" is
  allowed, so a stored labeler name ("mock:vader:agree=0.7") is a spec; or "package.module:name"
  where name is a callable(query, responses) -> index, a Labeler class (built without arguments),
  or a Labeler instance, optionally followed by the same modifiers.
- `label_items(store, labeler, ...)`: label stored items and write the comparisons.
"""

from __future__ import annotations

import importlib
import math
import numbers
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union, runtime_checkable

from megacoach.errors import ConfigError, DataError
from megacoach.labels.records import ComparisonRecord, DuplicateLabelError, ItemContent, ItemRecord

if TYPE_CHECKING:
    import numpy as np

    from megacoach.labels.store import LabelStore

RandomLike = Union[random.Random, "np.random.Generator"]


@runtime_checkable
class Labeler(Protocol):
    """A human evaluator stand-in. `name` is its labeler row in the store; `kind` is 'program'."""

    name: str
    kind: str

    def choose(self, query: str, responses: Sequence[str], rng: RandomLike) -> int:
        """Index (into `responses`, as shown) of the best response."""
        ...

    def scores(self, query: str, responses: Sequence[str]) -> Optional[list[float]]:
        """Per-response preference scores (higher = preferred), or None when the labeler has none."""
        ...


def randbelow(rng: RandomLike, n: int) -> int:
    """A uniform integer in [0, n) from a `random.Random` or a numpy Generator."""
    if hasattr(rng, "integers"):
        return int(rng.integers(n))
    return rng.randrange(n)


def uniform01(rng: RandomLike) -> float:
    return float(rng.random())


def permutation(rng: RandomLike, k: int) -> list[int]:
    """A uniformly random order of 0..k-1 (Fisher-Yates on `randbelow`, so both rng kinds agree in kind)."""
    order = list(range(k))
    for i in range(k - 1, 0, -1):
        j = randbelow(rng, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def argbest(scores: Sequence[float], rng: RandomLike, *, lowest: bool = False) -> int:
    """Index of the highest (or lowest) score; exact ties broken uniformly by `rng`."""
    if not scores:
        raise DataError("a labeler needs at least one response")
    target = min(scores) if lowest else max(scores)
    tied = [i for i, s in enumerate(scores) if s == target]
    return tied[0] if len(tied) == 1 else tied[randbelow(rng, len(tied))]


class VaderLabeler:
    """Prefers the response with the highest VADER compound sentiment score (-1..1)."""

    kind = "program"

    def __init__(self, name: str = "mock:vader"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name = name
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)["compound"])

    def scores(self, query: str, responses: Sequence[str]) -> list[float]:
        return [self.score(r) for r in responses]  # the continuation alone, as the paper's mock

    def choose(self, query: str, responses: Sequence[str], rng: RandomLike) -> int:
        return argbest(self.scores(query, responses), rng)

    def __repr__(self) -> str:
        return f"VaderLabeler(name={self.name!r})"


def _check_choice(labeler: Any, value: Any, k: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < k:
        raise DataError(f"labeler {getattr(labeler, 'name', labeler)!r} returned {value!r}; "
                        f"expected an index 0..{k - 1}")
    return int(value)


class NoisyLabeler:
    """Agrees with `base` with probability `agreement`; otherwise picks uniformly among the other K-1.
    `scores` are the base's (the noise is in the choices)."""

    kind = "program"

    def __init__(self, base: Labeler, agreement: float, name: Optional[str] = None):
        if isinstance(agreement, bool) or not isinstance(agreement, numbers.Real) or not 0.0 <= agreement <= 1.0:
            raise ConfigError(f"labeler agreement: expected a probability in [0, 1], got {agreement!r}")
        self.base = base
        self.agreement = float(agreement)
        self.name = name or f"{base.name}:agree={self.agreement:g}"

    def scores(self, query: str, responses: Sequence[str]) -> Optional[list[float]]:
        return self.base.scores(query, responses)

    def choose(self, query: str, responses: Sequence[str], rng: RandomLike) -> int:
        k = len(responses)
        pick = _check_choice(self.base, self.base.choose(query, responses, rng), k)
        if k < 2 or uniform01(rng) < self.agreement:
            return pick
        other = randbelow(rng, k - 1)
        return other if other < pick else other + 1

    def __repr__(self) -> str:
        return f"NoisyLabeler({self.base!r}, agreement={self.agreement:g})"


class InvertedLabeler:
    """Prefers what `base` likes least (needs a base with scores)."""

    kind = "program"

    def __init__(self, base: Labeler, name: Optional[str] = None):
        self.base = base
        self.name = name or f"{base.name}:invert"

    def _base_scores(self, query: str, responses: Sequence[str]) -> list[float]:
        s = self.base.scores(query, responses) if hasattr(self.base, "scores") else None
        if s is None:
            raise ConfigError(f"labeler {self.base.name!r} gives no scores, so it cannot be inverted")
        return list(s)

    def scores(self, query: str, responses: Sequence[str]) -> list[float]:
        return [-x for x in self._base_scores(query, responses)]

    def choose(self, query: str, responses: Sequence[str], rng: RandomLike) -> int:
        return argbest(self._base_scores(query, responses), rng, lowest=True)

    def __repr__(self) -> str:
        return f"InvertedLabeler({self.base!r})"


class CallableLabeler:
    """Wraps a plain function `fn(query, responses) -> index` as a Labeler."""

    kind = "program"

    def __init__(self, fn: Callable[[str, list[str]], int], name: str):
        self.fn = fn
        self.name = name

    def scores(self, query: str, responses: Sequence[str]) -> None:
        return None

    def choose(self, query: str, responses: Sequence[str], rng: RandomLike) -> int:
        return _check_choice(self, self.fn(query, list(responses)), len(responses))

    def __repr__(self) -> str:
        return f"CallableLabeler({self.name!r})"


def _import_object(module: str, attr: str, spec: str) -> Any:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"labeler spec {spec!r}: cannot import module {module!r} ({e})") from e
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"labeler spec {spec!r}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def _as_labeler(obj: Any, name: str, spec: str) -> Labeler:
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:
            raise ConfigError(f"labeler spec {spec!r}: cannot build {obj.__name__}() ({e})") from e
    if hasattr(obj, "choose"):
        if not getattr(obj, "name", None):
            try:
                obj.name = name
            except AttributeError:
                raise ConfigError(f"labeler spec {spec!r}: the labeler has no name") from None
        if getattr(obj, "kind", "program") != "program":
            raise ConfigError(f"labeler spec {spec!r}: a program labeler must have kind 'program'")
        if not hasattr(obj, "kind"):
            obj.kind = "program"
        if not hasattr(obj, "scores"):
            obj.scores = lambda query, responses: None
        return obj
    if callable(obj):
        return CallableLabeler(obj, name)
    raise ConfigError(f"labeler spec {spec!r}: {name} is neither a labeler nor a callable")


def _parse_probability(value: str, key: str, spec: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise ConfigError(f"labeler spec {spec!r}: {key}= expects a number, got {value!r}") from None
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ConfigError(f"labeler spec {spec!r}: {key}= expects a probability in [0, 1], got {value}")
    return p


def load_labeler(spec: str) -> Labeler:
    """Build a mock labeler from a spec string (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"labeler spec: expected e.g. 'vader' or 'vader:noise=0.7', got {spec!r}")
    parts = [p.strip() for p in spec.strip().split(":")]
    if parts[0] == "mock" and len(parts) > 1:  # a labeler's stored name is a spec too
        parts = parts[1:]
    head = parts[0]
    labeler: Labeler
    if head == "vader":
        labeler, mods = VaderLabeler(), parts[1:]
    elif len(parts) >= 2 and head.replace(".", "_").isidentifier() and parts[1].replace(".", "_").isidentifier() \
            and parts[1] != "invert":
        module, attr, mods = head, parts[1], parts[2:]
        labeler = _as_labeler(_import_object(module, attr, spec), f"mock:{module}:{attr}", spec)
    else:
        raise ConfigError(f"labeler spec {spec!r}: unknown labeler {head!r}; expected 'vader' or "
                          "'package.module:callable'")
    for mod in mods:
        key, _, value = mod.partition("=")
        if mod == "invert":
            labeler = InvertedLabeler(labeler)
        elif key in ("noise", "agree") and value:
            labeler = NoisyLabeler(labeler, _parse_probability(value, key, spec))
        else:
            raise ConfigError(f"labeler spec {spec!r}: unknown modifier {mod!r}; expected 'invert', "
                              "'noise=P' or 'agree=P' (P = probability of agreeing with the base labeler)")
    return labeler


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoLabelResult:
    labeler: str
    written: list[ComparisonRecord]
    already_labeled: int  # items skipped because this labeler had labeled them (e.g. another process)


def label_items(store: "LabelStore", labeler: Labeler,
                items: Optional[Sequence[Union[int, ItemRecord, ItemContent]]] = None, *,
                rng: Optional[RandomLike] = None, seed: int = 0, batch: Optional[str] = None,
                split: Optional[str] = None, limit: Optional[int] = None, guideline_version: Optional[str] = None,
                shuffle: bool = True, chunk: int = 512) -> AutoLabelResult:
    """Label items with a program labeler, through the same store API people's labels use.

    items: ids / ItemRecords / ItemContents; None = every item this labeler has not labeled yet
    (optionally only `batch` / `split`, at most `limit`). Each item's samples are shown in a random
    order (shuffle=True) as people see them; the choice is stored as a canonical index with that
    shown order. The labeler row is `labeler.name`, kind 'program'. Writes are one transaction per
    `chunk` items; items this labeler already labeled are skipped, not doubled."""
    if getattr(labeler, "kind", "program") != "program":
        raise ConfigError(f"labeler {labeler.name!r}: label_items is for program labelers")
    rng = rng if rng is not None else random.Random(seed)
    row = store.get_or_create_labeler(labeler.name, kind="program", role="program")
    if items is None:
        ids = [it.id for it in store.items_without_labels(labeler=row.id, batch=batch, split=split, limit=limit)]
    else:
        ids = [x.item.id if isinstance(x, ItemContent) else x.id if isinstance(x, ItemRecord) else x for x in items]
    written: list[ComparisonRecord] = []
    skipped = 0
    for start in range(0, len(ids), chunk):
        decisions = []
        for content in store.item_contents(ids[start : start + chunk]):
            k = content.item.k
            shown = permutation(rng, k) if shuffle else list(range(k))
            responses = [content.samples[c].text for c in shown]
            pos = _check_choice(labeler, labeler.choose(content.query.text, responses, rng), k)
            decisions.append((content.item.id, shown[pos], shown))
        n_written, n_skipped = len(written), skipped
        with store.transaction():
            for item_id, chosen, shown in decisions:
                try:
                    written.append(store.add_comparison(item_id, chosen, row, shown_order=shown,
                                                        guideline_version=guideline_version))
                except DuplicateLabelError:
                    skipped += 1
            store.append_audit(row.name, "labels.auto", {
                "written": len(written) - n_written, "already_labeled": skipped - n_skipped,
                "items": [decisions[0][0], decisions[-1][0]], "batch": batch, "split": split})
    return AutoLabelResult(row.name, written, skipped)


def labeler_scores(labeler: Labeler, queries: Sequence[str], texts: Sequence[str]) -> "np.ndarray":
    """The labelers' score of each response (mock labelers: e.g. VADER compound); NaN if they only rank."""
    import numpy as np

    out = []
    for q, t in zip(queries, texts):
        s = labeler.scores(q, [t])
        out.append(float(s[0]) if s else float("nan"))
    return np.array(out, dtype=float)
