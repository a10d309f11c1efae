"""Label import (OpenAI best-of-K files, megacoach JSONL), export (JSONL, datasets), all-or-nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import text

from megacoach.errors import ConfigError, DataError
from megacoach.labels.io import (
    OPENAI_PAD_TOKEN_ID,
    export_dataset,
    export_jsonl,
    import_jsonl,
    import_labels,
    import_openai_labels,
    parse_openai_labels,
    vocab_size_of,
)
from megacoach.labels.labelers import VaderLabeler, label_items
from megacoach.labels.records import NewSample
from megacoach.labels.store import LabelStore

VOCAB = 1000


class StubTokenizer:
    """decode + vocab size, like an HF tokenizer; token i is the word 'w<i>'."""

    vocab_size = VOCAB

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def openai_records(n=6, k=4, seed=0, pad=True):
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        q = [rng.randrange(VOCAB) for _ in range(5)]
        rec = {"query": ([OPENAI_PAD_TOKEN_ID] * 3 + q) if pad else q, "best": rng.randrange(k)}
        for j in range(k):
            s = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 5))]
            rec[f"sample{j}"] = s + ([OPENAI_PAD_TOKEN_ID] * 2 if pad else [])
        recs.append(rec)
    return recs


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def store(tmp_path):
    s = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    yield s
    s.close()


def assert_empty(store):
    assert store.count_comparisons() == 0 and store.items() == [] and store.audit_entries() == []
    assert store.labelers() == []
    with store.session(write=False) as s:
        for table in ("queries", "samples", "items", "comparisons"):
            assert s.scalar(text(f"SELECT count(*) FROM {table}")) == 0


def test_import_openai_file(store, tmp_path):
    recs = openai_records()
    path = write_json(tmp_path / "offline_5k.json", recs)
    res = import_openai_labels(store, path, StubTokenizer())
    assert (res.items, res.comparisons, res.batch) == (6, 6, "offline_5k")
    labels = store.comparisons()
    assert [c.chosen for c in labels] == [r["best"] for r in recs]
    for c, r in zip(labels, recs):
        assert c.query_token_ids == [t for t in r["query"] if t != OPENAI_PAD_TOKEN_ID]  # padding stripped
        assert c.sample_token_ids == [[t for t in r[f"sample{j}"] if t != OPENAI_PAD_TOKEN_ID] for j in range(4)]
        assert c.query_text == StubTokenizer().decode(c.query_token_ids)
        assert c.sample_texts[0] == StubTokenizer().decode(c.sample_token_ids[0])
        assert (c.labeler_name, c.labeler_kind, c.split, c.item_source) == ("import:openai", "person", "train", "import")
        assert c.shown_order == [0, 1, 2, 3] and c.guideline_version == "openai-2019"
        assert c.samples[0].policy == "openai:gpt2-124M"
    [audit] = store.audit_entries(action="labels.import")
    assert audit.detail["sha256"] == res.sha256 and audit.detail["comparisons"] == 6


def test_import_other_k_and_valid_split(store):
    res2 = import_openai_labels(store, openai_records(n=10, k=2, seed=1), StubTokenizer(), batch="pairs",
                                valid_fraction=0.3, seed=5)
    assert res2.items == 10
    assert store.count_comparisons("valid") == 3 and store.count_comparisons("train") == 7
    import_openai_labels(store, openai_records(n=3, k=3, seed=2), StubTokenizer(), batch="triples")
    assert {c.k for c in store.comparisons(batch="pairs")} == {2}
    assert {c.k for c in store.comparisons(batch="triples")} == {3}


def _mutate(recs, what):
    r = recs[2]
    if what == "missing best":
        del r["best"]
    elif what == "missing query":
        del r["query"]
    elif what == "missing sample2":
        del r["sample2"]
    elif what == "K=3":
        del r["sample3"]
    elif what == "K=5":
        r["sample4"] = [1]
    elif what == "best=4":
        r["best"] = 4
    elif what == "best=-1":
        r["best"] = -1
    elif what == "best=str":
        r["best"] = "1"
    elif what == "vocab":
        r["sample1"] = [3, VOCAB + 7]
    elif what == "negative":
        r["query"] = [3, -1]
    elif what == "float id":
        r["sample0"] = [1.5]
    elif what == "query not list":
        r["query"] = "hello"
    elif what == "record not object":
        recs[2] = [1, 2, 3]
    return recs


@pytest.mark.parametrize("what, pattern", [
    ("missing best", "record 2: missing field 'best'"),
    ("missing query", "record 2: missing field 'query'"),
    ("missing sample2", "record 2: missing field 'sample2'"),
    ("K=3", "record 2: has 3 samples .*expected 4 like record 0"),
    ("K=5", "record 2: has 5 samples .*expected 4 like record 0"),
    ("best=4", "record 2: field 'best': expected an integer 0..3, got 4"),
    ("best=-1", "record 2: field 'best'"),
    ("best=str", "record 2: field 'best'"),
    ("vocab", f"record 2: field 'sample1': token id {VOCAB + 7} at position 1 is outside the vocabulary"),
    ("negative", "record 2: field 'query': token id -1"),
    ("float id", "record 2: field 'sample0': position 0: expected an integer"),
    ("query not list", "record 2: field 'query': expected a list"),
    ("record not object", "record 2: expected an object"),
])
def test_bad_records_rejected_before_writing(store, tmp_path, what, pattern):
    path = write_json(tmp_path / "bad.json", _mutate(openai_records(), what))
    with pytest.raises(DataError, match=pattern) as e:
        import_openai_labels(store, path, StubTokenizer())
    assert str(path) in str(e.value)
    assert_empty(store)


def test_bad_files(store, tmp_path):
    with pytest.raises(DataError, match="no such label file"):
        import_openai_labels(store, tmp_path / "missing.json", StubTokenizer())
    (tmp_path / "broken.json").write_text('[{"query": [1], ')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        import_openai_labels(store, tmp_path / "broken.json", StubTokenizer())
    with pytest.raises(DataError, match="expected a JSON list"):
        import_openai_labels(store, write_json(tmp_path / "obj.json", {"query": [1]}), StubTokenizer())
    with pytest.raises(DataError, match="no label records"):
        import_openai_labels(store, write_json(tmp_path / "empty.json", []), StubTokenizer())
    with pytest.raises(DataError, match="has 1 sample field"):
        parse_openai_labels([{"query": [1], "sample0": [1], "best": 0}], vocab_size=10)
    with pytest.raises(DataError, match="expected 2 as asked"):
        parse_openai_labels(openai_records(k=4), vocab_size=VOCAB, k=2)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        import_labels(store, write_json(tmp_path / "x.json", openai_records()))
    with pytest.raises(ConfigError, match="unknown label file type"):
        import_labels(store, tmp_path / "x.csv")
    assert_empty(store)


def test_same_file_twice_refused(store, tmp_path):
    path = write_json(tmp_path / "l.json", openai_records())
    import_openai_labels(store, path, StubTokenizer())
    with pytest.raises(DataError, match="already imported"):
        import_openai_labels(store, path, StubTokenizer())
    assert store.count_comparisons() == 6
    import_openai_labels(store, path, StubTokenizer(), allow_duplicate=True, batch="again")
    assert store.count_comparisons() == 12


def test_failure_inside_the_transaction_leaves_store_as_before(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    path = write_json(tmp_path / "l.json", openai_records())
    store = LabelStore(url)

    def boom(*a, **k):
        raise RuntimeError("killed at the last step")

    monkeypatch.setattr(store, "append_audit", boom)  # the import's last write
    with pytest.raises(RuntimeError):
        import_openai_labels(store, path, StubTokenizer())
    store.close()
    with LabelStore(url) as again:
        assert_empty(again)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from megacoach.labels.store import LabelStore
    from megacoach.labels.io import import_openai_labels

    class Tok:
        vocab_size = 1000
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    store = LabelStore(sys.argv[1])
    real = store.append_audit
    def stall(*a, **k):  # the import's last write: everything else is written, nothing committed
        real(*a, **k)
        print("IN_TRANSACTION", flush=True)
        time.sleep(120)
    store.append_audit = stall
    import_openai_labels(store, sys.argv[2], Tok())
""")


