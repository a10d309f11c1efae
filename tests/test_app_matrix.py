"""Endpoint x role matrix: every route of the labeling app, asked by every kind of caller.

Callers: anonymous, a labeler (browser session), an adjudicator (a labeler allowed to decide
disagreements; browser session), an admin (browser session), a program's API token (the trainer), an
admin's API token. Expected: ``ok`` (2xx, or a redirect that is not to the log-in
page), ``login`` (401, or a redirect to /login for page GETs) or ``403``. A route missing from the
table fails the test, so new routes must be added here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient

from test_app_support import PASSWORD, csrf_of, login, make_token, make_world

ROLES = ("anon", "labeler", "adjudicator", "admin", "token", "admin_token")

PUBLIC = dict(anon="ok", labeler="ok", adjudicator="ok", admin="ok", token="ok", admin_token="ok")
PERSON = dict(anon="login", labeler="ok", adjudicator="ok", admin="ok", token="login", admin_token="login")
ADMIN_PAGE = dict(anon="login", labeler="403", adjudicator="403", admin="ok", token="login", admin_token="login")
ADJUDICATE_PAGE = dict(ADMIN_PAGE, adjudicator="ok")
API_ANY = dict(anon="login", labeler="ok", adjudicator="ok", admin="ok", token="ok", admin_token="ok")
API_LABEL = API_ANY
API_ANDON = dict(anon="login", labeler="ok", adjudicator="ok", admin="ok", token="403", admin_token="ok")
API_READ = dict(anon="login", labeler="403", adjudicator="403", admin="ok", token="ok", admin_token="ok")
API_ADMIN = dict(anon="login", labeler="403", adjudicator="403", admin="ok", token="403", admin_token="ok")
API_ADJUDICATE = dict(API_ADMIN, adjudicator="ok")


@dataclass
class Ctx:
    client: TestClient
    role: str
    world: Any
    csrf: str  # the session's CSRF token ("" without a session)
    headers: dict
    guest: TestClient  # a second client without log-in (accepting an invitation logs it in)

    def held_item(self) -> int:
        """An item held by this caller (or item 1 when the caller may not label)."""
        headers = dict(self.headers, **({"x-csrf-token": self.csrf} if self.csrf else {}))
        r = self.client.post("/api/next", headers=headers)
        if r.status_code == 200 and r.json()["item"]:
            return r.json()["item"]["item_id"]
        return 1

    def form(self, **data) -> dict:
        return dict(data=dict(data, csrf_token=self.csrf))

    def json(self, **data) -> dict:
        return dict(json=data, headers=dict(self.headers, **({"x-csrf-token": self.csrf} if self.csrf else {})))

    def invite_token(self) -> str:
        from megacoach.app.auth import Auth

        token, _ = Auth(self.world.store, self.world.app.state.mc.settings).create_invitation(
            f"guest{len(self.world.store.labelers())}", "labeler", "test")
        return token

    def victim(self) -> int:
        return self.world.store.get_or_create_labeler(f"victim{len(self.world.store.labelers())}").id

    def dispute(self) -> int:
        """A new item whose two labels (by two programs) disagree: open for any adjudicator."""
        from test_app_support import add_items

        store = self.world.store
        (item_id,) = add_items(store, 1, batch=f"dispute{len(store.labelers())}", overlap=2)
        n = len(store.labelers())
        store.add_comparison(item_id, 0, store.get_or_create_labeler(f"bot-a{n}", kind="program").id)
        store.add_comparison(item_id, None, store.get_or_create_labeler(f"bot-b{n}", kind="program").id,
                             verdict="tie")
        return item_id

    def labeler_id(self) -> int:
        return self.world.bob_id

    def revocable(self) -> int:
        make_token(self.world.store, "revocable")
        from megacoach.app.auth import Auth

        return Auth(self.world.store, self.world.app.state.mc.settings).api_tokens()[-1]["id"]


def _login_form(c: Ctx) -> dict:
    page = c.guest.get("/login")
    return dict(data=dict(name="nobody", password="wrong-password-x", csrf_token=csrf_of(page.text)))


def _invite_post(c: Ctx) -> tuple[str, dict]:
    token = c.invite_token()
    page = c.guest.get(f"/invite/{token}")
    return f"/invite/{token}", dict(data=dict(password=PASSWORD, password2=PASSWORD, csrf_token=csrf_of(page.text)))


# (method, route path as registered, expectations, request builder -> (url, kwargs))
Case = tuple[str, str, dict, Callable[[Ctx], tuple[str, dict]]]
CASES: list[Case] = [
    ("GET", "/", dict(PERSON), lambda c: ("/", {})),
    ("GET", "/login", PUBLIC, lambda c: ("/login", {})),
    ("POST", "/login", {role: "login" for role in ROLES},
     lambda c: ("/login", _login_form(c))),  # a wrong password for everyone: 401 by design
    ("POST", "/logout", PERSON, lambda c: ("/logout", c.form())),
    ("GET", "/invite/{token}", PUBLIC, lambda c: (f"/invite/{c.invite_token()}", {})),
    ("POST", "/invite/{token}", PUBLIC, _invite_post),
    ("GET", "/account", PERSON, lambda c: ("/account", {})),
    ("POST", "/account/password", PERSON, lambda c: ("/account/password", c.form(
        current_password=PASSWORD, new_password=PASSWORD + " 2", new_password2=PASSWORD + " 2"))),
    ("GET", "/label", PERSON, lambda c: ("/label", {})),
    ("POST", "/label/next", PERSON, lambda c: ("/label/next", c.form())),
    ("POST", "/label", PERSON, lambda c: ("/label", c.form(item_id=c.held_item(), choice=1, elapsed_ms="9000"))),
    ("GET", "/adjudicate", ADJUDICATE_PAGE, lambda c: (f"/adjudicate?item_id={c.dispute()}", {})),
    ("POST", "/adjudicate", ADJUDICATE_PAGE,
     lambda c: ("/adjudicate", c.form(item_id=c.dispute(), choice="tie", note="both fine"))),
    ("POST", "/skip", PERSON, lambda c: ("/skip", c.form(item_id=c.held_item(), reason_choice="1"))),
    ("GET", "/guidelines", PERSON, lambda c: ("/guidelines", {})),
    ("GET", "/progress", PERSON, lambda c: ("/progress", {})),
    ("GET", "/andon", PERSON, lambda c: ("/andon", {})),
    ("POST", "/andon", PERSON, lambda c: ("/andon", c.form(reason="bad output"))),
    ("GET", "/admin", ADMIN_PAGE, lambda c: ("/admin", {})),
    ("GET", "/admin/people", ADMIN_PAGE, lambda c: ("/admin/people", {})),
    ("POST", "/admin/invites", ADMIN_PAGE, lambda c: ("/admin/invites", c.form(name=f"inv{c.role}", role="labeler"))),
    ("POST", "/admin/labelers/{labeler_id}/active", ADMIN_PAGE,
     lambda c: (f"/admin/labelers/{c.victim()}/active", c.form(active=0))),
    ("POST", "/admin/labelers/{labeler_id}/adjudicator", ADMIN_PAGE,
     lambda c: (f"/admin/labelers/{c.labeler_id()}/adjudicator", c.form(adjudicator=1))),
    ("POST", "/admin/tokens", ADMIN_PAGE, lambda c: ("/admin/tokens", c.form(owner="bot", token_name="t"))),
    ("POST", "/admin/tokens/{token_id}/revoke", ADMIN_PAGE, lambda c: (f"/admin/tokens/{c.revocable()}/revoke", c.form())),
    ("GET", "/admin/guidelines", ADMIN_PAGE, lambda c: ("/admin/guidelines", {})),
    ("POST", "/admin/guidelines", ADMIN_PAGE,
     lambda c: ("/admin/guidelines", c.form(version=f"v-{c.role}", markdown="# new"))),
    ("GET", "/admin/audit", ADMIN_PAGE, lambda c: ("/admin/audit", {})),
    ("POST", "/admin/export.jsonl", ADMIN_PAGE, lambda c: ("/admin/export.jsonl", c.form())),
    ("POST", "/admin/andon/clear", ADMIN_PAGE, lambda c: ("/admin/andon/clear", c.form(note="ok", resume="1"))),
    ("GET", "/api/health", PUBLIC, lambda c: ("/api/health", dict(headers=c.headers))),
    ("GET", "/api/me", API_ANY, lambda c: ("/api/me", dict(headers=c.headers))),
    ("GET", "/api/status", API_ANY, lambda c: ("/api/status", dict(headers=c.headers))),
    ("GET", "/api/guidelines", API_ANY, lambda c: ("/api/guidelines", dict(headers=c.headers))),
    ("GET", "/api/progress", API_ANY, lambda c: ("/api/progress", dict(headers=c.headers))),
    ("POST", "/api/next", API_LABEL, lambda c: ("/api/next", c.json())),
    ("POST", "/api/labels", API_LABEL, lambda c: ("/api/labels", c.json(item_id=c.held_item(), choice=2))),
    ("POST", "/api/skips", API_LABEL, lambda c: ("/api/skips", c.json(item_id=c.held_item(), reason="unsure"))),
    ("POST", "/api/andon", API_ANDON, lambda c: ("/api/andon", c.json(reason="loops"))),
    ("GET", "/api/adjudication", API_ADJUDICATE, lambda c: ("/api/adjudication", dict(headers=c.headers))),
    ("GET", "/api/adjudication/{item_id}", API_ADJUDICATE,
     lambda c: (f"/api/adjudication/{c.dispute()}", dict(headers=c.headers))),
    ("POST", "/api/adjudication/{item_id}", API_ADJUDICATE,
     lambda c: (f"/api/adjudication/{c.dispute()}", c.json(choice=1, note="the first reads best"))),
    ("GET", "/api/labels", API_READ, lambda c: ("/api/labels", dict(headers=c.headers))),
    ("POST", "/api/export.jsonl", API_READ, lambda c: ("/api/export.jsonl", c.json())),
    ("GET", "/api/admin/dashboard", API_ADMIN, lambda c: ("/api/admin/dashboard", dict(headers=c.headers))),
    ("GET", "/api/admin/labelers", API_ADMIN, lambda c: ("/api/admin/labelers", dict(headers=c.headers))),
    ("POST", "/api/admin/invites", API_ADMIN, lambda c: ("/api/admin/invites", c.json(name=f"api{c.role}"))),
    ("POST", "/api/admin/labelers/{labeler_id}/active", API_ADMIN,
     lambda c: (f"/api/admin/labelers/{c.victim()}/active", c.json(active=False))),
    ("POST", "/api/admin/labelers/{labeler_id}/adjudicator", API_ADMIN,
     lambda c: (f"/api/admin/labelers/{c.labeler_id()}/adjudicator", c.json(adjudicator=True))),
    ("POST", "/api/admin/tokens", API_ADMIN, lambda c: ("/api/admin/tokens", c.json(owner="bot2"))),
    ("POST", "/api/admin/tokens/{token_id}/revoke", API_ADMIN,
     lambda c: (f"/api/admin/tokens/{c.revocable()}/revoke", c.json())),
    ("POST", "/api/admin/guidelines", API_ADMIN,
     lambda c: ("/api/admin/guidelines", c.json(version=f"api-{c.role}", markdown="# g"))),
    ("GET", "/api/admin/audit", API_ADMIN, lambda c: ("/api/admin/audit", dict(headers=c.headers))),
    ("POST", "/api/admin/andon/clear", API_ADMIN, lambda c: ("/api/admin/andon/clear", c.json(note="x"))),
    ("GET", "/openapi.json", PUBLIC, lambda c: ("/openapi.json", {})),
    ("GET", "/static/{path}", PUBLIC, lambda c: ("/static/label.js", {})),
]


def all_routes() -> set[tuple[str, str]]:
    from megacoach.app import api, web

    out = {("GET", "/openapi.json"), ("GET", "/static/{path}")}
    for router in (web.router, api.router):
        for r in router.routes:
            for m in r.methods - {"HEAD"}:
                out.add((m, r.path))
    return out


def test_matrix_covers_every_route():
    covered = {(m, p) for m, p, _, _ in CASES}
    assert all_routes() == covered, f"missing: {all_routes() - covered}; stale: {covered - all_routes()}"


def _outcome(r) -> str:
    if r.status_code in (301, 302, 303, 307):
        return "login" if r.headers["location"].startswith("/login") else "ok"
    if r.status_code == 401:
        return "login"
    if r.status_code == 403:
        return "403"
    if 200 <= r.status_code < 300:
        return "ok"
    return str(r.status_code)


@pytest.mark.parametrize("role", ROLES)
def test_role_matrix(tmp_path, role):
    w = make_world(tmp_path, n_items=10)
    w.store.set_run_status("run-m", "running")
    client = TestClient(w.app)
    headers: dict = {}
    csrf = ""
    if role == "labeler":
        csrf = login(client, "alice")
    elif role == "adjudicator":
        w.store.update_labeler(w.alice_id, adjudicator=True)
        csrf = login(client, "alice")
    elif role == "admin":
        csrf = login(client, "root")
    elif role == "token":
        headers = {"Authorization": f"Bearer {w.token}"}
    elif role == "admin_token":
        headers = {"Authorization": f"Bearer {make_token(w.store, 'root')}"}
    ctx = Ctx(client, role, w, csrf, headers, TestClient(w.app))
    failures = []
    for method, path, expect, build in CASES:
        if path == "/logout":
            continue  # run last: it ends the session
        url, kwargs = build(ctx)
        who = ctx.guest if (method, path) in (("POST", "/invite/{token}"), ("POST", "/login")) else client
        r = who.request(method, url, follow_redirects=False, **kwargs)
        got = _outcome(r)
        assert r.status_code < 500, (method, url, r.status_code, r.text[:300])
        if got != expect[role]:
            failures.append(f"{method} {url}: expected {expect[role]}, got {r.status_code} {_msg(r)}")
    method, path, expect, build = next(c for c in CASES if c[1] == "/logout")
    url, kwargs = build(ctx)
    r = client.request(method, url, follow_redirects=False, **kwargs)
    got = "ok" if r.status_code == 303 else _outcome(r)  # a log-out redirects to the log-in page
    if got == "ok":
        assert client.get("/api/me").status_code == 401
    if got != expect[role]:
        failures.append(f"POST /logout: expected {expect[role]}, got {got}")
    assert not failures, "\n".join(failures)


def _msg(r) -> str:
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.text[:200]
    import re

    m = re.search(r'class="flash err"[^>]*>([^<]*)', r.text)
    return m.group(1) if m else r.text[:200]
