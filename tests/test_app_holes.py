"""The labeling app's security holes found under load and under attack, one test each.

Each test reproduces what a tester did and checks the app now resists it. Everything runs on CPU
against a temporary SQLite label store (TestClient, or uvicorn on 127.0.0.1 where the HTTP server
itself matters).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from test_app_support import FAST, PASSWORD, add_items, csrf_of, live_server, login, make_world, server_in_thread


def _sub(tmp_path, name: str):
    path = tmp_path / name
    path.mkdir()
    return path


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _client(world, host: str = "testclient") -> TestClient:
    return TestClient(world.app, client=(host, 50000))


def _try_login(c: TestClient, name: str, password: str, **kw):
    page = c.get("/login")
    return c.post("/login", data=dict(name=name, password=password, csrf_token=csrf_of(page.text)),
                  follow_redirects=False, **kw)


def _next(c: TestClient, csrf: str = "", token: str = "", get_if_no_post: bool = False) -> dict:
    headers = bearer(token) if token else {"x-csrf-token": csrf}
    r = c.post("/api/next", headers=headers)
    if r.status_code == 405 and get_if_no_post:  # the app before assignment moved to POST
        r = c.get("/api/next", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["item"]


# 1 ---------------------------------------------------------------------------------------------------

def test_hole01_lockout_cannot_lock_out_the_admin(tmp_path):
    """10 wrong passwords for 'root' from one client used to lock root out for 15 minutes, also
    against the right password from anywhere. Now the attacking client is slowed down (with
    backoff) and the admin, from their own address, logs in."""
    w = make_world(tmp_path)
    attacker = _client(w, "203.0.113.66")
    codes = [_try_login(attacker, "root", f"guess-{i}-xxxxxx").status_code for i in range(12)]
    assert codes[0] == 401 and 429 in codes  # brute force gets expensive for the attacker
    admin = _client(w, "198.51.100.7")
    r = _try_login(admin, "root", PASSWORD)
    assert r.status_code == 303, r.text  # the right password gets in: no account lock
    r = _try_login(attacker, "root", "another-guess-xx")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    # the backoff grows with every further failure of that client (and stays bounded)
    from megacoach.app.throttle import FailureTable

    t = FailureTable(free=2, backoff_s=1.0, max_s=8.0, forget_s=3600, max_entries=100)
    waits = []
    for i in range(7):
        t.fail("k", now=100.0 + i * 100)
        waits.append(t.wait("k", now=100.0 + i * 100))
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert t.wait("k", now=100.0 + 6 * 100 + 9) == 0.0  # waited long enough: may try again


# 2 ---------------------------------------------------------------------------------------------------

class _CountingHasher:
    def __init__(self, real, calls: list, delay_s: float = 0.0) -> None:
        self.real, self.calls, self.delay_s = real, calls, delay_s
        self.active, self.max_active = 0, 0
        self._lock = threading.Lock()

    def _run(self, what, fn, *a):
        with self._lock:
            self.calls.append(what)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            return fn(*a)
        finally:
            with self._lock:
                self.active -= 1

    def hash(self, *a):
        return self._run("hash", self.real.hash, *a)

    def verify(self, *a):
        return self._run("verify", self.real.verify, *a)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_hole02_unknown_names_cost_the_same_and_sprays_do_not_reset_or_starve(tmp_path):
    w = make_world(tmp_path)
    auth = w.app.state.mc.auth
    calls: list = []
    auth.passwords.hasher = _CountingHasher(auth.passwords.hasher, calls)
    cost = {}
    for name in ("alice", "nobody-at-all", "trainer"):  # a person, an unknown name, a program (no password)
        calls.clear()
        assert _try_login(_client(w, f"192.0.2.{len(cost) + 1}"), name, "wrong-password-123").status_code == 401
        cost[name] = list(calls)
    assert cost["alice"] == cost["nobody-at-all"] == cost["trainer"] == ["verify"]

    # a spray of other names from other clients does not make the table forget the target
    from megacoach.app.settings import AppSettings
    from megacoach.app.throttle import LoginThrottle

    th = LoginThrottle(AppSettings(**FAST, login_free_failures=3, login_throttle_entries=1000))
    for _ in range(3):
        th.fail("203.0.113.66", "root")
    assert th.retry_after("203.0.113.66", "root") > 0
    for i in range(20_000):
        th.fail(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", f"user{i}")
    assert th.retry_after("203.0.113.66", "root") > 0  # still slowed down
    assert th.size() <= 2 * 1000  # bounded memory (two tables)


def test_hole02_password_hashing_is_bounded_and_off_the_event_loop(tmp_path):
    """40 simultaneous failed log-ins must not take every worker thread: hashes run at most
    ``password_hash_concurrency`` (2 by default) at a time, and labeling answers meanwhile."""
    w = make_world(tmp_path)
    auth = w.app.state.mc.auth
    counting = _CountingHasher(auth.passwords.hasher, [])
    auth.passwords.hasher = counting
    with live_server(w.app) as base:
        lab = httpx.Client(base_url=base, timeout=60)
        page = lab.get("/login")
        assert lab.post("/login", data=dict(name="alice", password=PASSWORD, csrf_token=csrf_of(page.text))
                        ).status_code in (200, 303)
        counting.delay_s = 0.3
        statuses = []

        def spray(i: int) -> None:
            with httpx.Client(base_url=base, timeout=120) as c:
                p = c.get("/login")
                r = c.post("/login", data=dict(name=f"user{i}", password="wrong-password-1",
                                               csrf_token=csrf_of(p.text)))
                statuses.append(r.status_code)

        threads = [threading.Thread(target=spray, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        r = lab.get("/api/progress")
        took = time.monotonic() - t0
        for t in threads:
            t.join()
    assert r.status_code == 200
    assert counting.max_active <= 2, f"{counting.max_active} password hashes ran at once"
    assert took < 1.0, f"labeling waited {took:.2f} s behind password hashes"
    assert set(statuses) <= {401, 429, 503}


def test_hole02_login_queue_is_bounded(tmp_path):
    """Beyond ``password_hash_queue`` waiting log-ins the app answers 503 at once (no thread, no hash)."""
    import anyio

    from megacoach.app.auth import HashSlots
    from megacoach.app.errors import AppError

    slots = HashSlots(concurrency=1, queue=2)
    results: list = []

    async def main() -> None:
        async def one(i: int) -> None:
            try:
                results.append(await slots.run(time.sleep, 0.2))
            except AppError as e:
                results.append(e.status)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)

    anyio.run(main)
    assert results.count(503) == 3 and results.count(None) == 3


# 3 ---------------------------------------------------------------------------------------------------

def test_hole03_invitation_secrets_never_reach_the_access_log(tmp_path):
    import uvicorn

    w = make_world(tmp_path)
    from megacoach.app.auth import Auth

    token, _ = Auth(w.store, w.app.state.mc.settings).create_invitation("carol", "labeler", "test")
    config = uvicorn.Config(w.app, log_level="info", access_log=True, lifespan="off")  # uvicorn's own logging
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Capture()
    logging.getLogger("uvicorn.access").addHandler(handler)
    try:
        with server_in_thread(config) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            page = c.get(f"/invite/{token}")
            assert page.status_code == 200
            c.post(f"/invite/{token}", data=dict(password="short", password2="short", csrf_token=csrf_of(page.text)))
            c.get(f"/login?token={token}&next=/")
            time.sleep(0.2)
    finally:
        logging.getLogger("uvicorn.access").removeHandler(handler)
    invite_lines = [m for m in records if "/invite/" in m]
    assert len(invite_lines) >= 2, records
    assert not [m for m in records if token in m], records
    assert all("/invite/[redacted]" in m for m in invite_lines)


# 4 ---------------------------------------------------------------------------------------------------

def test_hole04_invitation_links_ignore_the_host_header(tmp_path):
    # another host name the app answers (an allowed host): links still never use the Host header
    w = make_world(tmp_path, allowed_hosts=("testserver", "alt.example"))
    c = TestClient(w.app)
    csrf = login(c, "root")
    evil = {"host": "alt.example"}
    assert c.get("/login", headers={"host": "evil.example"}).status_code == 400  # a host it does not answer
    r = c.post("/api/admin/invites", json=dict(name="carol"), headers=dict(evil, **{"x-csrf-token": csrf}))
    assert r.status_code == 201, r.text
    assert "alt.example" not in r.json()["url"] and r.json()["url"].startswith("/invite/")
    assert r.json()["note"]  # says that the link is a path: configure public_url for full links
    page = c.post("/admin/invites", data=dict(csrf_token=csrf, name="dave", role="labeler"), headers=evil)
    assert page.status_code == 200 and "alt.example" not in page.text
    # with a configured public URL the links use it
    w2 = make_world(_sub(tmp_path, "w2"), public_url="https://label.example.org/",
                    allowed_hosts=("testserver", "alt.example"))
    c2 = TestClient(w2.app)
    csrf2 = login(c2, "root")
    url = c2.post("/api/admin/invites", json=dict(name="erin"), headers=dict(evil, **{"x-csrf-token": csrf2})).json()["url"]
    assert url.startswith("https://label.example.org/invite/")
    from megacoach.app.settings import AppSettings
    from megacoach.errors import ConfigError

    with pytest.raises(ConfigError, match="public_url"):
        AppSettings.from_mapping(dict(public_url="label.example.org"))


# 5 ---------------------------------------------------------------------------------------------------

def test_hole05_create_admin_does_not_promote_and_passwords_reset_or_change(tmp_path, capsys):
    from megacoach.cli import main

    w = make_world(tmp_path)
    db = w.store.url
    new = "a new long password 42"
    assert main(["label", "create-admin", "alice", "--db", db, "--password", new]) == 2
    err = capsys.readouterr().err.strip()
    assert "alice" in err and "reset-password" in err and len(err.splitlines()) == 1
    assert w.store.get_labeler("alice").role == "labeler"
    # the password reset keeps the role
    assert main(["label", "reset-password", "alice", "--db", db, "--password", new]) == 0
    assert w.store.get_labeler("alice").role == "labeler"
    c = TestClient(w.app)
    csrf = login(c, "alice", new)
    assert any(e.action == "password_reset" for e in w.store.audit_entries())
    # a logged-in person changes their own password: current password and CSRF token needed
    page = c.get("/account")
    assert page.status_code == 200 and 'name="current_password"' in page.text
    newer = "an even newer password 7"
    bad = c.post("/account/password", data=dict(csrf_token=csrf, current_password="not it at all",
                                                 new_password=newer, new_password2=newer))
    assert bad.status_code == 403
    nocsrf = c.post("/account/password", data=dict(current_password=new, new_password=newer, new_password2=newer))
    assert nocsrf.status_code == 403
    ok = c.post("/account/password", data=dict(csrf_token=csrf, current_password=new, new_password=newer,
                                               new_password2=newer), follow_redirects=False)
    assert ok.status_code == 303
    assert _try_login(TestClient(w.app), "alice", newer).status_code == 303
    assert w.store.get_labeler("alice").role == "labeler"
    assert [e.actor for e in w.store.audit_entries(action="password_change")] == ["alice"]


# 6 ---------------------------------------------------------------------------------------------------

def test_hole06_tokens_cannot_impersonate_and_carry_scope_and_expiry(tmp_path):
    import datetime as dt

    from megacoach.labels.schema import ApiTokenRow

    w = make_world(tmp_path)
    admin = TestClient(w.app)
    csrf = login(admin, "root")
    h = {"x-csrf-token": csrf}
    # an admin cannot mint a token for a labeler (and then label as them)
    r = admin.post("/api/admin/tokens", json=dict(owner="alice"), headers=h)
    assert r.status_code == 403 and "alice" in r.json()["detail"]
    page = admin.post("/admin/tokens", data=dict(csrf_token=csrf, owner="bob", token_name="x"))
    assert page.status_code == 403
    # a program account's token: scopes and an expiry
    r = admin.post("/api/admin/tokens", json=dict(owner="reader", scopes=["read"], days=7), headers=h)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["scopes"] == ["read"] and info["expires_at"]
    reader = TestClient(w.app)
    assert reader.post("/api/export.jsonl", headers=bearer(info["token"])).status_code == 200
    assert reader.post("/api/next", headers=bearer(info["token"])).status_code == 403  # no label scope
    assert admin.post("/api/admin/tokens", json=dict(owner="reader", scopes=["admin"]), headers=h).status_code == 422
    # expiry
    with w.store.session() as s, s.begin():
        s.get(ApiTokenRow, info["id"]).expires_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    r = reader.post("/api/export.jsonl", headers=bearer(info["token"]))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    # the admin's own token acts as its own identity: its labels say they came through a token
    mine = admin.post("/api/admin/tokens", json=dict(owner="root", scopes=["label"]), headers=h).json()
    bot = TestClient(w.app)
    item = _next(bot, token=mine["token"])
    assert bot.post("/api/labels", json=dict(item_id=item["item_id"], choice=1), headers=bearer(mine["token"])
                    ).status_code == 201
    item = _next(admin, csrf=csrf)
    admin.post("/api/labels", json=dict(item_id=item["item_id"], choice=1), headers=h)
    lines = [json.loads(x) for x in admin.post("/admin/export.jsonl", data=dict(csrf_token=csrf)).text.splitlines()]
    via = {(x["labeler"], x["via"], x["api_token_id"]) for x in lines}
    assert via == {("root", "token", mine["id"]), ("root", "session", None)}
    # the command line mints only program tokens, with scopes and days
    from megacoach.cli import main

    assert main(["label", "token", "alice", "--db", w.store.url]) == 2
    assert main(["label", "token", "ci-bot", "--db", w.store.url, "--scope", "read", "--days", "3"]) == 0
    row = [t for t in w.app.state.mc.auth.api_tokens() if t["owner"] == "ci-bot"][0]
    assert row["scopes"] == ["read"] and row["expires_at"] < dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3, minutes=1)


def test_hole06_upgrade_revokes_tokens_minted_for_someone_else(tmp_path):
    """Tokens from before scopes existed: a program's keeps working (label, read; 90 days); a person's
    own token (the audit log shows they minted it) keeps their role's scopes; a token an admin
    minted for a labeler is revoked."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from megacoach.labels.store import LabelStore

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    cfg = LabelStore._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003_app_auth")
    with engine.begin() as c:
        for i, (name, kind, role) in enumerate([("trainer", "program", "program"), ("root", "person", "admin"),
                                                ("alice", "person", "labeler")], start=1):
            c.execute(text("INSERT INTO labelers (id, name, kind, role, active, created_at) "
                           "VALUES (:i, :n, :k, :r, 1, '2024-01-01 00:00:00')"), dict(i=i, n=name, k=kind, r=role))
            c.execute(text("INSERT INTO api_tokens (id, token_hash, name, labeler_id, created_at) "
                           "VALUES (:i, :h, :n, :i, '2024-01-01 00:00:00')"), dict(i=i, h=f"{i:064d}", n=name))
        for token_id, actor, owner in ((1, "root", "trainer"), (2, "root", "root"), (3, "root", "alice")):
            c.execute(text("INSERT INTO audit_log (at, actor, action, detail) VALUES ('2024-01-01 00:00:00', :a, "
                           "'token_create', :d)"), dict(a=actor, d=json.dumps(dict(owner=owner, token_id=token_id))))
    engine.dispose()
    store = LabelStore(f"sqlite:///{path}")  # migrates to head
    with store.session(write=False) as s:
        rows = {r.id: r for r in s.execute(text("SELECT id, scopes, expires_at, revoked_at, created_by FROM api_tokens"))}
    store.close()
    assert rows[1].scopes == "label,read" and rows[1].revoked_at is None and rows[1].expires_at is not None
    assert rows[2].scopes == "label,read,andon,admin" and rows[2].revoked_at is None and rows[2].created_by == "root"
    assert rows[3].revoked_at is not None


