"""Malformed or hostile requests get a 4xx with a clear message: never a 500, never script served back."""

from __future__ import annotations

import datetime as dt
import json
import random

import pytest
from fastapi.testclient import TestClient

from test_app_support import PASSWORD, csrf_of, login, make_world, take_next


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("body, field", [
    (dict(item_id="abc", choice=1), "item_id"),
    (dict(item_id=1, choice=1.5), "choice"),
    (dict(item_id=1, choice=0), "choice"),
    (dict(item_id=1, choice=101), "choice"),
    (dict(item_id=1, choice=1, flagged="maybe"), "flagged"),
    (dict(item_id=1, choice=1, note=123), "note"),
    (dict(item_id=1, choice=1, time_taken_s=-3), "time_taken_s"),
    (dict(item_id=1, choice=1, confidence=9), "confidence"),
    (dict(item_id=10**30, choice=1), "item_id"),
    (dict(item_id=-5, choice=1), "item_id"),
    (dict(item_id=1, choice=1, is_gold=True), "is_gold"),  # unknown fields are refused
    (dict(choice=1), "item_id"),
    ([1, 2, 3], "request"),
])
def test_wrong_types_are_422_naming_the_field(world, body, field):
    c = TestClient(world.app)
    r = c.post("/api/labels", json=body, headers=bearer(world.token))
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]


def test_malformed_json_and_wrong_content_type(world):
    c = TestClient(world.app)
    for content, ctype in ((b"{not json", "application/json"), (b"", "application/json"),
                           (b"item_id=1&choice=1", "application/x-www-form-urlencoded"), (b"\xff\xfe", "application/json"),
                           (b'{"item_id": NaN, "choice": 1}', "application/json")):
        r = c.post("/api/labels", content=content, headers=dict(bearer(world.token), **{"content-type": ctype}))
        assert r.status_code == 422, (content, r.status_code, r.text)
        assert r.json()["detail"]


def test_form_wrong_types_are_422_pages(world):
    c = TestClient(world.app)
    csrf = login(c, "alice")
    for data in (dict(item_id="abc", choice="1"), dict(item_id="1", choice="x"), dict(choice="1"),
                 dict(item_id="1", choice="1", elapsed_ms="zzz" * 20)):
        r = c.post("/label", data=dict(data, csrf_token=csrf))
        assert r.status_code == 422 and "Invalid input" in r.text, (data, r.status_code)


def test_unknown_ids_are_404_or_409(world):
    c = TestClient(world.app)
    r = c.post("/api/labels", json=dict(item_id=99999, choice=1), headers=bearer(world.token))
    assert r.status_code == 404 and "item 99999" in r.json()["detail"]
    r = c.post("/api/skips", json=dict(item_id=99999, reason="x"), headers=bearer(world.token))
    assert r.status_code == 404
    r = c.post("/api/labels", json=dict(item_id=1, choice=1), headers=bearer(world.token))
    assert r.status_code == 409 and "not assigned to you" in r.json()["detail"]
    admin = TestClient(world.app)
    csrf = login(admin, "root")
    h = {"x-csrf-token": csrf}
    assert admin.post("/api/admin/labelers/99999/active", json=dict(active=False), headers=h).status_code == 404
    assert admin.post("/api/admin/tokens/99999/revoke", headers=h).status_code == 404
    assert admin.post("/api/admin/labelers/abc/active", json=dict(active=False), headers=h).status_code == 422
    assert admin.post(f"/api/admin/tokens/{10**25}/revoke", headers=h).status_code == 422
    r = admin.get("/api/no/such/route")
    assert r.status_code == 404 and "no page or API route" in r.json()["detail"]
    assert admin.get("/no-such-page").status_code == 404
    assert admin.get("/api/labels?limit=100000").status_code == 422
    assert admin.get("/api/labels?after_id=-1").status_code == 422
    assert admin.delete("/api/labels").status_code == 405


def test_oversized_bodies_are_413(world):
    c = TestClient(world.app)
    big = "x" * (300 * 1024)
    r = c.post("/api/labels", json=dict(item_id=1, choice=1, note=big), headers=bearer(world.token))
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    csrf = login(c, "alice")
    r = c.post("/label", data=dict(csrf_token=csrf, item_id="1", choice="1", note=big), headers={"accept": "text/html"})
    assert r.status_code == 413 and "too large" in r.text

    def chunks():  # streamed without Content-Length
        for _ in range(40):
            yield b"y" * 10_000

    r = c.post("/api/andon", content=chunks(), headers=bearer(world.token))
    assert r.status_code == 413


