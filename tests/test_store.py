"""LabelStore: records, validation, one-label-per-labeler, transactions, guidelines, audit, Andon, errors."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest
from sqlalchemy import text

from megacoach.errors import DataError, StoreError
from megacoach.labels.control import RunStatuses
from megacoach.labels.people import PeopleAdmin
from megacoach.labels.records import ComparisonRecord, DuplicateLabelError, NewSample
from megacoach.labels.schema import Base
from megacoach.labels.store import DEFAULT_URL, LabelStore, normalize_url


@pytest.fixture
def store(tmp_path):
    s = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    yield s
    s.close()


def make_item(store, k=4, split="train", batch="b0", tag="q", **kw):
    samples = [NewSample(f"{tag} sample {j}", [10 * j + 1, 10 * j + 2], policy="ckpt-0", iteration=3, seed=7,
                         run_id="run-a") for j in range(k)]
    return store.create_item(f"{tag} text", [1, 2, 3], samples, split=split, batch=batch, **kw)


def test_create_item_and_label_roundtrip(store):
    content = make_item(store)
    assert content.item.k == 4 and content.item.sample_ids == [s.id for s in content.samples]
    alice = store.get_or_create_labeler("alice")
    assert alice.kind == "person" and alice.role == "labeler"
    rec = store.add_comparison(content.item.id, 2, alice, shown_order=[3, 1, 0, 2], time_taken_s=4.5,
                               guideline_version="v1", note="nice", flagged=True, confidence=3)
    assert isinstance(rec, ComparisonRecord) and dataclasses.is_dataclass(rec)
    assert not isinstance(rec, Base)
    assert rec.chosen == 2 and rec.shown_order == [3, 1, 0, 2]
    assert rec.query_token_ids == [1, 2, 3]
    assert rec.sample_token_ids == [[1, 2], [11, 12], [21, 22], [31, 32]]
    assert rec.sample_texts[2] == "q sample 2"
    assert rec.samples[0].policy == "ckpt-0" and rec.samples[0].iteration == 3 and rec.samples[0].run_id == "run-a"
    assert (rec.labeler_name, rec.labeler_kind, rec.split, rec.batch) == ("alice", "person", "train", "b0")
    assert rec.created_at.tzinfo is not None

    [again] = store.comparisons()
    assert again == rec
    assert store.position() == rec.id
    assert store.count_comparisons() == 1 and store.count_comparisons("valid") == 0


def test_comparisons_filters_and_position(store):
    bob = store.get_or_create_labeler("bob")
    ids = []
    for i in range(6):
        c = make_item(store, k=2, split="valid" if i % 3 == 0 else "train", batch=f"b{i % 2}", tag=f"q{i}")
        ids.append(store.add_comparison(c.item.id, i % 2, bob).id)
    assert store.position() == max(ids)
    assert [c.id for c in store.comparisons(after_id=ids[2])] == ids[3:]
    assert [c.id for c in store.comparisons(after_id=ids[1], upto_id=ids[3])] == ids[2:4]
    assert {c.split for c in store.comparisons(split="valid")} == {"valid"}
    assert len(store.comparisons(split="valid")) == 2 == store.count_comparisons("valid")
    assert {c.batch for c in store.comparisons(batch="b1")} == {"b1"}
    assert len(store.comparisons(limit=2)) == 2
    assert len(store.comparisons(labeler="bob")) == 6


def test_empty_store_position_zero(store):
    assert store.position() == 0 and store.comparisons() == [] and store.count_comparisons() == 0


def test_add_item_from_stored_query_and_samples(store):
    q = store.add_query("hello", [5, 6], source="books")
    smp = store.add_samples(q.id, [NewSample("a", [1]), NewSample("b", [2]), NewSample("c", [3])])
    item = store.add_item(q, [smp[2], smp[0]], split="valid", batch="x", source="online", is_calibration=True,
                          overlap=3)
    assert item.k == 2 and item.sample_ids == [smp[2].id, smp[0].id]
    assert (item.is_calibration, item.overlap, item.source) == (True, 3, "online")
    [content] = store.item_contents([item.id])
    assert [s.text for s in content.samples] == ["c", "a"] and content.query.text == "hello"
    other = store.add_query("other", [7])
    other_s = store.add_samples(other.id, [NewSample("z", [9])])
    with pytest.raises(DataError, match=f"sample {other_s[0].id} continues query {other.id}"):
        store.add_item(q, [smp[0].id, other_s[0].id])
    with pytest.raises(DataError, match="no such sample"):
        store.add_item(q, [smp[0].id, 999])
    with pytest.raises(DataError, match="k=3 but 2"):
        store.add_item(q, [smp[0].id, smp[1].id], k=3)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(k=1), "k \\(samples per item\\)"),
        (dict(split="test"), "split"),
        (dict(is_gold=True), "gold_choice is required"),
        (dict(is_gold=True, gold_choice=4), "gold_choice: expected 0..3"),
        (dict(overlap=0), "overlap"),
        (dict(source=""), "source"),
    ],
)
def test_bad_items_rejected_nothing_written(store, kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        make_item(store, **kwargs)
    assert store.items() == []
    with store.session(write=False) as s:
        assert s.scalar(text("SELECT count(*) FROM queries")) == 0
        assert s.scalar(text("SELECT count(*) FROM samples")) == 0


def test_bad_token_ids_name_the_field(store):
    with pytest.raises(DataError, match=r"item 0 sample 1 token_ids\[1\]"):
        store.create_item("q", [1], [NewSample("a", [1]), NewSample("b", [1, -3])])
    with pytest.raises(DataError, match="query token_ids"):
        store.add_query("q", "not ids")
    with pytest.raises(DataError, match=r"query token_ids\[0\]"):
        store.add_query("q", [1.5])


def test_bad_labels_rejected(store):
    c = make_item(store, k=3)
    alice = store.get_or_create_labeler("alice")
    with pytest.raises(DataError, match=f"item {c.item.id}: chosen: expected 0..2, got 3"):
        store.add_comparison(c.item.id, 3, alice)
    with pytest.raises(DataError, match="chosen: expected an integer"):
        store.add_comparison(c.item.id, True, alice)
    with pytest.raises(DataError, match="shown_order: expected a permutation"):
        store.add_comparison(c.item.id, 0, alice, shown_order=[0, 0, 1])
    with pytest.raises(DataError, match="shown_order"):
        store.add_comparison(c.item.id, 0, alice, shown_order=[0, 1])
    with pytest.raises(DataError, match="item 999: no such item"):
        store.add_comparison(999, 0, alice)
    with pytest.raises(DataError, match="'nobody': no such labeler"):
        store.add_comparison(c.item.id, 0, "nobody")
    with pytest.raises(DataError, match="time_taken_s"):
        store.add_comparison(c.item.id, 0, alice, time_taken_s=float("nan"))
    store.update_labeler(alice, active=False)
    with pytest.raises(DataError, match="deactivated"):
        store.add_comparison(c.item.id, 0, alice)
    assert store.count_comparisons() == 0


def test_duplicate_label_rejected_not_stored_twice(store):
    c = make_item(store)
    store.get_or_create_labeler("alice")
    first = store.add_comparison(c.item.id, 1, "alice")
    with pytest.raises(DuplicateLabelError, match=f"item {c.item.id} already has a label from labeler 'alice'"):
        store.add_comparison(c.item.id, 2, "alice")
    assert [x.chosen for x in store.comparisons()] == [1] and store.position() == first.id
    # another labeler may label the same item
    store.get_or_create_labeler("bob")
    store.add_comparison(c.item.id, 2, "bob")
    assert store.count_comparisons() == 2


def test_unique_constraint_holds_in_the_database(store):
    """Even a writer that bypasses the store's check cannot double a label."""
    c = make_item(store)
    lab = store.get_or_create_labeler("alice")
    store.add_comparison(c.item.id, 1, lab)
    insert = text("INSERT INTO comparisons (item_id, chosen, shown_order, labeler_id, labeler_kind, "
                  "guideline_version, flagged, too_fast, split, created_at) VALUES "
                  "(:i, 0, '[0,1,2,3]', :l, 'person', '', 0, 0, 'train', '2026-01-01')")
    with pytest.raises(Exception, match="UNIQUE"):
        with store.session() as s, s.begin():
            s.execute(insert, {"i": c.item.id, "l": lab.id})
    assert store.count_comparisons() == 1