# 7 ---------------------------------------------------------------------------------------------------

def test_hole07_shown_order_is_not_computable_without_the_server_secret(tmp_path):
    from megacoach.labels.assignment import shown_order

    w = make_world(tmp_path, n_items=12)
    c = TestClient(w.app)
    csrf = login(c, "alice")
    predictable = 0
    for _ in range(12):
        item = _next(c, csrf, get_if_no_post=True)
        again = _next(c, csrf, get_if_no_post=True)  # a reload: same item, same order
        assert again["item_id"] == item["item_id"] and again["continuations"] == item["continuations"]
        texts = [x["text"] for x in item["continuations"]]
        shown = [int(t.rsplit(".", 1)[1]) for t in texts]  # "continuation <i>.<canonical index>"
        if shown == shown_order(w.alice_id, item["item_id"], item["k"]):
            predictable += 1
        r = c.post("/api/labels", json=dict(item_id=item["item_id"], choice=1, time_taken_s=5), headers={"x-csrf-token": csrf})
        assert r.status_code == 201 and r.json()["chosen"] == shown[0]
        (label,) = [x for x in w.store.comparisons() if x.item_id == item["item_id"]]
        assert label.shown_order == shown
    assert predictable < 6, f"{predictable} of 12 orders follow from labeler id and item id alone"
    # the key lives in the label store: every process (and restart) of the app shows the same order
    from megacoach.app.server import create_app

    again = create_app(settings=FAST, store=w.store).state.mc.labeling
    assert again.secret == w.app.state.mc.labeling.secret and len(again.secret) == 32