def test_long_text_fields_are_refused(world):
    c = TestClient(world.app)
    item = take_next(c, bearer(world.token)).json()["item"]
    r = c.post("/api/labels", json=dict(item_id=item["item_id"], choice=1, note="n" * 5000), headers=bearer(world.token))
    assert r.status_code == 422 and "note: at most" in r.json()["detail"]
    r = c.post("/api/skips", json=dict(item_id=item["item_id"], reason="bad\x00byte"), headers=bearer(world.token))
    assert r.status_code == 422


SCRIPT = '<script>alert("xss")</script><img src=x onerror=alert(1)>'


def test_script_in_text_fields_is_escaped_everywhere(world):
    world.store.set_run_status("run-x", "running")
    lab = TestClient(world.app)
    csrf = login(lab, "alice")
    item = take_next(lab).json()["item"]
    h = {"x-csrf-token": csrf}
    assert lab.post("/api/labels", json=dict(item_id=item["item_id"], choice=1, flagged=True, note=SCRIPT), headers=h).status_code == 201
    item = take_next(lab).json()["item"]
    assert lab.post("/api/skips", json=dict(item_id=item["item_id"], reason=SCRIPT), headers=h).status_code == 201
    assert lab.post("/api/andon", json=dict(reason=SCRIPT), headers=h).status_code == 201
    admin = TestClient(world.app)
    acsrf = login(admin, "root")
    r = admin.post("/api/admin/invites", json=dict(name=SCRIPT[:60]), headers={"x-csrf-token": acsrf})
    assert r.status_code == 201
    pages = [admin.get(p).text for p in ("/admin", "/admin/people", "/admin/audit", "/label", "/andon")]
    pages += [lab.get(p).text for p in ("/label", "/progress", "/guidelines")]
    for html in pages:
        assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in pages[0]  # the banner and the Andon table show it, escaped
    # JSON answers carry it as data with a JSON content type (not rendered as HTML)
    r = admin.get("/api/admin/audit")
    assert r.headers["content-type"].startswith("application/json") and r.headers["x-content-type-options"] == "nosniff"


def test_foreign_replayed_and_missing_csrf_tokens_are_403(world):
    a, b = TestClient(world.app), TestClient(world.app)
    ca, cb = login(a, "alice"), login(b, "bob")
    item = take_next(a).json()["item"]
    # bob's token on alice's session: foreign
    r = a.post("/label", data=dict(csrf_token=cb, item_id=item["item_id"], choice=1))
    assert r.status_code == 403 and "CSRF" in r.text
    r = a.post("/api/labels", json=dict(item_id=item["item_id"], choice=1), headers={"x-csrf-token": cb})
    assert r.status_code == 403
    r = a.post("/api/labels", json=dict(item_id=item["item_id"], choice=1))
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = a.post("/label", data=dict(item_id=item["item_id"], choice=1))
    assert r.status_code == 403
    # replayed: alice's token from a session that has ended, after logging in again
    assert a.post("/logout", data=dict(csrf_token=ca), follow_redirects=False).status_code == 303
    ca2 = login(a, "alice")
    assert ca2 != ca
    r = a.post("/label", data=dict(csrf_token=ca, item_id=item["item_id"], choice=1))
    assert r.status_code == 403
    assert world.store.comparisons() == []
    # the log-in form: its token must match the pre-session cookie
    fresh = TestClient(world.app)
    r = fresh.post("/login", data=dict(name="alice", password=PASSWORD, csrf_token="forged"))
    assert r.status_code == 403
    other = TestClient(world.app)
    token = csrf_of(other.get("/login").text)
    r = fresh.post("/login", data=dict(name="alice", password=PASSWORD, csrf_token=token))  # another browser's token
    assert r.status_code == 403