def test_killed_import_leaves_store_as_before(tmp_path):
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    path = write_json(tmp_path / "big.json", openai_records(n=300))
    LabelStore(url).close()
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), url, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline and "IN_TRANSACTION" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"import process ended early: {proc.stderr.read()}")
        assert "IN_TRANSACTION" in line
        proc.kill()  # SIGKILL mid-transaction
    finally:
        proc.kill()
        proc.wait(30)
    with LabelStore(url) as store:
        assert_empty(store)
        with store.session(write=False) as s:
            assert s.scalar(text("PRAGMA integrity_check")) == "ok"
        assert import_openai_labels(store, path, StubTokenizer()).comparisons == 300  # and usable again


def _fill_rich(store):
    """Imported labels plus people's and a program's labels, gold/calibration items and provenance."""
    import_openai_labels(store, openai_records(n=4), StubTokenizer(), batch="oai", valid_fraction=0.25)
    store.set_guideline("v2", "# be kind")
    alice = store.get_or_create_labeler("alice")
    store.get_or_create_labeler("bob")
    for i in range(3):
        c = store.create_item(f"query {i}", [i + 1, 2],
                              [NewSample(t, [j + 5], policy="runs/x/ckpt-3", iteration=3, seed=9, run_id="x")
                               for j, t in enumerate(["I love it", "I hate it", "a table"])],
                              batch="online-3", source="online", split="valid" if i == 2 else "train",
                              is_gold=i == 0, gold_choice=0 if i == 0 else None, is_calibration=i == 1, run_id="x")
        store.add_comparison(c.item.id, 0, alice, shown_order=[2, 0, 1], time_taken_s=5.5, note="easy", flagged=i == 1,
                             confidence=4)
        if i < 2:
            store.add_comparison(c.item.id, 1, "bob", shown_order=[1, 2, 0], too_fast=True, time_taken_s=0.4)
    label_items(store, VaderLabeler(), batch="online-3", seed=1)


