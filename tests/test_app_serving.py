"""`megacoach label serve` as it runs in production, on 127.0.0.1: several worker processes share the
labeling (no label doubled or lost), slow clients are cut off by the header and body timeouts, and a
`kill -9` of the server under load loses no acknowledged label."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

from test_app_support import FAST, PASSWORD, add_items, csrf_of, make_person, make_store, server_in_thread

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(db_url: str, workers: int = 1, settings: Optional[dict] = None,
            **options) -> Iterator[tuple[str, subprocess.Popen]]:
    """`serve(...)` in a child process (its own process group) on a free port; yields (base URL, process)."""
    from megacoach.app.server import wait_until_healthy

    port = _free_port()
    opts = ", ".join(f"{k}={v!r}" for k, v in dict(options, workers=workers).items())
    code = ("from megacoach.app.server import ServerOptions, serve\n"
            f"serve({db_url!r}, '127.0.0.1', {port}, {dict(FAST, lock_timeout_s=600, **(settings or {}))!r}, "
            f"server=ServerOptions({opts}), log_level='warning')\n")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, 60, proc)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # pragma: no cover
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _worker_pids(proc: subprocess.Popen, n: int) -> list[int]:
    import psutil

    deadline = time.monotonic() + 30
    while True:
        kids = [p.pid for p in psutil.Process(proc.pid).children()  # the workers, not the resource tracker
                if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline())]
        if len(kids) >= n or time.monotonic() > deadline:
            return kids
        time.sleep(0.1)


def _served_by(pids: list[int], port: int) -> dict[int, int]:
    """Established connections on the port, per worker process."""
    import psutil

    out = {}
    for pid in pids:
        conns = psutil.Process(pid).net_connections(kind="tcp")
        out[pid] = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
    return out


def _login(base: str, name: str) -> tuple[httpx.Client, dict]:
    c = httpx.Client(base_url=base, timeout=30)
    page = c.get("/login")
    r = c.post("/login", data=dict(name=name, password=PASSWORD, csrf_token=csrf_of(page.text)))
    assert r.status_code in (200, 303), r.text
    return c, {"x-csrf-token": c.get("/api/me").json()["csrf_token"]}


def _label_until_done(clients: list[tuple[httpx.Client, dict]], stop: Optional[threading.Event] = None,
                      per_label: Optional[threading.Event] = None) -> tuple[list[int], list[str]]:
    """Every client labels (next -> label) until nothing is left or ``stop`` is set; returns the
    acknowledged comparison ids and the errors (other than a stopped server)."""
    created: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def labeler(idx: int, c: httpx.Client, headers: dict) -> None:
        n = 0
        while not (stop and stop.is_set()):
            try:
                r = c.post("/api/next", headers=headers)
                if r.status_code != 200:
                    errors.append(f"next {r.status_code} {r.text[:200]}")
                    return
                item = r.json()["item"]
                if item is None:
                    return
                r = c.post("/api/labels", json=dict(item_id=item["item_id"], choice=1 + (idx + n) % item["k"]),
                           headers=headers)
            except httpx.HTTPError:
                if stop is not None:  # the server was killed: this label was never acknowledged
                    return
                raise
            n += 1
            with lock:
                if r.status_code == 201:
                    created.append(r.json()["comparison_id"])
                    if per_label is not None:
                        per_label.set()
                else:
                    errors.append(f"label {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=labeler, args=(i, c, h)) for i, (c, h) in enumerate(clients)]
    [t.start() for t in threads]
    [t.join(timeout=180) for t in threads]
    assert not any(t.is_alive() for t in threads)
    return created, errors


def _two_workers_share_the_labeling(store, db_url: str) -> None:
    people = [f"p{i:02d}" for i in range(12)]
    for name in people:
        make_person(store, name)
    ordinary = add_items(store, 60, batch="load")
    calibration = add_items(store, 2, batch="cal", calibration=True)
    store.close()
    with serving(db_url, workers=2) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        pids = _worker_pids(proc, 2)
        assert len(pids) == 2, pids
        clients = [_login(base, name) for name in people]
        extra = []  # the kernel hands connections to either worker: open more until both hold some
        while min(_served_by(pids, port).values()) == 0 and len(extra) < 64:
            c = httpx.Client(base_url=base, timeout=30)
            c.get("/api/health")
            extra.append(c)
        by_worker = _served_by(pids, port)
        assert min(by_worker.values()) > 0, by_worker
        for c in extra:
            c.close()
        created, errors = _label_until_done(clients)
        for c, _ in clients:
            c.close()
    assert not errors, errors[:5]
    from megacoach.labels.store import LabelStore

    with LabelStore(db_url) as check:
        labels = check.comparisons()
    assert sorted(created) == sorted(c.id for c in labels)  # nothing lost, nothing unacknowledged
    assert len({(c.item_id, c.labeler_id) for c in labels}) == len(labels)  # nothing doubled
    per_item = Counter(c.item_id for c in labels)
    assert all(per_item[i] == 1 for i in ordinary)
    assert all(per_item[i] == len(people) for i in calibration)


def test_two_workers_serve_labels_without_duplicates(tmp_path):
    store = make_store(tmp_path)
    _two_workers_share_the_labeling(store, store.url)


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("MEGACOACH_TEST_PG_URL"),
                    reason="set MEGACOACH_TEST_PG_URL to a disposable PostgreSQL database")
def test_two_workers_on_postgresql_serve_labels_without_duplicates():
    from sqlalchemy import create_engine, text

    from megacoach.labels.store import LabelStore

    url = os.environ["MEGACOACH_TEST_PG_URL"]
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    _two_workers_share_the_labeling(LabelStore(url), url)


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_under_load_loses_no_acknowledged_label(tmp_path, workers):
    """SIGKILL to the server (every process of it) while labelers submit: every label the server
    answered 201 for is in the store afterwards, once, and the store opens and serves again."""
    store = make_store(tmp_path)
    people = [f"p{i:02d}" for i in range(8)]
    for name in people:
        make_person(store, name)
    add_items(store, 2000, batch="load")
    store.close()
    stop, some = threading.Event(), threading.Event()
    result: dict = {}
    with serving(store.url, workers=workers) as (base, proc):
        clients = [_login(base, name) for name in people]
        t = threading.Thread(target=lambda: result.update(zip(("created", "errors"),
                                                               _label_until_done(clients, stop, some))))
        t.start()
        assert some.wait(60)
        time.sleep(1.0)  # labels in flight
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        t.join(timeout=60)
        for c, _ in clients:
            c.close()
    created = result["created"]
    assert len(created) > 20 and not result["errors"], (len(created), result["errors"][:3])
    from megacoach.labels.store import LabelStore

    with LabelStore(store.url) as after:
        stored = [c.id for c in after.comparisons()]
        assert set(created) <= set(stored)  # acknowledged -> durable
        assert len(stored) == len(set(stored)) == len({(c.item_id, c.labeler_id) for c in after.comparisons()})
        assert len(stored) - len(created) <= len(people)  # at most one committed-but-unanswered per labeler
    with serving(store.url) as (base, _):  # and it serves again
        c, h = _login(base, people[0])
        assert c.post("/api/next", headers=h).json()["item"] is not None
        c.close()


# ----- slow clients ----------------------------------------------------------------------------------

@contextmanager
def timed_server(tmp_path, settings: Optional[dict] = None, **options) -> Iterator[int]:
    """The app with serve()'s uvicorn config (ServerConfig: the app's HTTP limits) in a thread; yields the port."""
    from megacoach.app.server import ServerConfig, ServerOptions
    from megacoach.app.settings import AppSettings

    from megacoach.labels.store import LabelStore

    opts = ServerOptions(**options)
    app_settings = AppSettings(**dict(FAST, **(settings or {})))
    store = LabelStore(make_store(tmp_path).url, pool_size=opts.pool_size(app_settings))
    make_person(store, "alice")
    config = ServerConfig(store.url, app_settings, opts, log_level="warning", lifespan="off")
    config.store = store
    with server_in_thread(config) as port:
        yield port


def _one_response(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    """One whole HTTP response (its head, then content-length bytes of body): the head and the body may come in
    separate segments (the server sets TCP_NODELAY)."""
    sock.settimeout(limit_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the connection closed mid-response ({data[:80]!r})"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, f"the connection closed mid-body ({data[:80]!r})"
        body += chunk
    assert len(body) == length, "more bytes than the response holds"
    return head + b"\r\n\r\n" + body


def _until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection; and how long that took."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {limit_s} s (sent {data[:80]!r})")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def test_slow_headers_are_cut_off_at_the_header_timeout(tmp_path):
    with timed_server(tmp_path, settings=dict(header_timeout_s=1.0, keep_alive_timeout_s=30.0)) as port:
        # a partial request line, then nothing
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /api/hea")
            data, took = _until_closed(s, 6)
        assert data.startswith(b"HTTP/1.1 408") and 0.8 <= took <= 4, (data[:60], took)
        # connect and send nothing
        with socket.create_connection(("127.0.0.1", port)) as s:
            data, took = _until_closed(s, 6)
        assert data.startswith(b"HTTP/1.1 408") and took <= 4
        # headers trickled a byte at a time: the clock does not restart per byte
        with socket.create_connection(("127.0.0.1", port)) as s:
            t0 = time.monotonic()
            try:
                for ch in b"GET /api/health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: " + b"a" * 200:
                    s.sendall(bytes([ch]))
                    time.sleep(0.05)
                pytest.fail("the server read trickled headers for longer than the timeout")
            except OSError:
                pass
            assert time.monotonic() - t0 <= 4
        # after a complete request on a keep-alive connection, the next one gets the same deadline
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /api/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            assert _one_response(s).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /api/he")
            data, took = _until_closed(s, 6)
        assert data.startswith(b"HTTP/1.1 408") and took <= 4
        # a well-behaved client is served as usual (and a slow *handler* is not cut off)
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200


def test_slow_body_is_cut_off_at_the_body_timeout(tmp_path):
    with timed_server(tmp_path, settings=dict(header_timeout_s=5.0, body_timeout_s=1.0)) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /api/labels HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                      b"content-length: 40\r\n\r\n{\"item_id\": ")
            data, took = _until_closed(s, 6)
        assert data.startswith(b"HTTP/1.1 408") and b"connection: close" in data.lower() and took <= 4, data[:200]
        r = httpx.post(f"http://127.0.0.1:{port}/api/labels", json=dict(item_id=1, choice=1), timeout=5)
        assert r.status_code == 401  # a complete body reaches the app as before


def _spray(port: int, n: int) -> Counter:
    """n clients post a wrong password at once; the answers' status codes."""
    def one(i: int, out: list) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            page = c.get("/login")
            out.append(c.post("/login", data=dict(name=f"nobody{i}", password="wrong-wrong-wrong",
                                                  csrf_token=csrf_of(page.text))).status_code)

    codes: list[int] = []
    threads = [threading.Thread(target=one, args=(i, codes)) for i in range(n)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    return Counter(codes)


def test_password_checks_are_gated_and_cannot_exhaust_the_store(tmp_path):
    """More simultaneous log-ins than request threads, under serve()'s config: they wait for a password
    check slot (none fails for want of a thread or a store connection); beyond the queue they get 503
    while the labelers' requests are answered."""
    slow = dict(argon2_time_cost=2, argon2_memory_kib=32 * 1024)  # ~0.05-0.1 s per check
    with timed_server(tmp_path, settings=dict(slow, password_hash_concurrency=1, password_hash_queue=64),
                      threads=4) as port:
        assert _spray(port, 12) == Counter({401: 12})
    (tmp_path / "b").mkdir()
    with timed_server(tmp_path / "b", settings=dict(slow, password_hash_concurrency=1, password_hash_queue=0),
                      threads=4) as port:
        codes = _spray(port, 8)
        assert codes[503] >= 1 and codes[401] >= 1 and set(codes) <= {401, 503}, codes
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200


def test_workers_share_the_password_check_bounds():
    """--workers N does not multiply the password checks at once: each worker gets its share."""
    from megacoach.app.server import worker_settings
    from megacoach.app.settings import AppSettings

    cfg = AppSettings(password_hash_concurrency=4, password_hash_queue=64)
    assert worker_settings(cfg, 1) is cfg
    two = worker_settings(cfg, 2)
    assert (two.password_hash_concurrency, two.password_hash_queue) == (2, 32)
    eight = worker_settings(cfg, 8)
    assert (eight.password_hash_concurrency, eight.password_hash_queue) == (1, 8)  # at least one each
    assert eight.argon2_time_cost == cfg.argon2_time_cost  # nothing else changes


def test_server_options_are_checked():
    from megacoach.app.server import ServerOptions
    from megacoach.errors import ConfigError

    with pytest.raises(ConfigError, match="workers"):
        ServerOptions(workers=0)
    with pytest.raises(ConfigError, match="threads"):
        ServerOptions(threads=0)


def test_wait_until_healthy_says_why_no_server_answers():
    """The wait for a started server's health check ends with the reason: its process exited, or the
    time ran out."""
    from megacoach.app.server import wait_until_healthy

    base = f"http://127.0.0.1:{_free_port()}"  # nobody listens there
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait(timeout=30)
    with pytest.raises(RuntimeError, match=r"exited \(code 3\) before it answered /api/health"):
        wait_until_healthy(base, 30, dead)
    with pytest.raises(RuntimeError, match="did not answer /api/health within 0.3 s"):
        wait_until_healthy(base, 0.3)


def test_workers_listen_on_a_tcp_socket_so_answers_are_not_delayed():
    """With --workers the socket is made here: protocol IPPROTO_TCP, so asyncio sets TCP_NODELAY on its
    connections (uvicorn's own socket has protocol 0: every request that followed an answer on a
    keep-alive connection waited ~40 ms for a delayed ACK)."""
    from megacoach.app.server import bind_tcp_socket

    sock = bind_tcp_socket("127.0.0.1", 0)
    try:
        sock.listen()
        assert sock.proto == socket.IPPROTO_TCP
        with socket.create_connection(sock.getsockname()) as client:
            conn, _ = sock.accept()
            with conn:
                assert conn.proto == socket.IPPROTO_TCP  # what asyncio checks before setting TCP_NODELAY
    finally:
        sock.close()


# ----- state shared by the workers -----------------------------------------------------------------------

def _attempt(client, name: str, password: str):
    page = client.get("/login")
    return client.post("/login", data=dict(name=name, password=password, csrf_token=csrf_of(page.text)),
                       follow_redirects=False)


def test_login_throttle_counts_a_clients_failures_across_processes(tmp_path):
    """Two app instances on one store (as two workers are): a client's failures at one slow that
    client down at the other too, and never the account: the right password from another address gets
    in at both."""
    from fastapi.testclient import TestClient

    from megacoach.app.server import create_app
    from megacoach.labels.store import LabelStore

    store = make_store(tmp_path)
    make_person(store, "alice")
    settings = dict(FAST, login_free_failures=3)
    apps = [create_app(settings=settings, store=store), create_app(settings=settings, store=LabelStore(store.url))]
    attacker = [TestClient(app, client=("203.0.113.66", 50000)) for app in apps]
    for c in (attacker[0], attacker[1], attacker[0]):
        assert _attempt(c, "Alice", "wrong-wrong-wrong").status_code == 401
    for c in attacker:  # the third failure started the backoff, whichever worker saw it
        r = _attempt(c, "alice", PASSWORD)
        assert r.status_code == 429 and "too many failed log-ins" in r.text and int(r.headers["retry-after"]) >= 1
    for app in apps:  # no account lock: alice, from her own address, logs in at either worker
        r = _attempt(TestClient(app, client=("198.51.100.7", 50000)), "alice", PASSWORD)
        assert r.status_code == 303, r.text
    # the counts live in the store, keyed by hashes of the address (and name), never by the account alone
    with store.engine.connect() as conn:
        from sqlalchemy import text

        rows = conn.execute(text("SELECT key, kind, failures FROM login_failures")).all()
    assert sorted((kind, n) for _, kind, n in rows) == [("client", 3), ("pair", 3)]
    assert all(len(key) == 64 and "203.0.113.66" not in key for key, _, _ in rows)


def test_store_throttle_keeps_the_in_memory_rule(tmp_path):
    """StoreFailureTable answers as FailureTable does, failure for failure (the same doubling wait,
    bounded, forgotten after forget_s), and a spray of other clients does not make it forget the one
    in backoff; its rows stay bounded."""
    from megacoach.app.settings import AppSettings
    from megacoach.app.throttle import FailureTable, StoreFailureTable, StoreLoginThrottle

    store = make_store(tmp_path)
    mem = FailureTable(free=2, backoff_s=1.0, max_s=8.0, forget_s=3600, max_entries=100)
    db = StoreFailureTable(store, "client", free=2, backoff_s=1.0, max_s=8.0, forget_s=3600, max_entries=100)
    for i in range(7):
        now = 1_000_000.0 + i * 100
        mem.fail("k", now=now)
        db.fail("k", now=now)
        for later in (0.0, 0.5, 3.0, 9.0):
            assert db.wait("k", now=now + later) == mem.wait("k", now=now + later)
    assert db.wait("k", now=1_000_000.0 + 600 + 3599) == mem.wait("k", now=1_000_000.0 + 600 + 3599) == 0.0
    db.fail("k", now=1_000_000.0 + 600 + 3601)  # a failure after forget_s starts the count again
    assert db.wait("k", now=1_000_000.0 + 600 + 3601) == 0.0
    assert db.refusal("k") == 0  # not in backoff: nothing to refuse

    th = StoreLoginThrottle(store, AppSettings(**FAST, login_free_failures=3, login_throttle_entries=100))
    for _ in range(10):  # deep in backoff: 2**7 s
        th.fail("203.0.113.66", "root")
    assert th.retry_after("203.0.113.66", "root") >= 100
    assert th.refusal("203.0.113.66", "root") == 1 and th.refusal("203.0.113.66", "root") == 2
    for i in range(1500):
        th.fail(f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert th.retry_after("203.0.113.66", "root") > 0  # still slowed down
    assert th.size() <= 2 * (100 + th.by_pair.prune_every)  # bounded rows (two tables)
    th.success("203.0.113.66", "root")  # the right password: this client's failures for root are forgotten
    assert th.retry_after("203.0.113.66", "root") == 0


def _wipe_postgresql(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[
    pytest.mark.postgres, pytest.mark.skipif(not os.environ.get("MEGACOACH_TEST_PG_URL"),
                                             reason="set MEGACOACH_TEST_PG_URL to a disposable PostgreSQL database")])])
