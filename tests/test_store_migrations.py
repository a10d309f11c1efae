"""Schema versions: a store written at revision 0001 upgrades with its data; newer -> refused; models
match the migrations."""

from __future__ import annotations

import hashlib

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from megacoach.errors import StoreError
from megacoach.labels.records import NewSample
from megacoach.labels.schema import Base
from megacoach.labels.store import LabelStore


def _engine(path):
    return create_engine(f"sqlite:///{path}")


def _migrate(path, revision, step=command.upgrade):
    """Run Alembic's `step` (upgrade or downgrade) to `revision` on the SQLite store at `path`."""
    engine = _engine(path)
    cfg = LabelStore._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        step(cfg, revision)
    engine.dispose()


def _upgrade(path, revision):
    _migrate(path, revision)


def _downgrade(path, revision):
    _migrate(path, revision, command.downgrade)


def _fill_v1(path):
    """Data as the 0001 code wrote it (raw SQL: that code no longer exists)."""
    engine = _engine(path)
    with engine.begin() as c:
        c.execute(text("INSERT INTO queries (id, text, token_ids, source, created_at) "
                       "VALUES (1, 'Once upon', '[5, 6]', 'books', '2026-01-01 10:00:00')"))
        for sid, (t, ids) in enumerate([("a", "[1]"), ("b", "[2, 3]")], start=1):
            c.execute(text("INSERT INTO samples (id, query_id, text, token_ids, policy, iteration, seed, run_id, "
                           "created_at) VALUES (:id, 1, :t, :ids, 'ckpt-0', 0, 1, 'r0', '2026-01-01 10:00:00')"),
                      {"id": sid, "t": t, "ids": ids})
        c.execute(text("INSERT INTO items (id, query_id, k, sample_ids, batch, split, source, is_gold, gold_choice, "
                       "run_id, created_at) VALUES (1, 1, 2, '[1, 2]', 'b0', 'train', 'offline', 0, NULL, 'r0', "
                       "'2026-01-01 10:00:00')"))
        c.execute(text("INSERT INTO labelers (id, name, kind, role, password_hash, active, created_at) "
                       "VALUES (1, 'alice', 'person', 'labeler', NULL, 1, '2026-01-01 10:00:00')"))
        c.execute(text("INSERT INTO comparisons (id, item_id, chosen, shown_order, labeler_id, labeler_kind, "
                       "guideline_version, time_taken_s, flagged, note, split, created_at) VALUES "
                       "(1, 1, 1, '[1, 0]', 1, 'person', 'v1', 3.5, 0, 'ok', 'train', '2026-01-01 10:01:00')"))
    engine.dispose()


def test_store_from_previous_schema_upgrades_and_keeps_data(tmp_path):
    path = tmp_path / "old.db"
    _upgrade(path, "0001")
    _fill_v1(path)
    cols = {c["name"] for c in inspect(_engine(path)).get_columns("comparisons")}
    assert "too_fast" not in cols and "confidence" not in cols

    with LabelStore(f"sqlite:///{path}") as store:
        assert store.schema_version() == LabelStore.code_schema_version()
        [c] = store.comparisons()
        assert (c.chosen, c.shown_order, c.note, c.guideline_version, c.time_taken_s) == (1, [1, 0], "ok", "v1", 3.5)
        assert c.query_token_ids == [5, 6] and c.sample_token_ids == [[1], [2, 3]]
        assert c.samples[0].policy == "ckpt-0" and c.labeler_name == "alice"
        assert c.too_fast is False and c.confidence is None  # new columns, defaults for old rows
        assert c.created_at.year == 2026 and c.created_at.tzinfo is not None
        item = store.get_item(1)
        assert item.is_calibration is False and item.overlap == 1
        # the new columns and tables are usable
        content = store.create_item("q", [1], [NewSample("x", [1]), NewSample("y", [2])], is_calibration=True,
                                    overlap=2)
        rec = store.add_comparison(content.item.id, 0, "alice", too_fast=True, confidence=4)
        assert rec.too_fast and rec.confidence == 4 and store.get_item(content.item.id).is_calibration
        store.pull_andon("alice", "looks wrong")
        store.set_run_status("r0", "paused")
        assert store.position() == rec.id == 2