def test_cross_origin_writes_are_refused(world):
    c = TestClient(world.app)
    csrf = login(c, "alice")
    r = c.post("/andon", data=dict(csrf_token=csrf, reason="x"), headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.text
    r = c.post("/andon", data=dict(csrf_token=csrf, reason="x"), headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    r = c.post("/andon", data=dict(csrf_token=csrf, reason="x"), headers={"origin": "http://testserver"},
               follow_redirects=False)
    assert r.status_code == 303


def _expire_sessions(store, **delta):
    from megacoach.labels.schema import WebSessionRow

    with store.session() as s, s.begin():
        for row in s.query(WebSessionRow):
            if "ttl" in delta:
                row.expires_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
            else:
                row.last_seen_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)


@pytest.mark.parametrize("how", ["ttl", "idle"])
def test_expired_sessions_get_a_clear_4xx(world, how):
    c = TestClient(world.app)
    csrf = login(c, "alice")
    _expire_sessions(world.store, **{how: True})
    r = c.post("/api/labels", json=dict(item_id=1, choice=1), headers={"x-csrf-token": csrf})
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    login(c, "alice")
    _expire_sessions(world.store, **{how: True})
    r = c.post("/label", data=dict(csrf_token=csrf, item_id=1, choice=1), headers={"accept": "text/html"})
    assert r.status_code == 401 and "expired" in r.text and 'href="/login"' in r.text
    login(c, "alice")
    _expire_sessions(world.store, **{how: True})
    r = c.get("/label", follow_redirects=False)
    assert r.status_code == 303 and "expired=1" in r.headers["location"]
    page = c.get(r.headers["location"])
    assert "session expired" in page.text.lower()


def test_garbage_cookie_and_tokens(world):
    c = TestClient(world.app)
    c.cookies.set("mc_session", "garbage" * 100)
    assert c.get("/api/me").status_code == 401
    r = c.get("/label", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert TestClient(world.app).get("/api/me", headers=bearer("x" * 5000)).status_code == 401
    assert TestClient(world.app).get("/api/me", headers={"Authorization": "Bearer"}).status_code == 401
    assert TestClient(world.app).get("/login?next=//evil.example").status_code == 200
    fresh = TestClient(world.app)
    token = csrf_of(fresh.get("/login").text)
    r = fresh.post("/login", data=dict(name="alice", password=PASSWORD, csrf_token=token, next="//evil.example/x"),
                   follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect


def test_bad_invitation_and_guideline_input(world):
    admin = TestClient(world.app)
    csrf = login(admin, "root")
    h = {"x-csrf-token": csrf}
    assert admin.post("/api/admin/invites", json=dict(name="   "), headers=h).status_code == 422
    assert admin.post("/api/admin/invites", json=dict(name="eve\x07"), headers=h).status_code == 422
    assert admin.post("/api/admin/invites", json=dict(name="eve", role="god"), headers=h).status_code == 422
    r = admin.post("/api/admin/invites", json=dict(name="alice"), headers=h)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    assert admin.post("/api/admin/guidelines", json=dict(version="9", markdown=""), headers=h).status_code == 422
    r = admin.post("/admin/guidelines", data=dict(csrf_token=csrf, version="", markdown="# x"))
    assert r.status_code == 422
    r = admin.post(f"/api/admin/labelers/{world.admin_id}/active", json=dict(active=False), headers=h)
    assert r.status_code == 409  # an admin cannot lock themself out


def test_random_junk_never_500(world):
    rng = random.Random(0)
    admin = TestClient(world.app)
    csrf = login(admin, "root")
    routes = [("POST", p) for p in ("/api/labels", "/api/skips", "/api/andon", "/api/admin/invites", "/api/admin/tokens",
                                    "/api/admin/guidelines", "/api/admin/andon/clear", "/api/admin/labelers/1/active",
                                    "/label", "/skip", "/andon", "/admin/invites", "/admin/tokens", "/admin/guidelines",
                                    "/admin/andon/clear", "/login", "/logout", "/invite/abc", "/label/next",
                                    "/admin/export.jsonl", "/api/next", "/api/export.jsonl", "/account/password")]
    routes += [("GET", p) for p in ("/api/labels?after_id=x", "/api/labels?limit=-1", "/label?saved=7",
                                    "/admin/audit?before_id=abc", "/admin/export.jsonl?kind=robot", "/login?next=%00",
                                    "/api/admin/audit?action=" + "a" * 300, "/invite/" + "%ff" * 10)]
    junk_values = [None, "", "0", -1, 2**70, 1e308, "<script>", "\x00", "ü" * 50, [], {}, [1, "a"], True, "1" * 400]
    for method, path in routes:
        for _ in range(6):
            body = {k: rng.choice(junk_values) for k in rng.sample(
                ["item_id", "choice", "reason", "note", "name", "role", "owner", "version", "markdown", "active",
                 "resume", "csrf_token", "flagged", "time_taken_s", "password"], k=4)}
            if method == "GET":
                r = admin.get(path)
            elif path.startswith("/api/"):
                r = admin.post(path, content=json.dumps(body), headers={"x-csrf-token": csrf, "content-type": "application/json"})
            else:
                form = {k: "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in body.items()}
                form.setdefault("csrf_token", csrf)
                r = admin.post(path, data=form)
            assert r.status_code < 500, (method, path, body, r.status_code, r.text[:300])
            assert 400 <= r.status_code < 500 or r.status_code in (200, 201, 303), (method, path, r.status_code)
