"""Moving labels in and out of the store.

- `import_openai_labels`: OpenAI's released best-of-K label files (lm-human-preferences), a JSON list
  of ``{"query": [ids], "sample0": [ids], ..., "sample{K-1}": [ids], "best": int}`` with GPT-2 token
  ids, padded with OpenAI's pad token 50259 (``OPENAI_PAD_TOKEN_ID``), which is stripped. Texts are
  decoded with the tokenizer given (any object with ``decode(ids)``; its vocabulary size bounds the
  ids). Every record is checked before anything is written; the import is one transaction.
- `export_jsonl` / `import_jsonl`: megacoach's own line format (one comparison per line, with the
  item, query, samples and their provenance, choice, shown order, labeler, batch, split, guideline
  version, timestamps, flag and note). Export then import into a fresh store gives the same labels.
- `export_dataset`: the same rows as a Hugging Face `datasets.Dataset` (``save_to_disk`` if a path).
- `import_labels(store, path, tokenizer)`: picks the importer from the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from megacoach.errors import ConfigError, DataError
from megacoach.labels.records import ComparisonRecord, NewSample
from megacoach.labels.store import LabelStore

if TYPE_CHECKING:
    import datasets

OPENAI_PAD_TOKEN_ID = 50259  # lm-human-preferences: len(GPT-2 encoder) + 2
JSONL_FORMAT = "megacoach-labels/1"
_SAMPLE_KEY = re.compile(r"^sample(\d+)$")


@dataclass(frozen=True)
class OpenAIRecord:
    """One validated record of an OpenAI label file (pad tokens removed)."""

    query: list[int]
    samples: list[list[int]]
    best: int


@dataclass(frozen=True)
class ImportResult:
    items: int
    comparisons: int
    batch: str
    sha256: str
    comparison_ids: tuple[int, ...]


def vocab_size_of(tokenizer: Any) -> int:
    """Number of token ids a tokenizer knows (len() includes added tokens for HF tokenizers)."""
    for get in (lambda t: len(t), lambda t: t.vocab_size, lambda t: t.get_vocab_size()):
        try:
            n = get(tokenizer)
        except (TypeError, AttributeError):
            continue
        if isinstance(n, int) and n > 0:
            return n
    raise ConfigError(f"tokenizer {type(tokenizer).__name__}: cannot tell its vocabulary size; pass vocab_size=")


def _decode_all(tokenizer: Any, seqs: list[list[int]]) -> list[str]:
    if not hasattr(tokenizer, "decode"):
        raise ConfigError(f"tokenizer {type(tokenizer).__name__}: has no decode(ids)")
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode(seqs))
    return [tokenizer.decode(s) for s in seqs]


def _ids(value: Any, where: str, vocab_size: int, pad: Optional[int]) -> list[int]:
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of token ids, got {type(value).__name__}")
    out = []
    for pos, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise DataError(f"{where}: position {pos}: expected an integer token id, got {t!r}")
        if t == pad:
            continue
        if not 0 <= t < vocab_size:
            raise DataError(f"{where}: token id {t} at position {pos} is outside the vocabulary "
                            f"(0..{vocab_size - 1}); wrong tokenizer?")
        out.append(t)
    return out


def parse_openai_labels(data: Any, *, vocab_size: int, k: Optional[int] = None,
                        pad_token_id: Optional[int] = OPENAI_PAD_TOKEN_ID, source: str = "labels") -> list[OpenAIRecord]:
    """Validate OpenAI label records (all of them, before anything is written). K is read from the
    sampleN keys of the first record unless given; every record must have the same K >= 2."""
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of label records, got {type(data).__name__}")
    out: list[OpenAIRecord] = []
    k_from: Optional[int] = None if k is None else -1
    for i, rec in enumerate(data):
        where = f"{source}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with query, sample0.., best; got {type(rec).__name__}")
        for field_name in ("query", "best"):
            if field_name not in rec:
                raise DataError(f"{where}: missing field {field_name!r}")
        idx = sorted(int(m.group(1)) for key in rec if (m := _SAMPLE_KEY.match(key)))
        for j, n in enumerate(idx):
            if n != j:
                raise DataError(f"{where}: missing field 'sample{j}' (has {', '.join(f'sample{x}' for x in idx)})")
        if len(idx) < 2:
            raise DataError(f"{where}: has {len(idx)} sample field(s); expected sample0..sample{{K-1}} with K >= 2")
        if k is None:
            k, k_from = len(idx), i
        elif len(idx) != k:
            like = f"like record {k_from}" if k_from is not None and k_from >= 0 else "as asked"
            raise DataError(f"{where}: has {len(idx)} samples (sample0..sample{len(idx) - 1}), expected {k} {like}")
        best = rec["best"]
        if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < k:
            raise DataError(f"{where}: field 'best': expected an integer 0..{k - 1}, got {best!r}")
        query = _ids(rec["query"], f"{where}: field 'query'", vocab_size, pad_token_id)
        samples = [_ids(rec[f"sample{j}"], f"{where}: field 'sample{j}'", vocab_size, pad_token_id) for j in range(k)]
        out.append(OpenAIRecord(query, samples, best))
    if not out:
        raise DataError(f"{source}: no label records")
    return out


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: no such label file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _refuse_repeat(store: LabelStore, sha: str, what: str) -> None:
    for entry in store.audit_entries(action="labels.import"):
        if entry.detail.get("sha256") == sha:
            raise DataError(f"{what}: these labels were already imported (audit entry {entry.id}, "
                            f"{entry.at:%Y-%m-%d %H:%M} UTC); pass allow_duplicate=True to import them again")


def _verify_choices(store: LabelStore, ids: Sequence[int], chosen_tokens: Sequence[Sequence[int] | None],
                    what: str) -> None:
    """Read the labels just written (ids, in order) back through `LabelStore.comparisons`, the path the Values Coach
    trains from (every label, ties and decided items included: `view="all"`), inside the import's transaction: each
    must choose the sample the file chose, else DataError (and nothing is imported). A path that reads the choice
    reversed would otherwise be learnt, then scored as agreement. None: a tie or "none acceptable" (no choice)."""
    if not ids:
        return
    back = {c.id: c for c in store.comparisons(after_id=min(ids) - 1, upto_id=max(ids), view="all")}
    for n, (cid, want) in enumerate(zip(ids, chosen_tokens)):
        if want is None:
            continue
        c = back.get(cid)
        if c is None or list(c.samples[c.chosen].token_ids) != list(want):
            got = "nothing" if c is None else f"sample {c.chosen}"
            raise DataError(f"{what}: label {n + 1} reads back from the label store choosing {got}, not the sample "
                            "the file chose: the store's choice is read wrongly; nothing was imported")


def _splits(n: int, split: str, valid_fraction: float, seed: int) -> list[str]:
    if split not in ("train", "valid"):
        raise ConfigError(f"split: expected train or valid, got {split!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction: expected a number in [0, 1), got {valid_fraction!r}")
    out = [split] * n
    for i in random.Random(seed).sample(range(n), round(n * valid_fraction)):
        out[i] = "valid"
    return out


def import_openai_labels(store: LabelStore, source: Union[str, Path, list[Any]], tokenizer: Any, *,
                         vocab_size: Optional[int] = None, k: Optional[int] = None, split: str = "train",
                         valid_fraction: float = 0.0, seed: int = 0, batch: Optional[str] = None,
                         labeler_name: str = "import:openai", labeler_kind: str = "person",
                         policy: str = "openai:gpt2-124M", guideline_version: str = "openai-2019",
                         pad_token_id: Optional[int] = OPENAI_PAD_TOKEN_ID, actor: str = "import",
                         allow_duplicate: bool = False) -> ImportResult:
    """Import an OpenAI best-of-K label file (path or already-loaded list) as items + comparisons.

    Each record becomes one item (source 'import', batch = the file's stem unless given, shown in
    canonical order) labeled by `labeler_name` (the released labels came from people, so kind
    'person' by default). `valid_fraction` of the records (chosen with `seed`) go to split 'valid'.
    Bad records -> DataError naming the record and field; importing the same labels twice ->
    DataError unless allow_duplicate. All or nothing: one transaction."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        data, what, default_batch = _read_json(path), str(path), path.stem
    else:
        data, what, default_batch = source, "labels", "import"
    vocab = vocab_size if vocab_size is not None else vocab_size_of(tokenizer)
    records = parse_openai_labels(data, vocab_size=vocab, k=k, pad_token_id=pad_token_id, source=what)
    splits = _splits(len(records), split, valid_fraction, seed)
    batch = default_batch if batch is None else batch
    sha = _digest([[r.query, r.samples, r.best] for r in records])
    if not allow_duplicate:
        _refuse_repeat(store, sha, what)
    texts = _decode_all(tokenizer, [seq for r in records for seq in [r.query, *r.samples]])
    specs, pos = [], 0
    for r, sp in zip(records, splits):
        q_text, s_texts = texts[pos], texts[pos + 1 : pos + 1 + len(r.samples)]
        pos += 1 + len(r.samples)
        specs.append(dict(query_text=q_text, query_token_ids=r.query, query_source=f"import:{batch}",
                          samples=[NewSample(t, ids, policy=policy) for t, ids in zip(s_texts, r.samples)],
                          split=sp, batch=batch, source="import"))
    with store.transaction():
        lab = store.get_or_create_labeler(labeler_name, kind=labeler_kind)
        contents = store.create_items(specs)
        ids = store.add_comparisons([dict(item_id=c.item.id, chosen=r.best, labeler=lab,
                                          guideline_version=guideline_version)
                                     for c, r in zip(contents, records)])
        _verify_choices(store, ids, [r.samples[r.best] for r in records], what)
        store.append_audit(actor, "labels.import", {
            "format": "openai", "source": what, "sha256": sha, "items": len(contents), "comparisons": len(ids),
            "batch": batch, "labeler": labeler_name, "k": len(records[0].samples)})
    return ImportResult(len(contents), len(ids), batch, sha, tuple(ids))


