"""Shared helpers for the labeling app tests (imported by tests/test_app_*.py and test_browser_*.py).

Holds no tests itself. Everything runs on CPU against a temporary SQLite label store.
"""

from __future__ import annotations

import re
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

# "testserver": the Host of Starlette's TestClient (served apps answer 127.0.0.1 and localhost by default)
FAST = dict(argon2_time_cost=1, argon2_memory_kib=1024, too_fast_s=2.0, allowed_hosts=("testserver",))
PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]*)"')


def make_store(tmp_path: Path, name: str = "labels.db"):
    from megacoach.labels.store import LabelStore

    return LabelStore(f"sqlite:///{tmp_path / name}")


def add_items(store, n: int, *, k: int = 4, batch: str = "b0", source: str = "online", gold: bool = False,
              calibration: bool = False, overlap: int = 1, iterations: Optional[list[int]] = None,
              text: str = "continuation") -> list[int]:
    """n items of k samples each; returns their ids."""
    from megacoach.labels.records import NewSample

    specs = []
    for i in range(n):
        its = iterations or [0] * k
        specs.append(dict(
            query_text=f"Prompt {batch}-{i}: To be, or not to be",
            query_token_ids=[1, 2, 3],
            samples=[NewSample(f"{text} {i}.{j}", [4 + j], policy=f"ckpt-{its[j]}", iteration=its[j], seed=j,
                               run_id="run-test") for j in range(k)],
            batch=batch, source=source, is_gold=gold, gold_choice=0 if gold else None, is_calibration=calibration,
            overlap=overlap, run_id="run-test"))
    return [c.item.id for c in store.create_items(specs)]


def make_person(store, name: str, role: str = "labeler", password: str = PASSWORD) -> int:
    from megacoach.app.security import Passwords
    from megacoach.app.settings import AppSettings

    pw = Passwords.from_settings(AppSettings(**FAST)).hash(password)
    rec = store.get_or_create_labeler(name, kind="person", role=role, password_hash=pw)
    return rec.id


def make_token(store, owner: str = "trainer") -> str:
    """An API token with every scope the account can have: a program's, or a person's own (minted
    by that person: nobody mints a token for someone else)."""
    from megacoach.app.auth import Auth, Principal
    from megacoach.app.settings import AppSettings

    rec = store.get_labeler(owner)
    by = Principal(rec.id, rec.name, rec.role, rec.kind, "session") if rec is not None and rec.kind == "person" else None
    raw, _ = Auth(store, AppSettings(**FAST)).create_api_token(owner, owner, by=by)
    return raw


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no csrf_token in page"
    return m.group(1)


def login(client, name: str, password: str = PASSWORD) -> str:
    """Log in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    r = client.post("/login", data=dict(name=name, password=password, csrf_token=csrf_of(page.text), next="/"),
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return client.get("/api/me").json()["csrf_token"]


def take_next(client, headers: Optional[dict] = None):
    """POST /api/next (taking an item is a write): with the given headers (an API token, or a
    session's CSRF token), else with the session's CSRF token fetched from /api/me. The response."""
    if headers is None:
        headers = {"x-csrf-token": client.get("/api/me").json().get("csrf_token") or ""}
    return client.post("/api/next", headers=headers)


def take_page_item(client) -> None:
    """What the labeling page does without an item: POST /label/next (the form label.js sends)."""
    page = client.get("/label")
    r = client.post("/label/next", data=dict(csrf_token=csrf_of(page.text)), follow_redirects=False)
    assert r.status_code == 303, r.text


@dataclass
class World:
    store: object
    app: object
    admin_id: int
    alice_id: int
    bob_id: int
    token: str  # a program account's API token ("trainer")


def make_world(tmp_path: Path, n_items: int = 6, **settings) -> World:
    from megacoach.app.server import create_app

    store = make_store(tmp_path)
    admin_id = make_person(store, "root", "admin")
    alice = make_person(store, "alice")
    bob = make_person(store, "bob")
    add_items(store, n_items)
    store.set_guideline("1", "# Guidelines\n\nPick the **best** continuation.", created_by="root")
    token = make_token(store)
    app = create_app(settings=dict(FAST, **settings), store=store)
    return World(store, app, admin_id, alice, bob, token)


@contextmanager
def server_in_thread(config) -> Iterator[int]:
    """Run uvicorn with ``config`` on 127.0.0.1 (a free port) in a thread until /api/health answers; yields the
    port, and stops the server after."""
    import uvicorn

    from megacoach.app.server import wait_until_healthy

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=20)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30)
    with server_in_thread(config) as port:
        yield f"http://127.0.0.1:{port}"


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def need_chromium():
    """Skip (with the reason) when Debian's chromium or the playwright package is missing."""
    if not CHROMIUM.exists():
        pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; "
                    ".ci/services.sh installs it)")
    pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package (pip install playwright)")


@pytest.fixture
def browser():
    """Debian's Chromium driven by Playwright (the browser tests skip without it)."""
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def keyboard_login(page, base: str, name: str) -> None:
    """Log in as `name` (password PASSWORD) with the keyboard alone, starting from the autofocused name field."""
    page.goto(base + "/login")
    page.wait_for_function("document.activeElement && document.activeElement.name === 'name'")  # autofocus
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    with page.expect_navigation():
        page.keyboard.press("Enter")