def shared_store(request, tmp_path):
    """A fresh label store on SQLite, or on the PostgreSQL database MEGACOACH_TEST_PG_URL (wiped first)."""
    from megacoach.labels.store import LabelStore

    if request.param == "sqlite":
        store = make_store(tmp_path)
    else:
        _wipe_postgresql(os.environ["MEGACOACH_TEST_PG_URL"])
        store = LabelStore(os.environ["MEGACOACH_TEST_PG_URL"])
    yield store
    store.close()


def test_andon_rate_limit_counts_across_processes(shared_store):
    """Two app instances on one store (as two workers are): one person at one address gets
    andon_rate_per_min requests a minute in all, whichever worker answers; beyond that 429 with
    Retry-After at both, and the first refusal is audited once. Another person at that address, and
    the same person elsewhere, still pull at once."""
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    from megacoach.app.server import create_app
    from megacoach.labels.store import LabelStore

    store = shared_store
    for name in ("alice", "bob"):
        make_person(store, name)
    store.set_run_status("run-1", "running")
    settings = dict(FAST, andon_pulls_to_pause=3, andon_rate_per_min=4)
    other = LabelStore(store.url)
    apps = [create_app(settings=settings, store=store), create_app(settings=settings, store=other)]

    def pull(app, who: str, client: str = "203.0.113.7"):
        headers = {"authorization": f"Bearer {tokens[who]}"}
        return TestClient(app, client=(client, 50000)).post("/api/andon", json=dict(reason="gibberish"),
                                                            headers=headers)

    from test_app_support import make_token

    tokens = {name: make_token(store, name) for name in ("alice", "bob")}
    codes = [pull(apps[i % 2], "alice").status_code for i in range(10)]
    assert codes == [201, 200, 200, 200] + [429] * 6  # 4 a minute in all, not 4 per worker
    for app in apps:
        r = pull(app, "alice")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert len(store.audit_entries(action="andon_rate_limited")) == 1  # refused at both, audited once
    assert len(store.andon_pulls("run-1")) == 1
    assert pull(apps[1], "bob").status_code == 201  # another person at that address: instant
    assert pull(apps[0], "alice", client="198.51.100.3").status_code == 200  # alice from elsewhere: counted once
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT key, kind FROM rate_limits")).all()
    assert len(rows) == 3 and {kind for _, kind in rows} == {"andon"}
    assert all(len(key) == 64 and "203.0.113.7" not in key for key, _ in rows)
    other.close()