# ---------------------------------------------------------------------------------------------------
# megacoach JSONL


def _iso(t: Optional[dt.datetime]) -> Optional[str]:
    return None if t is None else t.isoformat()


def comparison_to_dict(c: ComparisonRecord) -> dict[str, Any]:
    """One export row (JSON-ready)."""
    return {
        "format": JSONL_FORMAT,
        "comparison_id": c.id,
        "item": {"id": c.item_id, "batch": c.batch, "split": c.split, "source": c.item_source,
                 "is_gold": c.is_gold, "gold_choice": c.gold_choice, "gold_explanation": c.gold_explanation,
                 "is_calibration": c.is_calibration, "created_at": _iso(c.item_created_at)},
        "query": {"id": c.query_id, "text": c.query_text, "token_ids": c.query_token_ids},
        "samples": [{"id": s.id, "text": s.text, "token_ids": s.token_ids, "policy": s.policy,
                     "iteration": s.iteration, "seed": s.seed, "run_id": s.run_id, "created_at": _iso(s.created_at)}
                    for s in c.samples],
        "verdict": c.verdict,  # best (chosen names it) | tie (equally good) | none (none acceptable)
        "chosen": c.chosen,
        "adjudication": c.adjudication,  # an adjudicator's decision on an item whose labels disagree
        "shown_order": c.shown_order,
        "labeler": c.labeler_name,
        "labeler_kind": c.labeler_kind,
        "batch": c.batch,
        "split": c.split,
        "guideline_version": c.guideline_version,
        "time_taken_s": c.time_taken_s,
        "flagged": c.flagged,
        "note": c.note,
        "too_fast": c.too_fast,
        "confidence": c.confidence,
        "labeled_at": _iso(c.created_at),
        "via": c.via,
        "api_token_id": c.api_token_id,
    }


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_jsonl(store: LabelStore, path: Union[str, Path], *, split: Optional[str] = None,
                 batch: Optional[str] = None, after_id: Optional[int] = None) -> int:
    """Write the store's comparisons (optionally filtered) to `path`, one JSON object per line, in id
    order: every label as recorded (ties, "none acceptable" and adjudicators' decisions too); the file
    appears complete or not at all. Returns the number written."""
    rows = store.comparisons(split=split, batch=batch, after_id=after_id, view="all")

    def write(fh: Any) -> None:
        for c in rows:
            fh.write(json.dumps(comparison_to_dict(c), ensure_ascii=False) + "\n")

    _atomic_write(Path(path), write)
    return len(rows)