def test_newer_schema_refused_nothing_written(tmp_path):
    path = tmp_path / "new.db"
    with LabelStore(f"sqlite:///{path}") as store:
        store.add_query("q", [1])
    engine = _engine(path)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError) as e:
        LabelStore(f"sqlite:///{path}")
    msg = str(e.value)
    assert "9999_future" in msg and LabelStore.code_schema_version() in msg and "newer" in msg
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_foreign_database_refused(tmp_path):
    path = tmp_path / "foreign.db"
    engine = _engine(path)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE comparisons (x INTEGER)"))
    engine.dispose()
    with pytest.raises(StoreError, match="no schema version"):
        LabelStore(f"sqlite:///{path}")


def test_models_match_migrations(tmp_path):
    path = tmp_path / "head.db"
    LabelStore(f"sqlite:///{path}").close()
    ours = set(Base.metadata.tables)
    engine = _engine(path)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True, "compare_server_default": False,
            # compare the tables the code defines (test_every_table_is_in_the_schema checks there are no others)
            "include_object": lambda obj, name, type_, reflected, compare_to: (
                type_ != "table" or name in ours) and (type_ == "table" or obj.table.name in ours),
        })
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_every_table_is_in_the_schema(tmp_path):
    """The labeling app's tables (revision 0003_app_auth) live in labels/schema.py like the others."""
    path = tmp_path / "head.db"
    LabelStore(f"sqlite:///{path}").close()
    engine = _engine(path)
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    engine.dispose()
    assert tables == set(Base.metadata.tables)
    assert {"web_sessions", "invitations", "api_tokens", "item_locks", "andon_clears"} <= tables


def test_downgrade_0002_to_0001(tmp_path):
    path = tmp_path / "down.db"
    _upgrade(path, "0002")
    _fill_v1(path)
    _downgrade(path, "0001")
    engine = _engine(path)
    insp = inspect(engine)
    assert "andon_pulls" not in insp.get_table_names()
    assert "too_fast" not in {c["name"] for c in insp.get_columns("comparisons")}
    with engine.connect() as c:
        assert c.execute(text("SELECT chosen FROM comparisons")).scalar() == 1
    engine.dispose()


def test_upgrade_from_0005_marks_finished_items_and_adds_the_indexes(tmp_path):
    """0006: items that have their labels (or are calibration/gold items) come out filled; the rest stay open
    and are served; the assignment indexes exist; downgrading to 0005 removes them again."""
    path = tmp_path / "v5.db"
    _upgrade(path, "0005_app_secrets")
    _fill_v1(path)  # item 1 with one label from alice
    engine = _engine(path)
    with engine.begin() as c:
        c.execute(text("INSERT INTO items (id, query_id, k, sample_ids, batch, split, source, is_gold, gold_choice, "
                       "is_calibration, overlap, run_id, created_at) VALUES "
                       "(2, 1, 2, '[1, 2]', 'b0', 'train', 'offline', 0, NULL, 0, 1, 'r0', '2026-01-01 10:00:00'), "
                       "(3, 1, 2, '[1, 2]', 'b0', 'train', 'offline', 0, NULL, 1, 1, 'r0', '2026-01-01 10:00:00'), "
                       "(4, 1, 2, '[1, 2]', 'b0', 'train', 'offline', 0, NULL, 0, 2, 'r0', '2026-01-01 10:00:00')"))
        c.execute(text("INSERT INTO comparisons (id, item_id, chosen, shown_order, labeler_id, labeler_kind, "
                       "guideline_version, time_taken_s, flagged, note, too_fast, split, created_at) VALUES "
                       "(2, 4, 0, '[0, 1]', 1, 'person', 'v1', 3.5, 0, NULL, 0, 'train', '2026-01-01 10:02:00')"))
    engine.dispose()
    with LabelStore(f"sqlite:///{path}") as store:
        assert store.schema_version() == LabelStore.code_schema_version()
        with store.engine.connect() as c:
            filled = dict(c.execute(text("SELECT id, filled FROM items ORDER BY id")).all())
        assert filled == {1: 1, 2: 0, 3: 1, 4: 0}  # labeled; open; calibration; overlap 2 with one label
        bob = store.get_or_create_labeler("bob").id
    insp = inspect(_engine(path))
    assert {"login_failures", "rate_limits"} <= set(insp.get_table_names())  # 0007, 0008: the throttles
    indexes = {i["name"] for t in ("items", "skips") for i in insp.get_indexes(t)}
    assert {"ix_items_open", "ix_items_open_source", "ix_items_is_calibration", "ix_items_is_gold",
            "ix_skips_item_labeler"} <= indexes

    from megacoach.labels.assignment import Assigner

    store = LabelStore(f"sqlite:///{path}")
    asg = Assigner(lambda: store.session())
    seen = []
    for _ in range(4):
        got = asg.next_item(bob)
        if got is None:
            break
        seen.append(got.item_id)
        store.add_comparison(got.item_id, 0, bob)
    store.close()
    assert sorted(seen) == [2, 3, 4]  # the open items and the calibration item, not the labeled one

    _downgrade(path, "0005_app_secrets")
    engine = _engine(path)
    insp = inspect(engine)
    assert "filled" not in {c["name"] for c in insp.get_columns("items")}
    engine.dispose()