def test_transaction_all_or_nothing(store):
    store.get_or_create_labeler("alice")
    with pytest.raises(RuntimeError):
        with store.transaction():
            c = make_item(store)
            store.add_comparison(c.item.id, 0, "alice")
            store.append_audit("alice", "label", {"item": c.item.id})
            assert store.count_comparisons() == 1  # reads inside see the transaction's writes
            raise RuntimeError("killed mid-way")
    assert store.items() == [] and store.count_comparisons() == 0 and store.audit_entries() == []

    with store.transaction():
        c = make_item(store)
        store.add_comparison(c.item.id, 0, "alice")
        with pytest.raises(DuplicateLabelError):  # a rejected write inside is a savepoint: the rest stays
            store.add_comparison(c.item.id, 1, "alice")
        store.append_audit("alice", "label")
    assert store.count_comparisons() == 1 and len(store.audit_entries()) == 1


PEOPLE_METHODS = ("get_or_create_labeler", "get_labeler", "labelers", "update_labeler", "add_skip", "skips",
                  "set_guideline", "latest_guideline", "get_guideline", "guidelines", "append_audit", "audit_entries")
CONTROL_METHODS = ("pull_andon", "andon_pulls", "set_run_status", "get_run_status", "run_statuses")


def test_store_combines_its_parts(store):
    """LabelStore offers the people and run-control methods (people.py, control.py) as its own."""
    assert issubclass(LabelStore, PeopleAdmin) and issubclass(LabelStore, RunStatuses)
    for name in PEOPLE_METHODS:
        assert getattr(LabelStore, name) is getattr(PeopleAdmin, name)
    for name in CONTROL_METHODS:
        assert getattr(LabelStore, name) is getattr(RunStatuses, name)
    # the parts share the store's sessions: one transaction spans all three
    with pytest.raises(RuntimeError):
        with store.transaction():
            c = make_item(store)
            store.add_comparison(c.item.id, 0, store.get_or_create_labeler("alice"))
            store.set_guideline("v1", "# be kind")
            store.pull_andon("alice", "gibberish", run_id="r1")
            store.set_run_status("r1", "paused")
            raise RuntimeError("killed mid-way")
    assert store.items() == [] and store.labelers() == [] and store.guidelines() == []
    assert store.andon_pulls() == [] and store.run_statuses() == []