def _parse_time(value: Any, where: str) -> Optional[dt.datetime]:
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected an ISO timestamp, got {value!r}") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _need(obj: Any, key: str, where: str, types: Any) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise DataError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def import_jsonl(store: LabelStore, path: Union[str, Path], *, actor: str = "import",
                 allow_duplicate: bool = False) -> ImportResult:
    """Import a file written by `export_jsonl` (into this or another store). Items, samples with
    their provenance, labelers (by name and kind), choices, shown orders and timestamps are kept;
    rows of one exported item become one item with several labels. Validated first; one transaction."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such label file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    rows, raw = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or row.get("format") != JSONL_FORMAT:
            raise DataError(f"{where}: not a megacoach label row (format {JSONL_FORMAT!r} expected)")
        raw.append(row)
        item = _need(row, "item", where, dict)
        query = _need(row, "query", where, dict)
        samples = _need(row, "samples", where, list)
        rows.append(dict(
            where=where, item_key=_need(item, "id", f"{where}: item", int),
            item=item, query=query, samples=samples,
            verdict=row.get("verdict", "best"), adjudication=bool(row.get("adjudication", False)),
            chosen=_need(row, "chosen", where, int) if row.get("verdict", "best") == "best" else row.get("chosen"),
            shown_order=_need(row, "shown_order", where, list),
            labeler=_need(row, "labeler", where, str), labeler_kind=_need(row, "labeler_kind", where, str),
            guideline_version=_need(row, "guideline_version", where, str),
            time_taken_s=row.get("time_taken_s"), flagged=bool(row.get("flagged", False)), note=row.get("note"),
            too_fast=bool(row.get("too_fast", False)), confidence=row.get("confidence"),
            via=row.get("via"),  # the token id means nothing in another store; how it arrived does
            labeled_at=_parse_time(row.get("labeled_at"), f"{where}: labeled_at")))
    if not rows:
        raise DataError(f"{path}: no label rows")
    # one item per exported item id; its query/samples must agree across rows
    specs: dict[int, dict[str, Any]] = {}
    for r in rows:
        where, it, q = r["where"], r["item"], r["query"]
        try:
            samples = [NewSample(_need(s, "text", f"{where}: sample {j}", str),
                                 _need(s, "token_ids", f"{where}: sample {j}", list),
                                 policy=s.get("policy") or "", iteration=s.get("iteration"), seed=s.get("seed"),
                                 run_id=s.get("run_id")) for j, s in enumerate(r["samples"])]
        except (TypeError, AttributeError):
            raise DataError(f"{where}: field 'samples' must be a list of objects") from None
        spec = dict(query_text=_need(q, "text", f"{where}: query", str),
                    query_token_ids=_need(q, "token_ids", f"{where}: query", list),
                    samples=samples, split=_need(it, "split", f"{where}: item", str),
                    batch=_need(it, "batch", f"{where}: item", str), source=_need(it, "source", f"{where}: item", str),
                    is_gold=bool(it.get("is_gold", False)), gold_choice=it.get("gold_choice"),
                    gold_explanation=it.get("gold_explanation"), is_calibration=bool(it.get("is_calibration", False)),
                    created_at=_parse_time(it.get("created_at"), f"{where}: item created_at"))
        prev = specs.setdefault(r["item_key"], spec)
        if prev is not spec and (prev["query_token_ids"] != spec["query_token_ids"]
                                 or [s.token_ids for s in prev["samples"]] != [s.token_ids for s in samples]):
            raise DataError(f"{where}: item {r['item_key']} differs from an earlier row of the same item")
    keys = list(specs)
    sha = _digest(raw)
    if not allow_duplicate:
        _refuse_repeat(store, sha, str(path))
    kinds: dict[str, str] = {}
    for r in rows:
        if kinds.setdefault(r["labeler"], r["labeler_kind"]) != r["labeler_kind"]:
            raise DataError(f"{r['where']}: labeler {r['labeler']!r} appears as both {kinds[r['labeler']]} "
                            f"and {r['labeler_kind']}")
    with store.transaction():
        for name, kind in kinds.items():
            if kind not in ("person", "program"):
                raise DataError(f"{path}: labeler {name!r}: kind must be person or program, got {kind!r}")
            store.get_or_create_labeler(name, kind=kind)
        contents = store.create_items([specs[k] for k in keys])
        new_id = {k: c.item.id for k, c in zip(keys, contents)}
        labels = []
        for r in rows:
            labels.append(dict(item_id=new_id[r["item_key"]], chosen=r["chosen"], labeler=r["labeler"],
                               shown_order=r["shown_order"], guideline_version=r["guideline_version"],
                               time_taken_s=r["time_taken_s"], flagged=r["flagged"], note=r["note"],
                               too_fast=r["too_fast"], confidence=r["confidence"], created_at=r["labeled_at"],
                               via=r["via"], verdict=r["verdict"], adjudication=r["adjudication"]))
        try:
            ids = store.add_comparisons(labels)
        except DataError as e:  # name the line, not the position in the list
            m = re.match(r"label (\d+): (.*)", str(e), re.S)
            if m:
                raise type(e)(f"{rows[int(m.group(1))]['where']}: {m.group(2)}") from None
            raise
        chosen = [None if r["chosen"] is None else specs[r["item_key"]]["samples"][r["chosen"]].token_ids for r in rows]
        _verify_choices(store, ids, chosen, str(path))
        batches = sorted({s["batch"] for s in specs.values()})
        store.append_audit(actor, "labels.import", {
            "format": "jsonl", "source": str(path), "sha256": sha, "items": len(contents), "comparisons": len(ids),
            "batches": batches})
    return ImportResult(len(contents), len(ids), ",".join(batches), sha, tuple(ids))


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _dataset_features() -> "datasets.Features":
    from datasets import Features, Value

    try:
        from datasets import List as Seq  # datasets >= 4
    except ImportError:  # pragma: no cover
        from datasets import Sequence as Seq

    return Features({
        "comparison_id": Value("int64"), "item_id": Value("int64"),
        "query_text": Value("string"), "query_token_ids": Seq(Value("int32")),
        "sample_texts": Seq(Value("string")), "sample_token_ids": Seq(Seq(Value("int32"))),
        "sample_policies": Seq(Value("string")), "sample_iterations": Seq(Value("int64")),
        "sample_run_ids": Seq(Value("string")),
        "chosen": Value("int32"), "shown_order": Seq(Value("int32")), "k": Value("int32"),
        "labeler": Value("string"), "labeler_kind": Value("string"),
        "batch": Value("string"), "split": Value("string"), "item_source": Value("string"),
        "is_gold": Value("bool"), "is_calibration": Value("bool"),
        "guideline_version": Value("string"), "time_taken_s": Value("float64"),
        "flagged": Value("bool"), "note": Value("string"), "too_fast": Value("bool"), "confidence": Value("int32"),
        "labeled_at": Value("string"),
    })


def export_dataset(store: LabelStore, path: Optional[Union[str, Path]] = None, *, split: Optional[str] = None,
                   batch: Optional[str] = None) -> "datasets.Dataset":
    """The store's comparisons as a `datasets.Dataset` (one row per comparison, samples in canonical
    order, `chosen` indexing them); saved with `save_to_disk(path)` when a path is given. These are the
    labels the Values Coach trains on (the store's training view: no ties or "none acceptable", an
    adjudicator's decision in place of the labels it decided); the JSONL export has every label."""
    from datasets import Dataset

    rows = [{
        "comparison_id": c.id, "item_id": c.item_id, "query_text": c.query_text, "query_token_ids": c.query_token_ids,
        "sample_texts": c.sample_texts, "sample_token_ids": c.sample_token_ids,
        "sample_policies": [s.policy for s in c.samples], "sample_iterations": [s.iteration for s in c.samples],
        "sample_run_ids": [s.run_id for s in c.samples],
        "chosen": c.chosen, "shown_order": c.shown_order, "k": c.k, "labeler": c.labeler_name,
        "labeler_kind": c.labeler_kind, "batch": c.batch, "split": c.split, "item_source": c.item_source,
        "is_gold": c.is_gold, "is_calibration": c.is_calibration, "guideline_version": c.guideline_version,
        "time_taken_s": c.time_taken_s, "flagged": c.flagged, "note": c.note, "too_fast": c.too_fast,
        "confidence": c.confidence, "labeled_at": _iso(c.created_at),
    } for c in store.comparisons(split=split, batch=batch)]
    features = _dataset_features()
    ds = Dataset.from_list(rows, features=features) if rows else Dataset.from_dict(
        {name: [] for name in features}, features=features)
    if path is not None:
        ds.save_to_disk(str(path))
    return ds


def import_labels(store: LabelStore, path: Union[str, Path], tokenizer: Any = None, **kwargs: Any) -> ImportResult:
    """Import a label file: ``.jsonl`` (megacoach export) or ``.json`` (OpenAI best-of-K, needs a tokenizer)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return import_jsonl(store, path, **kwargs)
    if path.suffix == ".json":
        if tokenizer is None:
            raise ConfigError(f"{path}: importing OpenAI label files needs a tokenizer (GPT-2's for their files)")
        return import_openai_labels(store, path, tokenizer, **kwargs)
    raise ConfigError(f"{path}: unknown label file type {path.suffix!r}; expected .json (OpenAI) or .jsonl (megacoach)")
