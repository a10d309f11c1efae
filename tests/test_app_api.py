"""The labeling app's behaviour through its HTTP interface (FastAPI TestClient, SQLite in tmp)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from test_app_support import (
    FAST,
    PASSWORD,
    add_items,
    csrf_of,
    login,
    make_person,
    make_world,
    take_next,
    take_page_item,
)


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_login_sets_safe_cookie_and_logout_ends_session(world):
    c = TestClient(world.app)
    page = c.get("/login")
    assert page.status_code == 200
    r = c.post("/login", data=dict(name="alice", password=PASSWORD, csrf_token=csrf_of(page.text), next="/label"),
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"
    cookie = [h for h in r.headers.get_list("set-cookie") if h.startswith("mc_session=")][0].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    me = c.get("/api/me").json()
    assert me["name"] == "alice" and me["role"] == "labeler" and me["via"] == "session"
    r = c.post("/logout", data=dict(csrf_token=me["csrf_token"]), follow_redirects=False)
    assert r.status_code == 303
    assert c.get("/api/me").status_code == 401
    actions = [e.action for e in world.store.audit_entries()]
    assert "login" in actions and "logout" in actions


def test_secure_cookie_setting(tmp_path):
    w = make_world(tmp_path, secure_cookies=True)
    c = TestClient(w.app, base_url="https://testserver")
    page = c.get("/login")
    r = c.post("/login", data=dict(name="alice", password=PASSWORD, csrf_token=csrf_of(page.text)),
               follow_redirects=False)
    cookie = [h for h in r.headers.get_list("set-cookie") if h.startswith("mc_session=")][0].lower()
    assert "secure" in cookie


def test_wrong_password_is_401_audited_and_throttled(tmp_path):
    w = make_world(tmp_path, login_free_failures=3)
    c = TestClient(w.app)
    for _ in range(3):
        page = c.get("/login")
        r = c.post("/login", data=dict(name="alice", password="nope-nope-nope", csrf_token=csrf_of(page.text)))
        assert r.status_code == 401 and "wrong name or password" in r.text
    page = c.get("/login")
    r = c.post("/login", data=dict(name="alice", password=PASSWORD, csrf_token=csrf_of(page.text)))
    assert r.status_code == 429 and "too many failed log-ins" in r.text
    assert [e.action for e in w.store.audit_entries(action="login_failed")].count("login_failed") == 4


def test_passwords_are_argon2_hashed(world):
    rec = world.store.get_labeler("alice")
    assert rec.password_hash.startswith("$argon2id$") and PASSWORD not in rec.password_hash


def test_invitation_flow_creates_labeler_and_is_single_use(world):
    c = TestClient(world.app)
    csrf = login(c, "root")
    r = c.post("/api/admin/invites", json=dict(name="carol", role="labeler"), headers={"x-csrf-token": csrf})
    assert r.status_code == 201, r.text
    url = r.json()["url"]
    path = url[url.index("/invite/"):]
    assert "carol" not in url  # the link holds only the random token
    guest = TestClient(world.app)
    page = guest.get(path)
    assert page.status_code == 200 and "carol" in page.text
    token = csrf_of(page.text)
    short = guest.post(path, data=dict(password="short", password2="short", csrf_token=token))
    assert short.status_code == 422 and "at least" in short.text
    r = guest.post(path, data=dict(password=PASSWORD, password2=PASSWORD, csrf_token=token), follow_redirects=False)
    assert r.status_code == 303
    assert guest.get("/api/me").json()["name"] == "carol"
    again = TestClient(world.app).get(path)
    assert again.status_code == 410 and "already used" in again.text
    assert TestClient(world.app).get("/invite/not-a-real-token").status_code == 404
    actions = [e.action for e in world.store.audit_entries()]
    assert "invite" in actions and "invite_accept" in actions


def test_adjudicator_invitations_make_labelers_who_decide(world):
    """An adjudicator can be invited from the People page's form and from the API; accepting makes a labeler
    (the store's role) with the adjudicator flag, whose app role is "adjudicator"."""
    c = TestClient(world.app)
    csrf = login(c, "root")
    people = c.get("/admin/people")
    assert '<option value="adjudicator">' in people.text
    page = c.post("/admin/invites", data=dict(name="ada", role="adjudicator", csrf_token=csrf))
    assert page.status_code == 200 and "/invite/" in page.text
    r = c.post("/api/admin/invites", json=dict(name="judy", role="adjudicator"), headers={"x-csrf-token": csrf})
    assert r.status_code == 201 and r.json()["role"] == "adjudicator"
    url = r.json()["url"]
    invites = {i["name"]: i for i in c.get("/api/admin/labelers").json()["invitations"]}
    assert invites["ada"]["role"] == invites["judy"]["role"] == "adjudicator" and invites["judy"]["state"] == "open"

    guest = TestClient(world.app)
    path = url[url.index("/invite/"):]
    welcome = guest.get(path)
    assert "invited as <strong>adjudicator</strong>" in welcome.text
    r = guest.post(path, data=dict(password=PASSWORD, password2=PASSWORD, csrf_token=csrf_of(welcome.text)),
                   follow_redirects=False)
    assert r.status_code == 303
    assert guest.get("/api/me").json()["role"] == "adjudicator"
    rec = world.store.get_labeler("judy")
    assert (rec.kind, rec.role, rec.adjudicator) == ("person", "labeler", True)
    assert guest.get("/adjudicate").status_code == 200
    accepted = [e for e in world.store.audit_entries() if e.action == "invite_accept"]
    assert accepted[-1].detail["role"] == "adjudicator"
    bad = c.post("/api/admin/invites", json=dict(name="x", role="judge"), headers={"x-csrf-token": csrf})
    assert bad.status_code == 422


def test_invitation_expires(tmp_path):
    from megacoach.labels.schema import InvitationRow

    w = make_world(tmp_path)
    c = TestClient(w.app)
    csrf = login(c, "root")
    url = c.post("/api/admin/invites", json=dict(name="dave"), headers={"x-csrf-token": csrf}).json()["url"]
    with w.store.session() as s, s.begin():
        for row in s.query(InvitationRow):
            row.expires_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    r = TestClient(w.app).get(url[url.index("/invite/"):])
    assert r.status_code == 410 and "expired" in r.text


def test_label_flow_records_shown_order_time_and_guideline(world):
    c = TestClient(world.app)
    csrf = login(c, "alice")
    nxt = take_next(c).json()["item"]
    assert nxt and nxt["k"] == 4 and [x["position"] for x in nxt["continuations"]] == [1, 2, 3, 4]
    # stable per labeler and item: asking again gives the same item, same order
    again = take_next(c).json()["item"]
    assert {k: v for k, v in again.items() if k != "expires_at"} == {k: v for k, v in nxt.items() if k != "expires_at"}
    r = c.post("/api/labels", json=dict(item_id=nxt["item_id"], choice=3, time_taken_s=9.5, note="fine"),
               headers={"x-csrf-token": csrf})
    assert r.status_code == 201, r.text
    out = r.json()
    (label,) = world.store.comparisons()
    shown_texts = [x["text"] for x in nxt["continuations"]]
    assert label.sample_texts[label.chosen] == shown_texts[2]
    assert [label.sample_texts[i] for i in label.shown_order] == shown_texts
    assert label.labeler_name == "alice" and label.labeler_kind == "person" and label.guideline_version == "1"
    assert label.note == "fine" and out["chosen"] == label.chosen
    # the client claimed 9.5 s, but the server assigned the item a moment ago: capped at the server's clock + 1 s
    # (whatever the machine's load, far below 9.5), and marked too fast exactly when under FAST's 2 s
    assert label.time_taken_s is not None and label.time_taken_s < 9.5
    assert label.too_fast == (label.time_taken_s < FAST["too_fast_s"])
    again = c.post("/api/labels", json=dict(item_id=nxt["item_id"], choice=1), headers={"x-csrf-token": csrf})
    assert again.status_code == 409 and "already labeled" in again.json()["detail"]
    assert len(world.store.comparisons()) == 1
    assert [e.action for e in world.store.audit_entries(action="label")] == ["label"]


def test_shown_order_differs_between_labelers_and_is_stable():
    from megacoach.labels.assignment import shown_order

    orders = {tuple(shown_order(lab, 7, 4)) for lab in range(1, 30)}
    assert len(orders) > 5
    assert shown_order(3, 7, 4) == shown_order(3, 7, 4)
    assert sorted(shown_order(3, 7, 4)) == [0, 1, 2, 3]


def test_slow_label_is_not_too_fast(tmp_path):
    from megacoach.labels.schema import ItemLockRow

    w = make_world(tmp_path)
    c = TestClient(w.app)
    csrf = login(c, "alice")
    item = take_next(c).json()["item"]
    with w.store.session() as s, s.begin():  # pretend the item was shown 30 s ago
        lock = s.query(ItemLockRow).one()
        lock.locked_at = lock.locked_at - dt.timedelta(seconds=30)
    r = c.post("/api/labels", json=dict(item_id=item["item_id"], choice=1, time_taken_s=12.0), headers={"x-csrf-token": csrf})
    assert r.status_code == 201 and r.json()["too_fast"] is False and r.json()["time_taken_s"] == 12.0
    item2 = take_next(c).json()["item"]
    r = c.post("/api/labels", json=dict(item_id=item2["item_id"], choice=1, time_taken_s=0.4), headers={"x-csrf-token": csrf})
    assert r.json()["too_fast"] is True


def test_form_labeling_and_flag(world):
    c = TestClient(world.app)
    login(c, "alice")
    take_page_item(c)  # the page's POST /label/next (a GET assigns nothing)
    page = c.get("/label")
    assert page.status_code == 200 and 'id="label-form"' in page.text
    item_id = int(page.text.split('name="item_id" value="')[1].split('"')[0])
    r = c.post("/label", data=dict(csrf_token=csrf_of(page.text), item_id=item_id, choice=2, elapsed_ms="8000",
                                   flagged="1", note="garbled text"), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/label?saved=1")
    assert 'id="label-form"' in c.get(r.headers["location"]).text  # the POST took the next item
    (label,) = world.store.comparisons()
    assert label.flagged and label.note == "garbled text"
    assert [e.detail["item_id"] for e in world.store.audit_entries(action="flag")] == [item_id]


def test_skip_requeues_for_someone_else_not_the_skipper(tmp_path):
    w = make_world(tmp_path, n_items=1)
    a, b = TestClient(w.app), TestClient(w.app)
    ca, cb = login(a, "alice"), login(b, "bob")
    item = take_next(a).json()["item"]
    assert take_next(b).json()["item"] is None  # locked for alice (overlap 1)
    r = a.post("/api/skips", json=dict(item_id=item["item_id"], reason="cannot judge"), headers={"x-csrf-token": ca})
    assert r.status_code == 201
    assert take_next(a).json()["item"] is None  # never back to the skipper
    got = take_next(b).json()["item"]
    assert got["item_id"] == item["item_id"]
    assert b.post("/api/labels", json=dict(item_id=got["item_id"], choice=1), headers={"x-csrf-token": cb}).status_code == 201
    (skip,) = w.store.skips()
    assert skip.reason == "cannot judge" and skip.labeler_id == w.alice_id
    assert w.store.audit_entries(action="skip")[0].actor == "alice"


def test_skip_form_needs_reason(world):
    c = TestClient(world.app)
    login(c, "alice")
    take_page_item(c)
    page = c.get("/label")
    item_id = int(page.text.split('name="item_id" value="')[1].split('"')[0])
    r = c.post("/skip", data=dict(csrf_token=csrf_of(page.text), item_id=item_id))
    assert r.status_code == 422 and "say why" in r.text
    r = c.post("/skip", data=dict(csrf_token=csrf_of(page.text), item_id=item_id, reason_choice="2", reason_text="odd"),
               follow_redirects=False)
    assert r.status_code == 303
    assert world.store.skips()[0].reason.endswith(": odd")


def test_lock_times_out_and_frees_the_item(tmp_path):
    from megacoach.labels.schema import ItemLockRow

    w = make_world(tmp_path, n_items=1)
    a, b = TestClient(w.app), TestClient(w.app)
    login(a, "alice"), login(b, "bob")
    item = take_next(a).json()["item"]
    assert take_next(b).json()["item"] is None
    with w.store.session() as s, s.begin():
        s.query(ItemLockRow).update({ItemLockRow.expires_at: dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)})
    assert take_next(b).json()["item"]["item_id"] == item["item_id"]


def test_overlap_calibration_and_gold_assignment(tmp_path):
    from megacoach.labels.assignment import Assigner

    w = make_world(tmp_path, n_items=0)
    store = w.store
    ordinary = add_items(store, 2, batch="o", overlap=2)
    calib = add_items(store, 1, batch="c", calibration=True)
    gold = add_items(store, 1, batch="g", gold=True)
    people = [make_person(store, f"p{i}") for i in range(4)]
    asg = Assigner(lambda: store.session(), overlap=1, lock_timeout_s=600)
    seen = {p: [] for p in people}
    for _ in range(10):
        for p in people:
            got = asg.next_item(p)
            if got is None:
                continue
            seen[p].append(got.item_id)
            store.add_comparison(got.item_id, 0, p)
            with store.session() as s, s.begin():
                asg.release(s, p, got.item_id)
    for p in people:  # everyone labels the shared calibration and gold items exactly once
        assert seen[p].count(calib[0]) == 1 and seen[p].count(gold[0]) == 1
    for item in ordinary:  # overlap 2: exactly two different people
        labels = [c for c in store.comparisons() if c.item_id == item]
        assert len(labels) == 2 and len({c.labeler_id for c in labels}) == 2
    assert asg.queue_length() == 0


def test_gold_items_are_unmarked_on_the_page(tmp_path):
    w = make_world(tmp_path, n_items=0)
    add_items(w.store, 1, gold=True)
    c = TestClient(w.app)
    login(c, "alice")
    take_page_item(c)
    page = c.get("/label").text
    assert 'id="prompt"' in page
    assert "gold" not in page.lower() and "calibration" not in page.lower()
    item = take_next(c).json()["item"]
    assert set(item) == {"item_id", "k", "prompt", "continuations", "expires_at"}


def test_api_token_reads_labels_and_labels_as_program(world):
    c = TestClient(world.app)
    me = c.get("/api/me", headers=bearer(world.token)).json()
    assert me["role"] == "program" and me["via"] == "token"
    item = take_next(c, bearer(world.token)).json()["item"]
    r = c.post("/api/labels", json=dict(item_id=item["item_id"], choice=1), headers=bearer(world.token))
    assert r.status_code == 201  # no CSRF needed with a bearer token
    page = c.get("/api/labels?after_id=0&limit=10", headers=bearer(world.token)).json()
    assert len(page["labels"]) == 1 and page["labels"][0]["labeler_kind"] == "program"
    assert page["next_after_id"] == page["labels"][0]["comparison_id"]
    assert c.get("/api/admin/dashboard", headers=bearer(world.token)).status_code == 403
    assert c.get("/api/me", headers=bearer("mct_wrong")).status_code == 401
    assert c.get("/api/me", headers={"Authorization": "Basic abc"}).status_code == 401


def test_revoked_token_is_refused_and_tokens_are_hashed(world):
    from megacoach.labels.schema import ApiTokenRow

    c = TestClient(world.app)
    csrf = login(c, "root")
    r = c.post("/api/admin/tokens", json=dict(owner="script"), headers={"x-csrf-token": csrf})
    assert r.status_code == 201
    token, tid = r.json()["token"], r.json()["id"]
    with world.store.session() as s:
        stored = [t.token_hash for t in s.query(ApiTokenRow)]
    assert token not in stored and all(len(h) == 64 for h in stored)
    assert TestClient(world.app).get("/api/me", headers=bearer(token)).status_code == 200
    assert c.post(f"/api/admin/tokens/{tid}/revoke", headers={"x-csrf-token": csrf}).status_code == 200
    r = TestClient(world.app).get("/api/me", headers=bearer(token))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_deactivated_labeler_is_logged_out(world):
    a = TestClient(world.app)
    login(a, "alice")
    admin = TestClient(world.app)
    csrf = login(admin, "root")
    r = admin.post(f"/api/admin/labelers/{world.alice_id}/active", json=dict(active=False), headers={"x-csrf-token": csrf})
    assert r.status_code == 200 and r.json()["active"] is False
    assert a.get("/api/me").status_code == 401
    page = TestClient(world.app).get("/login")
    r = TestClient(world.app).post("/login", data=dict(name="alice", password=PASSWORD, csrf_token=csrf_of(page.text)))
    assert r.status_code in (401, 403)


def test_guidelines_versioned_and_rendered_safely(world):
    c = TestClient(world.app)
    csrf = login(c, "root")
    md = "# Rules v2\n\n<script>alert('x')</script>\n\n[click](javascript:alert(1)) and **bold**"
    r = c.post("/api/admin/guidelines", json=dict(version="2", markdown=md), headers={"x-csrf-token": csrf})
    assert r.status_code == 201
    dup = c.post("/api/admin/guidelines", json=dict(version="2", markdown="other"), headers={"x-csrf-token": csrf})
    assert dup.status_code == 409
    lab = TestClient(world.app)
    lcsrf = login(lab, "alice")
    page = lab.get("/guidelines").text
    assert "<strong>bold</strong>" in page and "<script>alert" not in page and "javascript:alert" not in page.split("<main>")[1].split('href="')[-1][:30]
    assert 'href="javascript:' not in page
    item = take_next(lab).json()["item"]
    lab.post("/api/labels", json=dict(item_id=item["item_id"], choice=1), headers={"x-csrf-token": lcsrf})
    assert world.store.comparisons()[0].guideline_version == "2"
    assert [e.detail["version"] for e in world.store.audit_entries(action="guideline")] == ["2"]
    take_page_item(lab)
    assert "guidelines-dialog" in lab.get("/label").text  # G opens them on the labeling page


def test_export_jsonl_has_provenance_and_is_audited(world):
    c = TestClient(world.app)
    csrf = login(c, "alice")
    item = take_next(c).json()["item"]
    c.post("/api/labels", json=dict(item_id=item["item_id"], choice=2), headers={"x-csrf-token": csrf})
    admin = TestClient(world.app)
    login(admin, "root")
    assert admin.get("/admin/export.jsonl").status_code == 405  # a download that writes the audit log is a POST
    r = admin.post("/admin/export.jsonl", data=dict(csrf_token=admin.get("/api/me").json()["csrf_token"]))
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    (line,) = [json.loads(x) for x in r.text.splitlines()]
    for key in ("item", "query", "samples", "chosen", "shown_order", "labeler", "batch", "split", "guideline_version",
                "labeled_at", "time_taken_s", "note", "flagged", "confidence", "too_fast"):
        assert key in line
    assert line["samples"][0]["policy"] == "ckpt-0" and line["samples"][0]["iteration"] == 0
    assert line["item"]["id"] == item["item_id"] and line["labeler"] == "alice"
    # the download imports again into a fresh store (megacoach label import)
    from megacoach.labels.io import import_labels
    from test_app_support import make_store

    path = world.store.url.replace("sqlite:///", "").replace("labels.db", "export.jsonl")
    open(path, "w").write(r.text)
    fresh = make_store(Path(path).parent, "fresh.db")
    import_labels(fresh, Path(path))
    (again,) = fresh.comparisons()
    assert again.sample_texts == world.store.comparisons()[0].sample_texts and again.labeler_name == "alice"
    assert world.store.audit_entries(action="export")[0].actor == "root"


def test_andon_pull_pauses_the_run_and_banner_shows_everywhere(tmp_path):
    w = make_world(tmp_path, andon_pulls_to_pause=2)
    w.store.set_run_status("run-1", "running", iteration=3)
    a, b, admin = TestClient(w.app), TestClient(w.app), TestClient(w.app)
    ca, cb, cadm = login(a, "alice"), login(b, "bob"), login(admin, "root")
    r = a.post("/api/andon", json=dict(reason="all continuations are the same word"), headers={"x-csrf-token": ca})
    assert r.status_code == 201 and r.json()["paused"] is False and r.json()["people"] == 1
    assert w.store.get_run_status("run-1").status == "running"
    # the same person pulling again does not count twice (200 "already pulled", audited, not a pull)
    r = a.post("/api/andon", json=dict(reason="still bad"), headers={"x-csrf-token": ca})
    assert r.status_code == 200 and r.json()["already_pulled"] is True
    assert w.store.get_run_status("run-1").status == "running"
    r = b.post("/andon", data=dict(csrf_token=cb, reason="<b>gibberish</b>"), follow_redirects=False)
    assert r.status_code == 303
    run = w.store.get_run_status("run-1")
    assert run.status == "paused" and run.detail["andon"]["reason"] == "<b>gibberish</b>"
    assert len(w.store.andon_pulls("run-1")) == 2
    for client in (a, b, admin):
        for path in ("/label", "/progress", "/guidelines"):
            html = client.get(path).text
            assert 'id="run-banner"' in html and "PAUSED" in html and "&lt;b&gt;gibberish" in html
    login_page = TestClient(w.app).get("/login").text
    assert "PAUSED" in login_page
    assert TestClient(w.app).get("/api/status", headers=bearer(w.token)).json()["run"]["status"] == "paused"
    # an admin clears the pulls and resumes
    r = admin.post("/api/admin/andon/clear", json=dict(note="checked samples", resume=True), headers={"x-csrf-token": cadm})
    assert r.status_code == 200 and r.json()["resumed"] is True
    assert w.store.get_run_status("run-1").status == "running"
    assert 'id="run-banner"' not in a.get("/label").text
    actions = [e.action for e in w.store.audit_entries()]
    assert actions.count("andon_pull") == 2 and actions.count("andon_repeat") == 1 and "andon_clear" in actions


def test_default_single_pull_pauses(world):
    world.store.set_run_status("run-x", "running")
    c = TestClient(world.app)
    csrf = login(c, "alice")
    assert c.post("/api/andon", json=dict(reason="bad"), headers={"x-csrf-token": csrf}).json()["paused"] is True
    assert world.store.get_run_status("run-x").status == "paused"


def test_guard_halt_shows_banner_and_alarms(world):
    world.store.set_run_status("run-g", "halted", 7, detail=dict(
        reason="guard sign_flip: reward sign flipped",
        alarms=[dict(name="sign_flip", action="halt", message="reward sign flipped", figures={"r": -0.9})]))
    c = TestClient(world.app)
    login(c, "alice")
    html = c.get("/label").text
    assert "HALTED" in html and "reward sign flipped" in html
    admin = TestClient(world.app)
    login(admin, "root")
    html = admin.get("/admin").text
    assert "halt sign_flip: reward sign flipped" in html and 'class="status-halted"' in html


def test_pause_detail_is_what_the_trainer_reads(world):
    world.store.set_run_status("run-t", "running", 2, detail=dict(alarms=[]))
    c = TestClient(world.app)
    csrf = login(c, "alice")
    c.post("/api/andon", json=dict(reason="verse turned to gibberish"), headers={"x-csrf-token": csrf})
    run = world.store.get_run_status("run-t")
    assert run.status == "paused" and run.detail["reason"] == "verse turned to gibberish"
    assert run.detail["who"] == "alice" and run.detail["alarms"] == []  # the trainer's own detail is kept


def test_dashboard_numbers(tmp_path):
    w = make_world(tmp_path, n_items=0)
    store = w.store
    mixed = add_items(store, 2, batch="m", iterations=[0, 0, 5, 5], overlap=2)
    gold = add_items(store, 1, batch="g", gold=True)
    canary = add_items(store, 1, batch="b1", source="canary")
    for who in (w.alice_id, w.bob_id):
        store.add_comparison(mixed[0], 2, who)  # both pick the trained policy's sample: agree
        store.add_comparison(gold[0], 0 if who == w.alice_id else 1, who)
        store.add_comparison(canary[0], 0, who)
    store.add_comparison(mixed[1], 0, w.alice_id)
    c = TestClient(w.app)
    login(c, "root")
    d = c.get("/api/admin/dashboard").json()
    assert d["labels_people"] == 7 and d["queue_length"] == 1  # mixed[1] still needs a second label
    assert d["win_rate"] == [dict(iteration=5, n=3, pct=66.7, chance_pct=50.0)]
    assert d["canary"] == [dict(batch="b1", n=2, pct=100.0)]
    people = {p["name"]: p for p in d["people"]}
    assert people["alice"]["gold_accuracy_pct"] == 100.0 and people["bob"]["gold_accuracy_pct"] == 0.0
    assert d["agreement"]["pairs"] == 3 and d["agreement"]["pct"] == 66.7 and d["agreement"]["chance_pct"] == 25.0
    assert sum(d["labels_per_hour_24h"]) == 7 and d["latency_s"]["n"] == 7
    html = c.get("/admin").text
    assert "66.7%" in html and "<svg" in html


def test_labeler_sees_only_own_progress(world):
    a = TestClient(world.app)
    ca = login(a, "alice")
    item = take_next(a).json()["item"]
    a.post("/api/labels", json=dict(item_id=item["item_id"], choice=1), headers={"x-csrf-token": ca})
    b = TestClient(world.app)
    login(b, "bob")
    assert b.get("/api/progress").json()["labels_total"] == 0
    assert a.get("/api/progress").json()["labels_total"] == 1
    assert b.get("/api/labels").status_code == 403 and b.post("/admin/export.jsonl").status_code == 403


def test_static_assets_local_and_security_headers(world):
    c = TestClient(world.app)
    html = c.get("/login").text
    assert "http://" not in html.split("<body>")[0] and "https://" not in html
    for asset in ("app.css", "label.js", "favicon.svg"):
        assert c.get(f"/static/{asset}").status_code == 200
    r = c.get("/login")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    spec = c.get("/openapi.json").json()
    assert "/api/labels" in spec["paths"] and "/label" not in spec["paths"]
    assert c.get("/docs").status_code == 404  # Swagger UI would load a CDN script


def test_bootstrap_admin_link_and_create_admin(tmp_path):
    from megacoach.app.server import admin_invite_link, create_admin
    from megacoach.app.settings import AppSettings
    from test_app_support import make_store

    store = make_store(tmp_path, "boot.db")
    link = admin_invite_link(store, AppSettings(**FAST), "http://127.0.0.1:8000")
    assert link and link.startswith("http://127.0.0.1:8000/invite/")
    url = f"sqlite:///{tmp_path / 'boot.db'}"
    create_admin(url, "boss", PASSWORD, FAST)
    assert admin_invite_link(store, AppSettings(**FAST), "http://x") is None
    assert store.get_labeler("boss").role == "admin"


def test_cli_app_commands(tmp_path):
    from typer.testing import CliRunner

    from megacoach.app.auth import Auth
    from megacoach.app.cli import app as label
    from megacoach.app.settings import AppSettings
    from megacoach.labels.store import LabelStore

    runner = CliRunner()
    db = str(tmp_path / "cli.db")
    r = runner.invoke(label, ["invite", "erin", "--db", db])
    assert r.exit_code == 0 and "/invite/" in r.output
    r = runner.invoke(label, ["invite", "fay", "--db", db, "--role", "adjudicator"])
    assert r.exit_code == 0 and "/invite/" in r.output
    with LabelStore(f"sqlite:///{db}") as store:
        token = r.output.strip().rsplit("/invite/", 1)[1]
        assert Auth(store, AppSettings(**FAST)).accept_invitation(token, PASSWORD).role == "adjudicator"
        assert store.get_labeler("fay").adjudicator is True
    r = runner.invoke(label, ["token", "trainer", "--db", db])
    assert r.exit_code == 0 and r.output.strip().startswith("mct_")
    r = runner.invoke(label, ["serve", "--help"])
    assert r.exit_code == 0 and "--port" in r.output
