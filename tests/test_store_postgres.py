"""The label store on PostgreSQL (runs only when MEGACOACH_TEST_PG_URL names an empty, disposable database,
e.g. postgresql+psycopg://postgres@127.0.0.1:5432/megacoach_test). Each test wipes the database first."""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest
from sqlalchemy import create_engine, text

from megacoach.errors import StoreError
from megacoach.labels.io import export_jsonl, import_jsonl, import_openai_labels
from megacoach.labels.labelers import VaderLabeler, label_items
from megacoach.labels.records import DuplicateLabelError, NewSample
from megacoach.labels.store import LabelStore

PG_URL = os.environ.get("MEGACOACH_TEST_PG_URL")
pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not PG_URL, reason="set MEGACOACH_TEST_PG_URL to a disposable PostgreSQL database")]


def _wipe():
    engine = create_engine(PG_URL)
    with engine.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def store():
    _wipe()
    s = LabelStore(PG_URL)
    yield s
    s.close()


class Tok:
    vocab_size = 100

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_basic_flow(store):
    c = store.create_item("q", [1, 2], [NewSample("I love it", [3], policy="p", iteration=1),
                                         NewSample("I hate it", [4])], batch="b")
    store.get_or_create_labeler("alice")
    rec = store.add_comparison(c.item.id, 1, "alice", shown_order=[1, 0], time_taken_s=2.0)
    with pytest.raises(DuplicateLabelError):
        store.add_comparison(c.item.id, 0, "alice")
    assert store.comparisons() == [rec] and store.position() == rec.id
    with pytest.raises(RuntimeError), store.transaction():
        store.create_item("q2", [1], [NewSample("a", [1]), NewSample("b", [2])])
        raise RuntimeError
    assert len(store.items()) == 1
    store.set_run_status("r", "running", 1, {"x": 1})
    assert store.set_run_status("r", "halted").status == "halted"
    store.pull_andon("alice", "bad", run_id="r")
    assert len(store.andon_pulls("r")) == 1
    store.set_guideline("v1", "# g")
    store.append_audit("alice", "x", {"a": [1, 2]})
    assert store.audit_entries()[0].detail == {"a": [1, 2]}
    assert label_items(store, VaderLabeler()).written[0].chosen == 0


def test_import_export(store, tmp_path):
    recs = [{"query": [1, 2], "sample0": [3], "sample1": [4], "sample2": [5], "sample3": [6], "best": i % 4}
            for i in range(5)]
    import_openai_labels(store, recs, Tok())
    export_jsonl(store, tmp_path / "l.jsonl")
    first = [(c.chosen, c.sample_token_ids) for c in store.comparisons()]
    store.close()
    _wipe()
    with LabelStore(PG_URL) as fresh:
        import_jsonl(fresh, tmp_path / "l.jsonl")
        assert [(c.chosen, c.sample_token_ids) for c in fresh.comparisons()] == first


def test_threads(store):
    ids = [store.create_item(f"q{i}", [i], [NewSample("a", [1]), NewSample("b", [2])]).item.id for i in range(10)]
    store.get_or_create_labeler("shared")
    wins, errors = [], []

    def run(name):
        try:
            store.get_or_create_labeler(name)
            for i in ids:
                store.add_comparison(i, 0, name)
                try:
                    store.add_comparison(i, 1, "shared")
                    wins.append(i)
                except DuplicateLabelError:
                    pass
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(wins) == ids
    pairs = Counter((c.item_id, c.labeler_name) for c in store.comparisons())
    assert len(pairs) == 50 and max(pairs.values()) == 1


def test_newer_schema_refused(store):
    store.close()
    engine = create_engine(PG_URL)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(StoreError, match="9999_future"):
        LabelStore(PG_URL)


def test_ties_decisions_and_disagreements(store):
    """Migration 0009 on PostgreSQL: ties and "none acceptable" (chosen NULL, checked by the database), one
    decision per item (the partial unique index), the training view, and the disagreement query."""
    from megacoach.app.adjudication import Adjudication, disputed_items
    from megacoach.app.auth import Principal
    from megacoach.labels.schema import ComparisonRow

    c = store.create_item("q", [1, 2], [NewSample(f"s{j}", [3 + j]) for j in range(3)], overlap=2,
                          gold_explanation="why")
    item = c.item.id
    a, b = store.get_or_create_labeler("alice").id, store.get_or_create_labeler("bob").id
    judge = store.get_or_create_labeler("judge", role="admin")
    best = store.add_comparison(item, 2, a)
    tie = store.add_comparison(item, None, b, verdict="tie")
    assert tie.chosen is None and store.comparisons() == [best]
    with store.session(write=False) as s:
        assert list(s.scalars(disputed_items(2))) == [item]
    adj = Adjudication(store, 2)
    assert adj.counts() == dict(open=1, decided=0)
    who = Principal(judge.id, "judge", "admin", "person", "session")
    assert adj.open_items(who) == [item]
    out = adj.decide(who, item, "best", 1, "s0 reads best")
    assert [(x.chosen, x.adjudication) for x in store.comparisons()] == [(0, True)]
    store.get_or_create_labeler("x", kind="program")
    with pytest.raises(DuplicateLabelError):
        store.add_comparisons([dict(item_id=item, chosen=1, labeler="x", adjudication=True)])
    assert adj.counts() == dict(open=0, decided=1) and out["chosen"] == 0
    with pytest.raises(Exception, match="chosen_matches_verdict"), store.session() as s, s.begin():
        s.get(ComparisonRow, best.id).chosen = None
    assert store.get_item(item).gold_explanation == "why"