def test_store_rate_limit_keeps_the_in_memory_rule(shared_store):
    """StoreRateLimit answers as RateLimit does, event for event (the same sliding window, the same
    Retry-After, the first refusal of a window noted once); two instances together let through at most
    the limit, also when they race for the last slot; its rows stay bounded."""
    from megacoach.app.throttle import RateLimit, StoreRateLimit

    store = shared_store
    mem = RateLimit(3, 60.0)
    db = [StoreRateLimit(store, "andon", 3, 60.0), StoreRateLimit(store, "andon", 3, 60.0)]
    t0 = 1_000_000.0
    for i, dt in enumerate((0.0, 1.0, 2.5, 3.0, 30.0, 59.9, 60.0, 60.5, 61.0, 62.4, 63.0, 121.0, 200.0)):
        key = ("203.0.113.7", 1)
        want = mem.hit(key, now=t0 + dt)
        assert db[i % 2].hit(key, now=t0 + dt) == want, dt
        if want:
            assert db[(i + 1) % 2].note_refusal(key, now=t0 + dt) == mem.note_refusal(key, now=t0 + dt), dt

    def race(key: tuple, now: float) -> list[int]:
        answers: list[int] = []
        start = threading.Barrier(8)

        def one(i: int) -> None:
            start.wait()
            answers.append(db[i % 2].hit(key, now=now))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]
        return answers

    got = race(("203.0.113.8", 2), t0 + 300)
    assert len(got) == 8 and got.count(0) == 3 and all(w == 60 for w in got if w)
    noted = []
    start = threading.Barrier(6)

    def note(i: int) -> None:
        start.wait()
        noted.append(db[i % 2].note_refusal(("203.0.113.8", 2), now=t0 + 301))

    threads = [threading.Thread(target=note, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert sorted(noted) == [False] * 5 + [True]

    small = StoreRateLimit(store, "andon", 3, 60.0, max_keys=200)
    for i in range(600):  # a spray of keys within one minute: the least recently used go
        assert small.hit((f"10.0.{i // 256}.{i % 256}", i), now=t0 + 1000 + i * 0.01) == 0
    assert len(small) <= 200 + small.prune_every
    for i in range(small.prune_every):  # a minute later the rows of the spray hold nothing and go
        small.hit(("192.0.2.1", i), now=t0 + 1100)
    assert len(small) <= small.prune_every


def test_login_refusals_are_audited_once_across_processes(shared_store):
    """A throttled client's first refused try after a failure is audited once, whichever worker
    refuses it and however many refuse it; the next failure starts a new count."""
    from fastapi.testclient import TestClient

    from megacoach.app.server import create_app
    from megacoach.app.settings import AppSettings
    from megacoach.app.throttle import StoreLoginThrottle
    from megacoach.labels.store import LabelStore

    store = shared_store
    make_person(store, "alice")
    settings = dict(FAST, login_free_failures=3, login_backoff_s=60)
    other = LabelStore(store.url)
    apps = [create_app(settings=settings, store=store), create_app(settings=settings, store=other)]
    attacker = [TestClient(app, client=("203.0.113.66", 50000)) for app in apps]
    for c in (attacker[0], attacker[1], attacker[0]):
        assert _attempt(c, "alice", "wrong-wrong-wrong").status_code == 401
    for c in attacker * 3:
        assert _attempt(c, "alice", PASSWORD).status_code == 429
    assert len(store.audit_entries(action="login_failed")) == 3 + 1  # the failures, and one refusal

    th = [StoreLoginThrottle(store, AppSettings(**FAST, login_free_failures=1)) for _ in range(2)]
    th[0].fail("203.0.113.9", "root")
    assert [th[1].refusal("203.0.113.9", "root"), th[0].refusal("203.0.113.9", "root")] == [1, 2]
    th[0].fail("203.0.113.9", "root")  # a new failure: its first refusal is worth an entry again
    assert [th[0].refusal("203.0.113.9", "root"), th[1].refusal("203.0.113.9", "root")] == [1, 2]
    assert th[1].refusal("192.0.2.1", "root") == 0  # no failures: nothing to refuse
    other.close()


def test_password_checks_hold_no_store_connection(tmp_path):
    """A log-in's password hash is computed outside any store session: no connection of the store is
    checked out while argon2 runs (right or wrong password, known or unknown name)."""
    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from megacoach.app.server import create_app

    store = make_store(tmp_path)
    make_person(store, "alice")
    app = create_app(settings=FAST, store=store)
    auth = app.state.mc.auth
    engines = {id(e): e for e in (store.engine, store._write_engine)}.values()
    out = {"n": 0}
    seen: list[int] = []
    lock = threading.Lock()

    def checkout(*_):
        with lock:
            out["n"] += 1

    def checkin(*_):
        with lock:
            out["n"] -= 1

    for e in engines:
        event.listen(e, "checkout", checkout)
        event.listen(e, "checkin", checkin)
    real = auth.passwords.hasher

    class Watching:
        def verify(self, *a):
            seen.append(out["n"])
            return real.verify(*a)

        def __getattr__(self, name):
            return getattr(real, name)

    auth.passwords.hasher = Watching()
    c = TestClient(app, client=("192.0.2.9", 50000))
    assert _attempt(c, "alice", "wrong-wrong-wrong").status_code == 401
    assert _attempt(c, "nobody-here", "wrong-wrong-wrong").status_code == 401
    assert _attempt(c, "alice", PASSWORD).status_code == 303
    assert seen == [0, 0, 0], seen