def test_labelers(store):
    a = store.get_or_create_labeler("alice", role="admin")
    assert store.get_or_create_labeler("alice", role="admin") == a
    assert store.get_labeler("alice") == a and store.get_labeler(a.id) == a and store.get_labeler("x") is None
    p = store.get_or_create_labeler("mock:vader", kind="program")
    assert p.role == "program"
    with pytest.raises(DataError, match="exists as a program"):
        store.get_or_create_labeler("mock:vader", kind="person")
    with pytest.raises(DataError, match="does not fit kind"):
        store.get_or_create_labeler("x", kind="program", role="admin")
    with pytest.raises(DataError, match="labeler kind"):
        store.get_or_create_labeler("x", kind="robot")
    b = store.update_labeler("alice", role="labeler", password_hash="h")
    assert b.role == "labeler" and b.password_hash == "h" and "h" not in repr(b)
    assert [x.name for x in store.labelers()] == ["alice", "mock:vader"]


def test_items_without_labels_and_skips(store):
    c1, c2, c3 = (make_item(store, tag=f"q{i}", batch="b" if i < 2 else "c") for i in range(3))
    store.get_or_create_labeler("alice")
    store.get_or_create_labeler("bob")
    store.add_comparison(c1.item.id, 0, "alice")
    assert [i.id for i in store.items_without_labels()] == [c2.item.id, c3.item.id]
    assert [i.id for i in store.items_without_labels(batch="b")] == [c2.item.id]
    assert [i.id for i in store.items_without_labels(labeler="bob")] == [c1.item.id, c2.item.id, c3.item.id]
    assert [i.id for i in store.items_without_labels(labeler="alice", limit=1)] == [c2.item.id]
    sk = store.add_skip(c2.item.id, "bob", "offensive")
    assert sk.reason == "offensive" and store.skips(labeler="bob") == [sk] and store.skips(item_id=c1.item.id) == []
    with pytest.raises(DataError, match="no such item"):
        store.add_skip(12345, "bob")


def test_guidelines_versioned(store):
    assert store.latest_guideline() is None
    store.set_guideline("v1", "# Pick the most positive", created_by="admin")
    g2 = store.set_guideline("v2", "# Pick the most positive, ignore grammar")
    assert store.latest_guideline() == g2
    assert store.set_guideline("v1", "# Pick the most positive").version == "v1"  # idempotent
    with pytest.raises(DataError, match="already exists"):
        store.set_guideline("v1", "changed")
    assert store.get_guideline("v1").created_by == "admin"
    c = make_item(store)
    store.get_or_create_labeler("alice")
    assert store.add_comparison(c.item.id, 0, "alice").guideline_version == "v2"  # latest by default


