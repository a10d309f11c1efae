"""Best-of-K comparisons as the Values Coach sees them, and how they become one padded batch.

A comparison is a query, K >= 2 samples (truncated responses) in canonical order, and the index of
the one the human evaluator (or mock labeler) chose. Records from the label store are adapted with
`as_comparison`; anything with `query_ids`, `sample_ids` and `chosen` attributes works.

Layout of a batch (the same as during PPO): each of the K sequences of a comparison is
`left_pad(query) + right_pad(sample)`; the pad token marks every padding position, so the Values
Coach reads its reward at the last non-pad token (see model.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from megacoach.errors import DataError


@dataclass(frozen=True)
class Comparison:
    """One label: `sample_ids[chosen]` was judged best of the K samples of `query_ids`."""

    query_ids: list[int]
    sample_ids: list[list[int]]
    chosen: int

    @property
    def k(self) -> int:
        return len(self.sample_ids)


def _first_attr(record, names: tuple[str, ...]):
    for n in names:
        if isinstance(record, dict) and n in record:
            return record[n]
        if hasattr(record, n):
            return getattr(record, n)
    raise DataError(f"comparison record {record!r:.120}: missing field (expected one of {', '.join(names)})")


def as_comparison(record) -> Comparison:
    """A `Comparison` from any record (dataclass, object or dict): the label store's `ComparisonRecord`
    (query_token_ids, sample_token_ids, chosen), OpenAI-style dicts (query, samples, best), or our own."""
    if isinstance(record, Comparison):
        return record
    q = _first_attr(record, ("query_ids", "query_token_ids", "query"))
    s = _first_attr(record, ("sample_ids", "sample_token_ids", "samples_token_ids", "samples"))
    c = _first_attr(record, ("chosen", "best"))
    return Comparison([int(t) for t in q], [[int(t) for t in x] for x in s], int(c))


def as_comparisons(records: Iterable) -> list[Comparison]:
    return [as_comparison(r) for r in records]


def labels_from_store(store, labeler_kind: str | None = None) -> tuple[list[Comparison], list[Comparison]]:
    """(train, valid) comparisons: all labels so far in a `LabelStore` (its 'train' and 'valid' splits)."""
    return (as_comparisons(store.comparisons(split="train", labeler_kind=labeler_kind)),
            as_comparisons(store.comparisons(split="valid", labeler_kind=labeler_kind)))


def validate_comparisons(comparisons: Sequence[Comparison], vocab_size: int | None = None,
                         name: str = "comparisons") -> int:
    """Check every record (K >= 2, one K for all, chosen in range, ids in the vocabulary); return K."""
    k = None
    for i, c in enumerate(comparisons):
        if len(c.sample_ids) < 2:
            raise DataError(f"{name}[{i}]: {len(c.sample_ids)} samples (expected K >= 2)")
        if k is None:
            k = len(c.sample_ids)
        elif len(c.sample_ids) != k:
            raise DataError(f"{name}[{i}]: {len(c.sample_ids)} samples, but earlier records have K={k} "
                            "(expected one K for all comparisons)")
        if not 0 <= c.chosen < k:
            raise DataError(f"{name}[{i}]: chosen index {c.chosen} out of range (expected 0..{k - 1})")
        if not c.query_ids and not any(c.sample_ids):
            raise DataError(f"{name}[{i}]: empty query and samples")
        if vocab_size is not None:
            ids = [t for s in c.sample_ids for t in s] + list(c.query_ids)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise DataError(f"{name}[{i}]: token id {bad[0]} outside the vocabulary (expected 0..{vocab_size - 1})")
    if k is None:
        raise DataError(f"{name}: no comparisons")
    return k


def _strip(ids: Sequence[int], pad_id: int, side: str) -> list[int]:
    ids = list(ids)
    if side == "left":
        while ids and ids[0] == pad_id:
            ids.pop(0)
    else:
        while ids and ids[-1] == pad_id:
            ids.pop()
    return ids


def sequences_tensor(queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """[N, Tq + Tr]: each query left-padded to the longest query, each response right-padded to the longest."""
    qs = [_strip(q, pad_id, "left") for q in queries]
    rs = [_strip(r, pad_id, "right") for r in responses]
    tq, tr = max((len(q) for q in qs), default=0), max((len(r) for r in rs), default=0)
    out = torch.full((len(qs), tq + tr), pad_id, dtype=torch.long, device="cpu")
    for i, (q, r) in enumerate(zip(qs, rs)):
        if q:
            out[i, tq - len(q):tq] = torch.tensor(q, dtype=torch.long, device="cpu")
        if r:
            out[i, tq:tq + len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
    return out


def comparison_tensors(comparisons: Sequence[Comparison], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries [B, Q] left-padded, responses [B, K, R] right-padded, chosen [B]): the shared-query layout."""
    qs = [_strip(c.query_ids, pad_id, "left") for c in comparisons]
    rs = [[_strip(s, pad_id, "right") for s in c.sample_ids] for c in comparisons]
    k = max((len(c.sample_ids) for c in comparisons), default=0)
    tq = max((len(q) for q in qs), default=0)
    tr = max((len(s) for group in rs for s in group), default=0)
    queries = torch.full((len(qs), tq), pad_id, dtype=torch.long, device="cpu")
    responses = torch.full((len(qs), k, tr), pad_id, dtype=torch.long, device="cpu")
    for b, (q, group) in enumerate(zip(qs, rs)):
        if q:
            queries[b, tq - len(q):] = torch.tensor(q, dtype=torch.long, device="cpu")
        for j, s in enumerate(group):
            if s:
                responses[b, j, :len(s)] = torch.tensor(s, dtype=torch.long, device="cpu")
    chosen = torch.tensor([c.chosen for c in comparisons], dtype=torch.long, device="cpu")
    return queries, responses, chosen


def comparison_batch(comparisons: Sequence[Comparison], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B*K, T], chosen [B]) with rows ordered comparison-major: row b*K + k is sample k of b."""
    queries = [c.query_ids for c in comparisons for _ in c.sample_ids]
    responses = [s for c in comparisons for s in c.sample_ids]
    chosen = torch.tensor([c.chosen for c in comparisons], dtype=torch.long, device="cpu")
    return sequences_tensor(queries, responses, pad_id), chosen