def _comparable(store):
    out = []
    for c in store.comparisons():
        out.append((c.query_text, c.query_token_ids, [(s.text, s.token_ids, s.policy, s.iteration, s.seed, s.run_id)
                                                      for s in c.samples],
                    c.chosen, c.shown_order, c.labeler_name, c.labeler_kind, c.guideline_version, c.time_taken_s,
                    c.flagged, c.note, c.too_fast, c.confidence, c.split, c.batch, c.item_source, c.is_gold,
                    c.gold_choice, c.is_calibration, c.created_at, c.item_created_at))
    return out


def test_jsonl_round_trip(tmp_path):
    with LabelStore(f"sqlite:///{tmp_path / 'a.db'}") as a:
        _fill_rich(a)
        n = export_jsonl(a, tmp_path / "out" / "labels.jsonl")
        assert n == a.count_comparisons() == 4 + 5 + 3
        first = _comparable(a)
        items_a = len({c.item_id for c in a.comparisons()})
    row = json.loads((tmp_path / "out" / "labels.jsonl").read_text().splitlines()[5])
    for key in ("item", "query", "samples", "chosen", "shown_order", "labeler", "labeler_kind", "batch", "split",
                "guideline_version", "labeled_at", "flagged", "note", "time_taken_s"):
        assert key in row
    assert {"policy", "iteration", "seed", "run_id"} <= set(row["samples"][0])
    with LabelStore(f"sqlite:///{tmp_path / 'b.db'}") as b:
        res = import_labels(b, tmp_path / "out" / "labels.jsonl")
        assert res.comparisons == n and res.items == items_a  # an item with 3 labels stays one item
        assert _comparable(b) == first
        export_jsonl(b, tmp_path / "again.jsonl")
        with pytest.raises(DataError, match="already imported"):
            import_jsonl(b, tmp_path / "out" / "labels.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("comparison_id", "item", "query", "samples")}  # noqa: E731
    lines_a = [strip(json.loads(x)) for x in (tmp_path / "out" / "labels.jsonl").read_text().splitlines()]
    lines_b = [strip(json.loads(x)) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert lines_a == lines_b


def test_openai_import_export_reimport_same_comparisons(tmp_path):
    with LabelStore(f"sqlite:///{tmp_path / 'a.db'}") as a:
        import_openai_labels(a, openai_records(n=8), StubTokenizer())
        export_jsonl(a, tmp_path / "x.jsonl")
        first = _comparable(a)
    with LabelStore(f"sqlite:///{tmp_path / 'b.db'}") as b:
        import_jsonl(b, tmp_path / "x.jsonl")
        assert _comparable(b) == first


def test_bad_jsonl_names_the_line(store, tmp_path):
    with LabelStore(f"sqlite:///{tmp_path / 'a.db'}") as a:
        _fill_rich(a)
        export_jsonl(a, tmp_path / "good.jsonl")
    lines = (tmp_path / "good.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    bad["chosen"] = 9
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: item \d+: chosen: expected 0..3, got 9"):
        import_jsonl(store, tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        import_jsonl(store, tmp_path / "bad2.jsonl")
    missing = json.loads(lines[0])
    del missing["labeler"]
    (tmp_path / "bad3.jsonl").write_text(json.dumps(missing) + "\n")
    with pytest.raises(DataError, match="line 1: missing field 'labeler'"):
        import_jsonl(store, tmp_path / "bad3.jsonl")
    assert_empty(store)


def test_export_dataset(store, tmp_path):
    from datasets import load_from_disk

    empty = export_dataset(store)
    assert len(empty) == 0 and "chosen" in empty.column_names
    _fill_rich(store)
    ds = export_dataset(store, tmp_path / "ds")
    back = load_from_disk(str(tmp_path / "ds"))
    labels = store.comparisons()
    assert len(back) == len(labels) == len(ds)
    for row, c in zip(back, labels):
        assert row["comparison_id"] == c.id and row["chosen"] == c.chosen
        assert row["query_token_ids"] == c.query_token_ids and row["sample_token_ids"] == c.sample_token_ids
        assert row["sample_texts"] == c.sample_texts and row["shown_order"] == c.shown_order
        assert (row["labeler"], row["labeler_kind"], row["split"], row["batch"]) == (
            c.labeler_name, c.labeler_kind, c.split, c.batch)
        assert row["sample_policies"] == [s.policy for s in c.samples]
    assert len(export_dataset(store, split="valid")) == store.count_comparisons("valid")


def test_real_tokenizer(store, tmp_path):
    """A tiny locally trained BPE tokenizer (the `tokenizers` library) decodes the texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["To be, or not to be, that is the question."] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    assert vocab_size_of(tok) == tok.get_vocab_size()
    q, a, b = (tok.encode(t).ids for t in ("To be, or", " not to be.", " that is the question."))
    res = import_openai_labels(store, [{"query": q, "sample0": a, "sample1": b, "best": 1}], tok)
    [c] = store.comparisons()
    assert res.comparisons == 1 and c.query_text == "To be, or" and c.sample_texts == [" not to be.",
                                                                                       " that is the question."]
    with pytest.raises(DataError, match="outside the vocabulary"):
        import_openai_labels(store, [{"query": [tok.get_vocab_size()], "sample0": a, "sample1": b, "best": 0}], tok)
