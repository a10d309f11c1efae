"""The labels' direction on their way in: a label written to the store must come out, through the store's read
path and the Values Coach's data path, choosing the sample it chose.

Every other check of the preflight reads the labelers' choice through the same path as the Values Coach's
training (`LabelStore.comparisons` → `reward.data`), so a path that reads the choice reversed is invisible to them:
the Values Coach learns the reversed labels and then agrees with them. This check writes labels whose choice is
known into a scratch store of the run's store class (a temporary SQLite file: the run's store is never written),
reads them back exactly as training reads labels, and requires every choice to land on the sample it named.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from megacoach.labels.records import NewSample
from megacoach.reward.data import as_comparisons, comparison_tensors

# (samples, chosen canonical index, shown order): K = 2 and K = 4, choices away from both ends and the middle
_PROBES = (
    ([[11, 12], [21, 22, 23]], 1, [1, 0]),
    ([[31], [41, 42], [51, 52, 53], [61]], 2, [3, 2, 0, 1]),
    ([[71, 72], [81]], 0, [1, 0]),
)


def roundtrip_choices(store_class) -> list[str]:
    """Labels with known choices through a scratch store of `store_class` and the Values Coach's data path; returns
    one line per label whose choice came back on another sample (empty: every choice read as written)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="megacoach-roundtrip-") as tmp:
        store = store_class(f"sqlite:///{Path(tmp) / 'roundtrip.db'}")
        try:
            lab = store.get_or_create_labeler("guards:roundtrip", kind="program")
            written = []
            for i, (samples, chosen, shown) in enumerate(_PROBES):
                content = store.create_item(f"roundtrip {i}", [1, 2, 3],
                                            [NewSample(f"sample {j}", ids) for j, ids in enumerate(samples)],
                                            split="valid", batch="guards/roundtrip", source="offline")
                store.add_comparison(content.item.id, chosen=chosen, labeler=lab, shown_order=shown)
                written.append((samples, chosen))
            records = store.comparisons(batch="guards/roundtrip")
        finally:
            store.close()
    if len(records) != len(written):
        return [f"{len(written)} labels written, {len(records)} read back"]
    for n, (rec, (samples, chosen)) in enumerate(zip(records, written)):
        got = list(rec.samples[rec.chosen].token_ids)
        if got != samples[chosen]:
            problems.append(f"label {n + 1} (K = {len(samples)}): the store reads sample {rec.chosen} as chosen, "
                            f"written {chosen}")
    for n, (comp, (samples, chosen)) in enumerate(zip(as_comparisons(records), written)):
        _, responses, picked = comparison_tensors([comp], pad_id=0)
        got = [t for t in responses[0, int(picked[0])].tolist() if t != 0]
        if got != samples[chosen]:
            problems.append(f"label {n + 1} (K = {len(samples)}): the Values Coach's data path reads sample "
                            f"{int(picked[0])} as chosen, written {chosen}")
    return problems