def test_upgrade_from_0007_adds_the_rate_limits_and_keeps_the_login_failures(tmp_path):
    """0008: ``rate_limits`` exists and the log-in throttle's rows keep their counts, with no refused try
    noted yet; downgrading to 0007 removes both again and keeps the counts."""
    path = tmp_path / "v7.db"
    _upgrade(path, "0007_login_failures")
    engine = _engine(path)
    with engine.begin() as c:
        c.execute(text("INSERT INTO login_failures (key, kind, failures, last_failed_at) "
                       "VALUES ('k1', 'client', 4, 1000.5)"))
    engine.dispose()
    with LabelStore(f"sqlite:///{path}") as store:
        assert store.schema_version() == LabelStore.code_schema_version()
        with store.engine.connect() as c:
            assert c.execute(text("SELECT key, failures, last_failed_at, refusal_noted_at FROM login_failures")
                             ).all() == [("k1", 4, 1000.5, None)]
            assert c.execute(text("SELECT count(*) FROM rate_limits")).scalar() == 0
    insp = inspect(_engine(path))
    assert "ix_rate_limits_kind_last" in {i["name"] for i in insp.get_indexes("rate_limits")}

    _downgrade(path, "0007_login_failures")
    engine = _engine(path)
    insp = inspect(engine)
    assert "rate_limits" not in insp.get_table_names()
    assert "refusal_noted_at" not in {c["name"] for c in insp.get_columns("login_failures")}
    assert "ix_login_failures_kind_last" in {i["name"] for i in insp.get_indexes("login_failures")}
    with engine.connect() as c:
        assert c.execute(text("SELECT key, failures FROM login_failures")).all() == [("k1", 4)]
    engine.dispose()


