"""Pure parts of the labeling app (metrics, security helpers, settings) and `serve` end to end."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from megacoach.app.metrics import LabelFact, agreement, drift_canary, gold_accuracy, per_hour, quantile, win_rate_vs_initial

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def fact(item, lab, chosen, **kw):
    return LabelFact(item_id=item, labeler_id=lab, chosen=chosen, k=kw.pop("k", 4), created_at=kw.pop("at", T0),
                     item_created_at=kw.pop("item_at", T0), **kw)


def test_agreement_pairs_and_chance():
    facts = [fact(1, 1, 0), fact(1, 2, 0), fact(1, 3, 1), fact(2, 1, 2), fact(2, 2, 3), fact(3, 1, 0)]
    a = agreement(facts)
    assert (a.overall.n, a.overall.hits) == (4, 1)  # item 1: 3 pairs (1 agree), item 2: 1 pair
    assert a.chance == pytest.approx(0.25)
    assert a.per_pair[(1, 2)].n == 2 and a.per_pair[(1, 2)].hits == 1
    assert a.per_labeler[3].rate == 0.0
    assert agreement([]).overall.rate is None


def test_gold_accuracy_and_canary_and_win_rate():
    facts = [fact(1, 1, 0, is_gold=True, gold_choice=0), fact(1, 2, 3, is_gold=True, gold_choice=0), fact(2, 1, 1)]
    g = gold_accuracy(facts)
    assert g[1].rate == 1.0 and g[2].rate == 0.0 and 2 in g and len(g) == 2
    c = drift_canary([fact(5, 1, 0, source="canary", batch="b2", item_at=T0 + dt.timedelta(hours=1)),
                      fact(4, 1, 1, source="canary", batch="b1"), fact(4, 2, 0, source="canary", batch="b1")])
    assert [(p.batch, p.n, p.rate) for p in c] == [("b1", 2, 0.5), ("b2", 1, 1.0)]
    w = win_rate_vs_initial([
        fact(7, 1, 2, sample_iterations=(0, 0, 3, 3)), fact(7, 2, 0, sample_iterations=(0, 0, 3, 3)),
        fact(8, 1, 1, k=2, sample_iterations=(0, 9)),
        fact(9, 1, 1, sample_iterations=(3, 3, 3, 3)),  # no initial sample: not counted
        fact(10, 1, 1, k=2, sample_iterations=(0, 9), labeler_kind="program"),  # programs are not people
    ])
    assert [(p.iteration, p.n, p.wins, p.chance) for p in w] == [(3, 2, 1, 0.5), (9, 1, 1, 0.5)]


def test_per_hour_and_quantile():
    now = T0 + dt.timedelta(hours=5)
    counts = per_hour([now - dt.timedelta(minutes=5), now - dt.timedelta(minutes=70), now - dt.timedelta(hours=30)], now, 3)
    assert counts == [0, 1, 1]
    assert quantile([], 0.5) is None and quantile([3, 1, 2], 0.5) == 2 and quantile(list(range(1, 101)), 0.99) == 99


def test_security_helpers():
    from megacoach.app.security import Passwords, hash_secret, new_api_token, password_problem, same_secret
    from megacoach.app.settings import AppSettings

    assert new_api_token().startswith("mct_") and new_api_token() != new_api_token()
    assert len(hash_secret("x")) == 64 and not same_secret("", "") and same_secret("ab", "ab") and not same_secret("ab", "ac")
    assert password_problem("short", "bob", 10) and password_problem("aaaaaaaaaaaa", "bob", 10)
    assert password_problem("alicealice", "alicealice", 10) and password_problem("a good passphrase", "bob", 10) is None
    pw = Passwords.from_settings(AppSettings(argon2_time_cost=1, argon2_memory_kib=1024))
    h = pw.hash("a good passphrase")
    assert pw.verify(h, "a good passphrase") and not pw.verify(h, "wrong") and not pw.verify(None, "x")
    assert not pw.verify("not-a-hash", "x")


def test_settings_errors_name_the_field():
    from megacoach.app.settings import AppSettings
    from megacoach.errors import ConfigError

    with pytest.raises(ConfigError, match="overlap"):
        AppSettings.from_mapping(dict(overlap=0))
    with pytest.raises(ConfigError, match="bogus"):
        AppSettings.from_mapping(dict(bogus=1))


def test_item_sources_setting_limits_what_people_get(tmp_path):
    from fastapi.testclient import TestClient

    from megacoach.app.server import create_app
    from test_app_support import FAST, add_items, login, make_person, make_store, take_next

    store = make_store(tmp_path)
    make_person(store, "alice")
    add_items(store, 2, source="offline")
    human = add_items(store, 1, source="human")
    c = TestClient(create_app(settings=dict(FAST, item_sources=("human",)), store=store))
    login(c, "alice")
    assert take_next(c).json()["item"]["item_id"] == human[0]


def test_serve_prints_admin_link_and_answers(tmp_path):
    """`serve` (what `megacoach label serve` calls) on 127.0.0.1: one-time admin link, then pages."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    code = (f"from megacoach.app import serve; serve({db!r}, '127.0.0.1', {port}, "
            "dict(argon2_time_cost=1, argon2_memory_kib=1024), log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        link = None
        deadline = time.monotonic() + 40
        while link is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"(http://127\.0\.0\.1:\d+/invite/\S+)", line)
            link = m.group(1) if m else None
        assert link, "no admin invitation link printed"
        for _ in range(100):
            try:
                r = httpx.get(link, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert r.status_code == 200 and "admin" in r.text
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()["info"]["title"].startswith("megacoach")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_assignment_marks_finished_items_and_serves_new_ones(tmp_path):
    from sqlalchemy import select

    from megacoach.labels.assignment import Assigner
    from megacoach.labels.schema import ItemRow
    from test_app_support import add_items, make_person, make_store

    store = make_store(tmp_path)
    who = make_person(store, "alice")
    first = add_items(store, 5)
    asg = Assigner(lambda: store.session(), read_session_factory=lambda: store.session(write=False))

    def filled() -> set[int]:
        with store.session(write=False) as s:
            return set(s.scalars(select(ItemRow.id).where(ItemRow.filled)))

    for _ in range(5):
        got = asg.next_item(who)
        store.add_comparison(got.item_id, 0, who)
    assert asg.next_item(who) is None and filled() == set(first) and asg.queue_length() == 0
    new = add_items(store, 2, batch="b1")
    held = asg.next_item(who).item_id
    assert held in new and asg.queue_length() == 2
    # a label written past the app (the command line, a mock labeler): the next scan marks the item
    [other] = set(new) - {held}
    store.add_comparison(other, 0, make_person(store, "bob"))
    store.add_comparison(held, 0, who)
    assert asg.next_item(who) is None and filled() == set(first + new)


def test_assignment_rechecks_marks_for_a_larger_overlap(tmp_path):
    from megacoach.labels.assignment import Assigner
    from test_app_support import add_items, make_person, make_store

    store = make_store(tmp_path)
    alice, bob = make_person(store, "alice"), make_person(store, "bob")
    [item] = add_items(store, 1)
    one = Assigner(lambda: store.session())
    store.add_comparison(one.next_item(alice).item_id, 0, alice)
    assert one.next_item(alice) is None and one.next_item(bob) is None  # marked filled at overlap 1
    two = Assigner(lambda: store.session(), overlap=2)  # a server started with --overlap 2
    assert two.next_item(bob).item_id == item and two.queue_length() == 1


def test_assignment_reads_the_queue_through_indexes(tmp_path):
    """Every query of an assignment on SQLite searches an index; none reads the whole items table."""
    from sqlalchemy import event

    from megacoach.labels.assignment import Assigner
    from test_app_support import add_items, make_person, make_store

    store = make_store(tmp_path)
    who = make_person(store, "alice")
    add_items(store, 30, source="human")
    add_items(store, 3, batch="cal", calibration=True)
    add_items(store, 3, batch="gold", gold=True)
    seen: list[tuple[str, tuple]] = []

    def log(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", log)
    try:
        for sources in (None, ("human",)):
            asg = Assigner(lambda: store.session(), sources=sources)
            got = asg.next_item(who)
            store.add_comparison(got.item_id, 0, who)
            asg.next_item(who)
    finally:
        event.remove(store.engine, "before_cursor_execute", log)
    assert len(seen) >= 10
    with store.engine.connect() as conn:
        plans = {stmt: " | ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + stmt, params))
                 for stmt, params in seen}
    for stmt, plan in plans.items():
        assert "SCAN items" not in plan and "SCAN item_locks" not in plan, (stmt, plan)
    scans = [plan for stmt, plan in plans.items() if stmt.startswith("SELECT items.id") and "items.filled = 0" in stmt]
    assert len(scans) >= 2 and all("ix_items_open" in plan for plan in scans), scans