def test_audit_log_append_only(store):
    e1 = store.append_audit("alice", "label.submit", {"item": 1})
    e2 = store.append_audit("admin", "invite", {"name": "bob"})
    assert store.audit_entries() == [e1, e2]
    assert store.audit_entries(after_id=e1.id) == [e2]
    assert store.audit_entries(actor="admin") == [e2] and store.audit_entries(action="label.submit") == [e1]
    with pytest.raises(DataError, match="JSON"):
        store.append_audit("a", "b", {"x": object()})
    assert not [m for m in dir(store) if "audit" in m and not m.startswith(("append", "audit"))]


def test_andon_and_run_status(store):
    store.get_or_create_labeler("alice")
    assert store.get_run_status("r1") is None
    st = store.set_run_status("r1", "running", 5, {"alarms": []})
    assert (st.status, st.iteration, st.detail) == ("running", 5, {"alarms": []})
    st2 = store.set_run_status("r1", "halted", detail={"alarms": ["score up, KL flat"]})
    assert (st2.status, st2.iteration) == ("halted", 5) and st2.updated_at >= st.updated_at
    store.set_run_status("r2", "finished", 9)
    assert {r.run_id for r in store.run_statuses()} == {"r1", "r2"}
    with pytest.raises(DataError, match="run status"):
        store.set_run_status("r1", "exploded")
    store.set_run_status("r3", "paused", 2, {"reason": "cord"})
    kept = store.set_run_status("r3", "running", 3, {}, unless=("paused",))  # compare-and-set: the pause stays
    assert (kept.status, kept.iteration, kept.detail) == ("paused", 2, {"reason": "cord"})
    assert store.get_run_status("r3").status == "paused"
    assert store.set_run_status("r4", "running", 1, unless=("paused",)).status == "running"  # new row: written
    with pytest.raises(DataError, match="run status"):
        store.set_run_status("r3", "running", unless=("sleeping",))
    p1 = store.pull_andon("alice", "gibberish", run_id="r1")
    p2 = store.pull_andon("alice", "dark text")  # every run
    store.pull_andon("alice", "other", run_id="r2")
    assert [p.id for p in store.andon_pulls("r1")] == [p1.id, p2.id]
    assert p1.labeler_name == "alice" and len(store.andon_pulls()) == 3
    assert store.andon_pulls("r1", after_id=p1.id) == [store.andon_pulls("r1")[1]]


def test_sqlite_pragmas(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_urls(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGACOACH_LABELS_URL", raising=False)
    assert normalize_url(None) == DEFAULT_URL and DEFAULT_URL.startswith("sqlite:///")
    assert normalize_url(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setenv("MEGACOACH_LABELS_URL", "sqlite:///elsewhere.db")
    assert normalize_url(None) == "sqlite:///elsewhere.db"
    with LabelStore(str(tmp_path / "plain.db")) as s:  # a bare path works
        make_item(s)
    with LabelStore("sqlite://") as mem:  # in-memory works too (one process)
        make_item(mem)
        assert len(mem.items()) == 1


def test_unreachable_and_bad_urls(tmp_path):
    with pytest.raises(StoreError, match="unable to open database file"):
        LabelStore(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    with pytest.raises(StoreError, match="cannot use this URL"):
        LabelStore("nosuchdb://user@host/x")
    with pytest.raises(StoreError, match=r"127\.0\.0\.1|refused|connect"):
        LabelStore("postgresql+psycopg://megacoach:secret@127.0.0.1:1/labels", busy_timeout_s=2)


def test_password_hidden_in_errors():
    with pytest.raises(StoreError) as e:
        LabelStore("postgresql+psycopg://megacoach:hunter2@127.0.0.1:1/labels", busy_timeout_s=2)
    assert "hunter2" not in str(e.value)


def test_locked_database_is_a_store_error(tmp_path):
    path = tmp_path / "locked.db"
    store = LabelStore(f"sqlite:///{path}", busy_timeout_s=0.2)
    make_item(store)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            make_item(store)
    finally:
        other.execute("ROLLBACK")
        other.close()
    make_item(store)  # usable again once the lock is gone
    assert len(store.items()) == 2
    store.close()


def test_data_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with LabelStore(url) as s:
        c = make_item(s)
        s.get_or_create_labeler("alice")
        rec = s.add_comparison(c.item.id, 3, "alice")
    with LabelStore(url) as s:
        assert s.comparisons() == [rec]