def test_upgrade_from_0008_keeps_labels_as_best_and_downgrade_drops_what_0008_cannot_hold(tmp_path):
    """0009: existing labels are "best" labels and no decisions; items get no explanation, labelers are no
    adjudicators; ties, "none acceptable", decisions and explanations work after it. Downgrading to 0008
    deletes the ties, "none acceptable" labels and decisions, keeps every best label and makes ``chosen``
    required again."""
    path = tmp_path / "v8.db"
    _upgrade(path, "0008_rate_limits")
    _fill_v1(path)
    with LabelStore(f"sqlite:///{path}") as store:
        assert store.schema_version() == LabelStore.code_schema_version()
        [old] = store.comparisons(view="all")
        assert (old.verdict, old.chosen, old.adjudication, old.gold_explanation) == ("best", 1, False, None)
        assert store.get_labeler("alice").adjudicator is False
        content = store.create_item("q", [1], [NewSample("x", [1]), NewSample("y", [2])], overlap=2,
                                    gold_explanation="y rhymes")
        item = content.item.id
        assert store.get_item(item).gold_explanation == "y rhymes"
        bob = store.get_or_create_labeler("bob")
        tie = store.add_comparison(item, None, "alice", verdict="tie")
        store.add_comparison(item, 1, bob)
        judge = store.get_or_create_labeler("judge", role="admin")
        decision = store.add_comparison(item, None, judge, verdict="none", adjudication=True)
        assert [c.id for c in store.comparisons()] == [old.id]
        assert tie.chosen is None and decision.adjudication
    insp = inspect(_engine(path))
    assert "uq_comparisons_adjudication" in {i["name"] for i in insp.get_indexes("comparisons")}
    engine = _engine(path)
    with engine.begin() as c:  # the database itself refuses a "best" label without a choice
        with pytest.raises(Exception, match="CHECK"):
            c.execute(text("UPDATE comparisons SET chosen = NULL WHERE id = :id"), {"id": old.id})
    engine.dispose()

    _downgrade(path, "0008_rate_limits")
    engine = _engine(path)
    insp = inspect(engine)
    cols = {c["name"]: c for c in insp.get_columns("comparisons")}
    assert "verdict" not in cols and "adjudication" not in cols and cols["chosen"]["nullable"] is False
    assert "gold_explanation" not in {c["name"] for c in insp.get_columns("items")}
    assert "adjudicator" not in {c["name"] for c in insp.get_columns("labelers")}
    with engine.connect() as c:
        assert c.execute(text("SELECT item_id, chosen, labeler_id FROM comparisons ORDER BY id")).all() == [
            (1, 1, 1), (2, 1, 2)]
    engine.dispose()
    with LabelStore(f"sqlite:///{path}") as store:  # and up again
        assert [(c.verdict, c.chosen) for c in store.comparisons(view="all")] == [("best", 1), ("best", 1)]


def _invite(c, id_, name, role, used_by=None):
    c.execute(text("INSERT INTO invitations (id, token_hash, name, role, created_by, created_at, expires_at, used_at, "
                   "labeler_id) VALUES (:id, :h, :name, :role, 'root', '2026-01-01 10:00:00', '2099-01-01 10:00:00', "
                   ":used, :lab)"),
              dict(id=id_, h=hashlib.sha256(name.encode()).hexdigest(), name=name, role=role,
                   used="2026-01-02 10:00:00" if used_by else None, lab=used_by))


def test_upgrade_from_0009_widens_invitation_roles_and_downgrade_turns_adjudicators_into_labelers(tmp_path):
    """0010: ``invitations.role`` holds "adjudicator" (existing invitations kept as they were). Downgrading to
    0009 turns every adjudicator invitation into a labeler invitation (the flag is lost for the open ones),
    keeps the others, and leaves the adjudicator flag of an account made from such an invitation set."""
    path = tmp_path / "v9.db"
    _upgrade(path, "0009_verdicts_adjudication")
    engine = _engine(path)
    with engine.begin() as c:
        _invite(c, 1, "lena", "labeler")
        _invite(c, 2, "root2", "admin")
    engine.dispose()
    with LabelStore(f"sqlite:///{path}") as store:
        assert store.schema_version() == "0010_invitation_roles" == LabelStore.code_schema_version()
        judge = store.get_or_create_labeler("judith")
        store.update_labeler(judge.id, adjudicator=True)
        with store.engine.begin() as c:
            _invite(c, 3, "judith", "adjudicator", used_by=judge.id)
            _invite(c, 4, "ada", "adjudicator")
    engine = _engine(path)
    assert {c["name"]: c for c in inspect(engine).get_columns("invitations")}["role"]["type"].length == 20
    engine.dispose()

    _downgrade(path, "0009_verdicts_adjudication")
    engine = _engine(path)
    role = {c["name"]: c for c in inspect(engine).get_columns("invitations")}["role"]
    assert role["type"].length == 10 and role["nullable"] is False
    with engine.connect() as c:
        assert c.execute(text("SELECT id, name, role, labeler_id FROM invitations ORDER BY id")).all() == [
            (1, "lena", "labeler", None), (2, "root2", "admin", None), (3, "judith", "labeler", judge.id),
            (4, "ada", "labeler", None)]
        assert c.execute(text("SELECT adjudicator FROM labelers WHERE name = 'judith'")).scalar() == 1
    engine.dispose()