# 8 ---------------------------------------------------------------------------------------------------

def test_hole08_get_requests_change_nothing(tmp_path):
    from sqlalchemy import func, select

    from megacoach.labels.schema import AuditRow, ItemLockRow

    w = make_world(tmp_path)
    lab, admin = TestClient(w.app), TestClient(w.app)
    lcsrf, acsrf = login(lab, "alice"), login(admin, "root")

    def counts():
        with w.store.session(write=False) as s:
            return s.scalar(select(func.count(ItemLockRow.id))), s.scalar(select(func.count(AuditRow.id)))

    before = counts()
    assert lab.get("/label").status_code == 200
    lab.get("/api/next")
    assert admin.get("/admin/export.jsonl").status_code in (200, 405)
    TestClient(w.app).get("/api/export.jsonl", headers=bearer(w.token))
    assert counts() == before
    # the browser flow: a POST takes the next item, the page shows it
    page = lab.get("/label")
    assert 'action="/label/next"' in page.text
    r = lab.post("/label/next", data=dict(csrf_token=lcsrf), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/label")
    page = lab.get("/label")
    assert 'id="prompt"' in page.text
    assert lab.post("/label/next", data=dict(), follow_redirects=False).status_code == 403  # CSRF
    # the export is a POST (CSRF-protected) and is audited
    assert admin.post("/admin/export.jsonl", data=dict()).status_code == 403
    r = admin.post("/admin/export.jsonl", data=dict(csrf_token=acsrf))
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    assert [e.actor for e in w.store.audit_entries(action="export")] == ["root"]


# 9 ---------------------------------------------------------------------------------------------------

def test_hole09_failed_logins_record_the_client_address(tmp_path):
    w = make_world(tmp_path)
    _try_login(_client(w, "203.0.113.9"), "root", "not-the-password", headers={"x-forwarded-for": "1.2.3.4"})
    (entry,) = w.store.audit_entries(action="login_failed")
    assert entry.detail["client"] == "203.0.113.9"  # a client's own X-Forwarded-For is not believed
    # behind a trusted reverse proxy the forwarded address is the client
    w2 = make_world(_sub(tmp_path, "w2"), trusted_proxies=("10.0.0.1",))
    _try_login(_client(w2, "10.0.0.1"), "root", "not-the-password", headers={"x-forwarded-for": "6.6.6.6, 203.0.113.5"})
    (entry,) = w2.store.audit_entries(action="login_failed")
    assert entry.detail["client"] == "203.0.113.5"
    assert _try_login(_client(w2, "10.0.0.1"), "root", PASSWORD).status_code == 303
    assert w2.store.audit_entries(action="login")[-1].detail["client"] == "10.0.0.1"


# 10 --------------------------------------------------------------------------------------------------

def test_hole10_andon_flood_is_counted_once_rate_limited_and_attributed(tmp_path):
    w = make_world(tmp_path, andon_pulls_to_pause=2)  # andon_rate_per_min: 6 by default
    w.store.set_run_status("run-1", "running")
    c = TestClient(w.app)
    csrf = login(c, "alice")
    codes = [c.post("/api/andon", json=dict(reason=f"bad {i}"), headers={"x-csrf-token": csrf}) for i in range(30)]
    assert codes[0].status_code == 201 and codes[0].json()["people"] == 1  # the first pull is instant
    assert [r.status_code for r in codes[1:6]] == [200] * 5
    assert all(r.json()["already_pulled"] for r in codes[1:6])
    limited = [r for r in codes if r.status_code == 429]
    assert len(limited) == 24 and int(limited[0].headers["retry-after"]) >= 1
    assert len(w.store.andon_pulls("run-1")) == 1
    assert w.store.get_run_status("run-1").status == "running"  # one person, counted once
    repeats = w.store.audit_entries(action="andon_repeat")
    assert len(repeats) == 5 and {e.actor for e in repeats} == {"alice"} and repeats[0].detail["client"] == "testclient"
    assert len(w.store.audit_entries(action="andon_rate_limited")) >= 1
    admin = TestClient(w.app)
    login(admin, "root")
    d = admin.get("/api/admin/dashboard").json()["andon"]
    assert [p["name"] for p in d["pulls"]] == ["alice"] and d["repeats"] == {"alice": 5}
    assert "alice × 5" in admin.get("/admin").text
    # another person at the same address: their first pull is instant and counts
    b = TestClient(w.app)
    cb = login(b, "bob")
    r = b.post("/api/andon", json=dict(reason="gibberish"), headers={"x-csrf-token": cb})
    assert r.status_code == 201 and r.json()["paused"] is True
    assert w.store.audit_entries(action="andon_pull")[-1].detail["client"] == "testclient"


# 11 --------------------------------------------------------------------------------------------------

def test_hole11_slow_headers_and_slow_bodies_are_cut_off(tmp_path):
    import uvicorn

    from megacoach.app.httpguard import uvicorn_options
    from megacoach.app.settings import AppSettings
    from megacoach.errors import ConfigError

    for bad in (dict(header_timeout_s=0), dict(body_timeout_s=-1), dict(keep_alive_timeout_s=0),
                dict(max_header_bytes=10)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            AppSettings.from_mapping(bad)
    w = make_world(tmp_path, header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_timeout_s=1)
    opts = uvicorn_options(w.app.state.mc.settings)
    assert opts["timeout_keep_alive"] == 1 and opts["h11_max_incomplete_event_size"] == 16 * 1024
    config = uvicorn.Config(w.app, log_level="warning", access_log=False, lifespan="off", **opts)
    with server_in_thread(config) as port:
        # headers that never end: the server closes the connection after header_timeout_s
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(5)
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        got = b""
        try:
            while True:
                chunk = s.recv(1000)
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            pytest.fail("a connection with unfinished headers stayed open")
        assert time.monotonic() - t0 < 3 and (got == b"" or b"408" in got)
        s.close()
        # a body that never ends: 408 from the app after body_timeout_s
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(5)
        s.sendall(b"POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"item")
        got = b""
        try:
            while b"request body" not in got.lower():
                chunk = s.recv(1000)
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            pass
        assert b" 408 " in got.split(b"\r\n")[0] and b"request body" in got.lower(), got
        s.close()
        # an ordinary request still works
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
