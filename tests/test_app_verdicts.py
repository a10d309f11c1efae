"""Ties ("equally good"), "none acceptable", adjudication of disagreements and feedback on gold items:
in the label store (what the Values Coach trains on), the API, the export and import, the dashboard."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient

from test_app_support import add_items, login, make_person, make_store, make_world, take_next


def _position_of_first(item: dict) -> int:
    """The shown position of the item's canonical continuation 0 (add_items' texts end in ".0")."""
    return next(x["position"] for x in item["continuations"] if x["text"].endswith(".0"))


def _labels(store, item_id, *answers):
    """Labels of item_id by new program labelers: an int is a best choice, "tie"/"none" the verdict."""
    out = []
    for a in answers:
        lab = store.get_or_create_labeler(f"bot{len(store.labelers())}", kind="program")
        if isinstance(a, int):
            out.append(store.add_comparison(item_id, a, lab.id))
        else:
            out.append(store.add_comparison(item_id, None, lab.id, verdict=a))
    return out


# ----- the store: recorded as what they are; the training view -----------------------------------

def test_ties_and_none_are_recorded_and_kept_out_of_training(tmp_path):
    from megacoach.errors import DataError
    from megacoach.reward.data import labels_from_store, validate_comparisons

    store = make_store(tmp_path)
    a, b, c = add_items(store, 3)
    best, tie, none = _labels(store, a, 2)[0], _labels(store, b, "tie")[0], _labels(store, c, "none")[0]
    assert (tie.verdict, tie.chosen, none.verdict, none.chosen) == ("tie", None, "none", None)
    assert best.verdict == "best" and best.chosen == 2
    assert [x.id for x in store.comparisons(view="all")] == [best.id, tie.id, none.id]
    assert [x.id for x in store.comparisons()] == [best.id]  # the training view: the K-way softmax's labels
    assert store.count_comparisons() == 1 and store.count_comparisons(view="all") == 3
    train, valid = labels_from_store(store)
    assert [x.chosen for x in train] == [2] and not valid
    validate_comparisons(train)
    with pytest.raises(DataError, match="chooses no continuation"):
        store.add_comparison(a, 1, store.get_or_create_labeler("x", kind="program").id, verdict="tie")
    with pytest.raises(DataError, match="names the chosen"):
        store.add_comparison(a, None, store.get_or_create_labeler("y", kind="program").id)
    with pytest.raises(DataError, match="verdict"):
        store.add_comparison(a, None, store.get_or_create_labeler("z", kind="program").id, verdict="maybe")


def test_a_decision_replaces_the_labels_it_decides_in_training(tmp_path):
    store = make_store(tmp_path)
    a, b = add_items(store, 2, overlap=2)
    la = _labels(store, a, 0, 1)
    lb = _labels(store, b, 3, "tie")
    judge = store.get_or_create_labeler("judge", kind="person", role="admin")
    da = store.add_comparison(a, 1, judge.id, adjudication=True, note="1 follows the prompt")
    db = store.add_comparison(b, None, judge.id, adjudication=True, verdict="none")
    assert [x.id for x in store.comparisons()] == [da.id]  # item b: decided "none acceptable", so nothing
    assert {x.id for x in store.comparisons(view="all")} == {x.id for x in la + lb} | {da.id, db.id}
    assert store.comparisons(after_id=la[-1].id)[0].adjudication
    from megacoach.labels.records import DuplicateLabelError

    with pytest.raises(DuplicateLabelError, match="decided already"):
        store.add_comparison(a, 0, store.get_or_create_labeler("judge2", kind="person").id, adjudication=True)


# ----- the app: labeling with ties, gold feedback -----------------------------------------------------

def test_labelers_say_tie_or_none_through_the_api_and_the_form(tmp_path):
    w = make_world(tmp_path, n_items=3)
    c = TestClient(w.app)
    csrf = login(c, "alice")
    h = {"x-csrf-token": csrf}
    item = take_next(c).json()["item"]
    r = c.post("/api/labels", json=dict(item_id=item["item_id"], verdict="tie"), headers=h)
    assert r.status_code == 201 and r.json()["verdict"] == "tie" and r.json()["chosen"] is None, r.text
    item = take_next(c).json()["item"]
    bad = c.post("/api/labels", json=dict(item_id=item["item_id"], verdict="none", choice=2), headers=h)
    assert bad.status_code == 422 and "picks no continuation" in bad.json()["detail"]
    assert c.post("/api/labels", json=dict(item_id=item["item_id"]), headers=h).status_code == 422
    # the page's form: choice "none"
    page = c.get("/label")
    assert 'value="tie"' in page.text and 'value="none"' in page.text and "<kbd>E</kbd>" in page.text
    r = c.post("/label", data=dict(csrf_token=csrf, item_id=item["item_id"], choice="none", elapsed_ms="5000"),
               follow_redirects=False)
    assert r.status_code == 303
    verdicts = [x.verdict for x in w.store.comparisons(view="all")]
    assert verdicts == ["tie", "none"]
    assert c.post("/label", data=dict(csrf_token=csrf, item_id=1, choice="maybe")).status_code == 422
    assert [e.detail["verdict"] for e in w.store.audit_entries(action="label")] == ["tie", "none"]


def test_a_missed_gold_item_shows_the_expected_choice_and_why(tmp_path):
    from megacoach.labels.records import NewSample

    w = make_world(tmp_path, n_items=0)
    w.store.create_item("Gold prompt", [1], [NewSample(f"gold continuation {j}", [4 + j]) for j in range(4)],
                        is_gold=True, gold_choice=2, gold_explanation="Only the third stays on topic.")
    add_items(w.store, 2, batch="plain", overlap=2)
    c = TestClient(w.app)
    csrf = login(c, "alice")
    h = {"x-csrf-token": csrf}
    seen = {}
    for _ in range(3):
        item = take_next(c).json()["item"]
        texts = [x["text"] for x in item["continuations"]]
        wrong = next(i for i, t in enumerate(texts) if t != "gold continuation 2") + 1
        r = c.post("/api/labels", json=dict(item_id=item["item_id"], choice=wrong), headers=h).json()
        seen[item["prompt"]] = (r["gold"], texts)
    gold, texts = seen["Gold prompt"]
    assert gold["expected_text"] == "gold continuation 2" and gold["explanation"] == "Only the third stays on topic."
    assert texts[gold["expected_position"] - 1] == "gold continuation 2"  # the position this labeler saw it at
    assert gold["yours"]["verdict"] == "best" and gold["yours"]["position"] != gold["expected_position"]
    assert all(g is None for p, (g, _) in seen.items() if p != "Gold prompt")  # ordinary items: no feedback
    # the page shows it once the label is in, only to the labeler who missed it
    gold_id = gold["item_id"]
    page = c.get(f"/label?saved=1&missed={gold_id}")
    assert "Only the third stays on topic." in page.text and 'id="gold-feedback"' in page.text
    bob = TestClient(w.app)
    login(bob, "bob")
    assert 'id="gold-feedback"' not in bob.get(f"/label?missed={gold_id}").text
    # a hit gives no feedback (and a tie on a gold item is a miss)
    bob_h = {"x-csrf-token": bob.get("/api/me").json()["csrf_token"]}
    for _ in range(3):
        item = take_next(bob).json()["item"]
        if item["prompt"] == "Gold prompt":
            r = bob.post("/api/labels", json=dict(item_id=item["item_id"], verdict="tie"), headers=bob_h).json()
            assert r["gold"]["yours"] == dict(verdict="tie", position=None)
        else:
            r = bob.post("/api/labels", json=dict(item_id=item["item_id"], choice=1), headers=bob_h).json()
            assert r["gold"] is None


# ----- adjudication -------------------------------------------------------------------------------------

def test_adjudicators_see_every_choice_with_its_reason_and_decide(tmp_path):
    w = make_world(tmp_path, n_items=0, overlap=2)
    (item,) = add_items(w.store, 1, overlap=2)
    (agreed,) = add_items(w.store, 1, overlap=2, batch="agreed")
    (gold,) = add_items(w.store, 1, gold=True, batch="gold")
    alice, bob = TestClient(w.app), TestClient(w.app)
    for c, name in ((alice, "alice"), (bob, "bob")):
        h = {"x-csrf-token": login(c, name)}
        for _ in range(3):  # everyone picks canonical continuation 0, but bob calls the disputed item a tie
            got = take_next(c, h).json()["item"]
            body = dict(choice=_position_of_first(got), note="0 is funnier")
            if got["item_id"] == item and name == "bob":
                body = dict(verdict="tie", note="both 0 and 2 work")
            r = c.post("/api/labels", json=dict(body, item_id=got["item_id"]), headers=h)
            assert r.status_code == 201 and r.json()["gold"] is None  # the gold item's answer is 0: a hit
    # a labeler is no adjudicator
    assert alice.get("/api/adjudication").status_code == 403
    assert alice.get("/adjudicate", follow_redirects=False).status_code == 403
    # the admin makes carol an adjudicator
    make_person(w.store, "carol")
    root = TestClient(w.app)
    root_h = {"x-csrf-token": login(root, "root")}
    carol_id = w.store.get_labeler("carol").id
    r = root.post(f"/api/admin/labelers/{carol_id}/adjudicator", json=dict(adjudicator=True), headers=root_h)
    assert r.status_code == 200 and r.json()["adjudicator"] is True
    bad = root.post(f"/api/admin/labelers/{w.admin_id}/adjudicator", json=dict(adjudicator=True), headers=root_h)
    assert bad.status_code == 409
    carol = TestClient(w.app)
    carol_h = {"x-csrf-token": login(carol, "carol")}
    assert carol.get("/api/me").json()["role"] == "adjudicator"
    queue = carol.get("/api/adjudication").json()
    assert queue["items"] == [item] and queue["open"] == 1  # not the agreed item, not the gold one
    d = carol.get(f"/api/adjudication/{item}").json()
    said = {x["labeler"]: (x["verdict"], x["position"], x["note"]) for x in d["labels"]}
    assert said == {"alice": ("best", 1, "0 is funnier"), "bob": ("tie", None, "both 0 and 2 work")}
    assert [x["position"] for x in d["continuations"]] == [1, 2, 3, 4] and d["decision"] is None
    for other in (agreed, gold, 10_000):  # an adjudicator reads the labels of disagreements only
        assert carol.get(f"/api/adjudication/{other}").status_code == 404
    # alice cannot decide (she labeled it, and she is no adjudicator); nothing to decide on an agreed item
    assert carol.post(f"/api/adjudication/{agreed}", json=dict(choice=1), headers=carol_h).status_code == 409
    r = carol.post(f"/api/adjudication/{item}", json=dict(choice=3, note="3 keeps the metre"), headers=carol_h)
    assert r.status_code == 201 and r.json()["chosen"] == 2, r.text
    assert carol.post(f"/api/adjudication/{item}", json=dict(choice=1), headers=carol_h).status_code == 409
    # the Values Coach trains on the decision for that item
    training = [x for x in w.store.comparisons() if x.item_id == item]
    assert [(x.labeler_name, x.chosen, x.adjudication) for x in training] == [("carol", 2, True)]
    assert carol.get("/api/adjudication").json() == dict(open=0, decided=1, items=[])
    assert w.store.audit_entries(action="adjudicate")[-1].detail["note"] == "3 keeps the metre"
    # an item that waits for a third label is no disagreement yet
    (item3,) = add_items(w.store, 1, overlap=3, batch="three")
    _labels(w.store, item3, 0, 1)
    assert item3 not in carol.get("/api/adjudication").json()["items"]
    assert carol.post(f"/api/adjudication/{item3}", json=dict(choice=1), headers=carol_h).status_code == 409
    _labels(w.store, item3, 2)
    assert carol.get("/api/adjudication").json()["items"] == [item3]
    assert carol.post(f"/api/adjudication/{item3}", json=dict(choice=2), headers=carol_h).status_code == 201
    # an admin who labeled an item cannot decide it either
    (item2,) = add_items(w.store, 1, overlap=2, batch="two")
    w.store.add_comparison(item2, 0, w.admin_id)
    w.store.add_comparison(item2, 1, w.store.get_labeler("bob").id)
    r = root.post(f"/api/adjudication/{item2}", json=dict(choice=1), headers=root_h)
    assert r.status_code == 409 and "you labeled it" in r.json()["detail"]
    assert carol.post(f"/api/adjudication/{item2}", json=dict(verdict="none"), headers=carol_h).status_code == 201
    # the dashboard: disagreement per labeler and per guideline version, decisions, gold accuracy by day
    dash = root.get("/api/admin/dashboard").json()
    assert dash["disputes"] == dict(open=0, decided=3)
    people = {p["name"]: p for p in dash["people"]}
    assert people["alice"]["disagreement_pct"] == 33.3 and people["alice"]["agreement_n"] == 3
    assert people["bob"]["ties"] == 1 and people["carol"]["labels"] == 0  # decisions are no labels
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert w.store.get_item(gold).gold_choice == 0
    assert people["alice"]["gold_by_day"] == [dict(day=today, n=1, pct=100.0)]
    # pairs: the disputed item (disagree), the agreed one, the gold one, item2 (root and bob disagree)
    assert dash["disagreement_by_version"] == [dict(version="1", pairs=4, agreement_pct=50.0, disagreement_pct=50.0)]
    assert "Disagreement by guideline version" in root.get("/admin").text


def test_export_and_import_carry_verdicts_decisions_and_explanations(tmp_path):
    from megacoach.labels.io import export_jsonl, import_jsonl
    from megacoach.labels.records import NewSample

    store = make_store(tmp_path)
    gold = store.create_item("g", [1], [NewSample(f"s{j}", [j + 1]) for j in range(3)], is_gold=True,
                             gold_choice=1, gold_explanation="s1 answers").item.id
    (item,) = add_items(store, 1, overlap=2)
    _labels(store, gold, "none")
    _labels(store, item, 0, "tie")
    judge = store.get_or_create_labeler("judge", kind="person", role="admin")
    store.add_comparison(item, 0, judge.id, adjudication=True, note="0 is fine")
    n = export_jsonl(store, tmp_path / "l.jsonl")
    assert n == 4
    other = make_store(tmp_path, "other.db")
    import_jsonl(other, tmp_path / "l.jsonl")
    def key(s):
        return [(x.verdict, x.chosen, x.adjudication, x.labeler_name, x.gold_explanation, x.note)
                for x in s.comparisons(view="all")]
    assert key(other) == key(store)
    assert [x.adjudication for x in other.comparisons()] == [True]
    # the app's export is the same format, every label as recorded
    from megacoach.app.export import export_lines

    lines = b"".join(export_lines(store)).decode().splitlines()
    assert len(lines) == 4 and '"verdict": "tie"' in lines[2] and '"adjudication": true' in lines[3]


def test_agreement_counts_ties_and_none_as_answers():
    from megacoach.app.metrics import LabelFact, agreement, gold_accuracy, gold_accuracy_by_day

    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def f(item, lab, chosen, verdict="best", version="1", gold=None, at=t):
        return LabelFact(item, lab, chosen, 4, at, t, is_gold=gold is not None, gold_choice=gold, verdict=verdict,
                         guideline_version=version)

    a = agreement([f(1, 1, None, "tie"), f(1, 2, None, "tie"), f(2, 1, None, "none"), f(2, 2, 0),
                   f(3, 1, 1, version="2"), f(3, 2, 1, version="2"), f(4, 1, 1), f(4, 2, 1, version="2")])
    assert (a.overall.n, a.overall.hits) == (4, 3)
    assert {k: (r.n, r.hits) for k, r in a.per_version.items()} == {"1": (2, 1), "2": (1, 1), "1 / 2": (1, 1)}
    g = gold_accuracy([f(5, 1, 2, gold=2), f(6, 1, None, "tie", gold=2), f(7, 1, 1, gold=2,
                                                                          at=t + dt.timedelta(days=1))])
    assert (g[1].n, g[1].hits) == (3, 1)
    days = gold_accuracy_by_day([f(5, 1, 2, gold=2), f(6, 1, None, "tie", gold=2),
                                 f(7, 1, 2, gold=2, at=t + dt.timedelta(days=1))])
    assert [(d.isoformat(), r.n, r.hits) for d, r in days[1]] == [("2026-01-01", 2, 1), ("2026-01-02", 1, 1)]


def test_only_labelers_become_adjudicators(tmp_path):
    from megacoach.errors import DataError

    store = make_store(tmp_path)
    make_person(store, "root", "admin")
    with pytest.raises(DataError, match="only a labeler"):
        store.update_labeler("root", adjudicator=True)
    make_person(store, "dan")
    assert store.update_labeler("dan", adjudicator=True).adjudicator
    assert not store.update_labeler("dan", role="admin").adjudicator  # an admin decides anyway
