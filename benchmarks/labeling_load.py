"""Load test of the labeling app: N concurrent simulated human evaluators against a local server.

    .venv/bin/python benchmarks/labeling_load.py                 # 50 labelers, <= 3000 items, <= 30 s
    .venv/bin/python benchmarks/labeling_load.py --labelers 50 --items 3000 --seconds 30
    .venv/bin/python benchmarks/labeling_load.py --think-s 2     # each labeler pauses ~2 s per label
    .venv/bin/python benchmarks/labeling_load.py --workers 2     # `megacoach label serve --workers 2`
    .venv/bin/python benchmarks/labeling_load.py --db postgresql+psycopg://postgres@127.0.0.1:54329/postgres
    .venv/bin/python benchmarks/labeling_load.py --spray 16      # 16 clients spray wrong passwords beside them
    .venv/bin/python benchmarks/labeling_load.py --argon2 default  # the app's real password-hash costs
    .venv/bin/python benchmarks/labeling_load.py --login-concurrency 1  # serve --login-concurrency 1

The server is what `megacoach label serve` runs (``serve()`` with ``ServerOptions``: ``--workers``
processes of ``--threads`` threads) in a child process on 127.0.0.1, over a fresh label store: a SQLite
file in a temporary folder, or, with ``--db``, a new database created on that PostgreSQL server for the
run and dropped afterwards (the URL's own database is only used to connect). Each simulated labeler
is a thread with its own browser-like session (log-in, session cookie, CSRF header) that loops POST
/api/next -> POST /api/labels until the items run out or the time is up: with no pause by default (the
server's saturation throughput), or ``--think-s`` (a human-like pause, uniform in 0.5..1.5 x think-s,
between labels; the labelers' starts are then spread over one think-s). ``--spray N`` adds N clients that
post wrong passwords to /login for names that do not exist, as fast as they are answered, each attempt on a
new connection. The labelers come from 127.0.0.1, the sprayers from other loopback addresses:
``--spray-from rotate`` (the default) gives every attempt a new address (127.1.x.y), so the per-client
throttle never trips and every attempt costs the server a password check (the worst case: a spray from
many machines); ``--spray-from fixed`` gives each sprayer one address of its own (127.2.0.i), which the
throttle slows down after its free failures.

Password hashing: the labelers log in before the clock starts. ``--argon2 bench`` (the default) uses
``BENCH_SETTINGS``' cheap argon2 costs; ``--argon2 default`` the app's defaults, which is what a
password sprayer makes the server pay per attempt.

Prints one JSON line: labels per second; latency percentiles (ms) of the label submissions, of
/api/next and of a whole cycle; errors; the spray's attempts per second and answers; a check that no
label was lost (acknowledged with 201 but not stored), unexpected (stored but not acknowledged) or
doubled; the server settings; the CPU seconds the server and this client used; and the machine (CPU
count, the CPUs this process may use, the CPU model, the load average before and after). Every loop is bounded by
``--seconds`` (and the item count); all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_SETTINGS = dict(argon2_time_cost=1, argon2_memory_kib=8 * 1024, too_fast_s=0.0, lock_timeout_s=600,
                      session_idle_s=3600)
ARGON2_KEYS = ("argon2_time_cost", "argon2_memory_kib", "argon2_parallelism")
PASSWORD = "load-test-password-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(argon2: str) -> dict:
    if argon2 == "bench":
        return dict(BENCH_SETTINGS)
    return {k: v for k, v in BENCH_SETTINGS.items() if k not in ARGON2_KEYS}  # the app's own argon2 costs


def _seed(db_url: str, labelers: int, items: int, settings: dict) -> None:
    from megacoach.app.security import Passwords
    from megacoach.app.settings import AppSettings
    from megacoach.labels.records import NewSample
    from megacoach.labels.store import LabelStore

    with LabelStore(db_url) as store:
        pw = Passwords.from_settings(AppSettings(**settings)).hash(PASSWORD)
        for i in range(labelers):
            store.get_or_create_labeler(f"evaluator{i:03d}", kind="person", role="labeler", password_hash=pw)
        store.set_guideline("1", "# Pick the best continuation")
        specs = [dict(query_text=f"Query {i}: Now is the winter of our discontent", query_token_ids=[1, 2, 3],
                      batch=f"b{i // 500}", source="online",
                      samples=[NewSample(f"continuation {i}.{j} made glorious summer", [4, 5, 6 + j], policy="ckpt",
                                         iteration=1) for j in range(4)]) for i in range(items)]
        for start in range(0, len(specs), 1000):
            store.create_items(specs[start : start + 1000])


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, int(q * len(v) + 0.999999) - 1))] * 1000.0, 2)


class _Store:
    """The run's label store: a SQLite file in a temporary folder, or a new PostgreSQL database."""

    def __init__(self, db: str | None) -> None:
        self.admin_url = None
        if db is None:
            self.url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='megacoach-load-')) / 'labels.db'}"
            self.kind = "sqlite"
            return
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        base = make_url(db)
        if base.get_backend_name() != "postgresql":
            raise SystemExit("--db: expected a postgresql+psycopg:// URL (SQLite is the default)")
        if base.host not in (None, "127.0.0.1", "localhost", "::1"):
            raise SystemExit("--db: this benchmark only talks to a server on 127.0.0.1")
        self.name = f"megacoach_load_{os.getpid()}_{int(time.time())}"
        self.admin_url = base
        engine = create_engine(base, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.name}"'))
        engine.dispose()
        self.url = base.set(database=self.name).render_as_string(hide_password=False)
        self.kind = "postgresql"

    def drop(self) -> None:
        if self.admin_url is None:
            return
        from sqlalchemy import create_engine, text

        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        engine.dispose()


def _start_server(db_url: str, port: int, settings: dict, workers: int, threads: int) -> subprocess.Popen:
    code = ("from megacoach.app.server import ServerOptions, serve\n"
            f"serve({db_url!r}, '127.0.0.1', {port}, {settings!r}, "
            f"server=ServerOptions(workers={workers}, threads={threads}), log_level='warning')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the server's workers)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _machine(load_before: tuple[float, ...]) -> dict:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(cpu_count=os.cpu_count(), nproc=nproc, cpu_model=_cpu_model(),
                loadavg_before=[round(x, 2) for x in load_before],
                loadavg_after=[round(x, 2) for x in os.getloadavg()], python=platform.python_version(),
                system=platform.system())


def _raw_login(port: int, address: str, cookie: str, token: str, name: str, password: str) -> int:
    """POST /login from ``address`` on a new connection (closed after the answer); the status code, 0
    when the connection failed. Plain sockets: a client per address would cost this machine more than
    the request."""
    from urllib.parse import urlencode

    body = urlencode(dict(name=name, password=password, csrf_token=token)).encode()
    head = (f"POST /login HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncookie: {cookie}\r\n"
            f"content-type: application/x-www-form-urlencoded\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(address, 0)) as s:
            s.sendall(head + body)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return 0


def run(labelers: int, items: int, seconds: float, think_s: float = 0.0, *, workers: int = 1, threads: int = 16,
        db: str | None = None, spray: int = 0, argon2: str = "bench", spray_from: str = "rotate",
        login_concurrency: int | None = None) -> dict:
    import httpx

    from megacoach.app.server import wait_until_healthy
    from megacoach.labels.store import LabelStore

    load_before = os.getloadavg()
    settings = _settings(argon2)
    if login_concurrency is not None:  # serve --login-concurrency (the whole server's, split over the workers)
        settings["password_hash_concurrency"] = login_concurrency
    store = _Store(db)
    proc = None
    try:
        _seed(store.url, labelers, items, settings)
        port = _free_port()
        proc = _start_server(store.url, port, settings, workers, threads)
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base, 90, proc)

        clients = []
        for i in range(labelers):
            c = httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=2))
            page = c.get("/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            r = c.post("/login", data=dict(name=f"evaluator{i:03d}", password=PASSWORD, csrf_token=token))
            if r.status_code not in (200, 303):
                raise RuntimeError(f"log-in failed: {r.status_code} {r.text[:200]}")
            clients.append((c, {"x-csrf-token": c.get("/api/me").json()["csrf_token"]}))
        sprayers = []
        for i in range(spray):
            with httpx.Client(base_url=base, timeout=60) as c:
                page = c.get("/login")
                cookie = "; ".join(f"{k}={v}" for k, v in c.cookies.items())
            sprayers.append((cookie, re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)))

        submit_s: list[float] = []
        next_s: list[float] = []
        spray_s: list[float] = []
        spray_codes: dict[int, int] = {}
        created: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(labelers + spray + 1)
        stop_at = [0.0]
        labelers_done = threading.Event()

        def labeler(idx: int, c, headers: dict) -> None:
            barrier.wait()
            if think_s > 0:  # people do not all click at the same instant: starts spread over one pause
                time.sleep(think_s * idx / labelers)
            n = 0
            while time.monotonic() < stop_at[0]:
                t0 = time.perf_counter()
                r = c.post("/api/next", headers=headers)
                t1 = time.perf_counter()
                if r.status_code != 200:
                    with lock:
                        errors.append(f"next {r.status_code}")
                    return
                item = r.json()["item"]
                if item is None:
                    with lock:
                        next_s.append(t1 - t0)
                    return
                body = dict(item_id=item["item_id"], choice=1 + (idx + n) % item["k"], time_taken_s=6.0)
                r = c.post("/api/labels", json=body, headers=headers)
                t2 = time.perf_counter()
                n += 1
                with lock:
                    next_s.append(t1 - t0)
                    submit_s.append(t2 - t1)
                    if r.status_code == 201:
                        created.append(r.json()["comparison_id"])
                    else:
                        errors.append(f"label {r.status_code} {r.text[:120]}")
                if think_s > 0:
                    pause = think_s * (0.5 + ((idx * 7919 + n * 104729) % 1000) / 1000.0)
                    time.sleep(max(0.0, min(pause, stop_at[0] - time.monotonic())))

        def sprayer(idx: int, cookie: str, token: str) -> None:
            barrier.wait()
            n = 0
            while time.monotonic() < stop_at[0] and not labelers_done.is_set():
                if spray_from == "rotate":  # a new address for every attempt: the throttle never trips
                    j = idx * 1_000_003 + n
                    address = f"127.1.{(j // 254) % 254 + 1}.{j % 254 + 1}"
                else:  # one address per sprayer
                    address = f"127.2.0.{idx + 1}"
                t0 = time.perf_counter()
                code = _raw_login(port, address, cookie, token, f"nobody{idx:02d}x{n:06d}", "wrong-password-0")
                n += 1
                with lock:
                    spray_s.append(time.perf_counter() - t0)
                    spray_codes[code] = spray_codes.get(code, 0) + 1

        threads_ = [threading.Thread(target=labeler, args=(i, c, h), daemon=True) for i, (c, h) in enumerate(clients)]
        spray_threads = [threading.Thread(target=sprayer, args=(i, c, t), daemon=True)
                         for i, (c, t) in enumerate(sprayers)]
        for t in threads_ + spray_threads:
            t.start()
        stop_at[0] = time.monotonic() + seconds
        server_cpu0, client_cpu0 = _cpu_seconds(proc.pid), sum(os.times()[:2])
        barrier.wait()
        start = time.perf_counter()
        for t in threads_:
            t.join(timeout=seconds + 120)
        elapsed = time.perf_counter() - start
        labelers_done.set()
        for t in spray_threads:
            t.join(timeout=120)
        spray_elapsed = time.perf_counter() - start
        server_cpu, client_cpu = _cpu_seconds(proc.pid) - server_cpu0, sum(os.times()[:2]) - client_cpu0
        for c, _ in clients:
            c.close()
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    try:
        with LabelStore(store.url) as s:
            labels = s.comparisons()
    finally:
        store.drop()
    stored = [c.id for c in labels]
    pairs = {(c.item_id, c.labeler_id) for c in labels}
    argon = {k: v for k, v in settings.items() if k in ARGON2_KEYS} or "app defaults"
    out = dict(
        benchmark="labeling_load", labelers=labelers, items=items, think_s=think_s, seconds=round(elapsed, 2),
        labels=len(created),
        labels_per_s=round(len(created) / elapsed, 1) if elapsed > 0 else None,
        submit_p50_ms=_pct(submit_s, 0.50), submit_p99_ms=_pct(submit_s, 0.99),
        next_p50_ms=_pct(next_s, 0.50), next_p99_ms=_pct(next_s, 0.99),
        cycle_p99_ms=_pct([a + b for a, b in zip(next_s, submit_s)], 0.99),
        errors=len(errors), first_error=errors[0] if errors else None,
        lost=len(set(created) - set(stored)), unexpected=len(set(stored) - set(created)),
        doubled=len(stored) - len(pairs),
        server=dict(workers=workers, threads=threads, db=store.kind, argon2=argon,
                    login_concurrency=settings.get("password_hash_concurrency", "default (2)"), spray_clients=spray,
                    spray_from=spray_from if spray else None),
        cpu_s=dict(server=round(server_cpu, 1), client=round(client_cpu, 1)),
        machine=_machine(load_before),
    )
    if spray:
        out["spray"] = dict(attempts=sum(spray_codes.values()),
                            per_s=round(sum(spray_codes.values()) / spray_elapsed, 1) if spray_elapsed > 0 else None,
                            p50_ms=_pct(spray_s, 0.5), p99_ms=_pct(spray_s, 0.99),
                            answers={str(k): v for k, v in sorted(spray_codes.items())})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labelers", type=int, default=50, help="concurrent simulated labelers (threads)")
    p.add_argument("--items", type=int, default=3000, help="items to label at most (one label each)")
    p.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    p.add_argument("--think-s", type=float, default=0.0, help="mean pause per label per labeler (0: flat out)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (serve --workers)")
    p.add_argument("--threads", type=int, default=16, help="threads per worker (serve --threads)")
    p.add_argument("--db", default=None, help="a PostgreSQL server on 127.0.0.1 to run on (a new database is "
                                              "created there and dropped); default: a temporary SQLite file")
    p.add_argument("--spray", type=int, default=0, help="clients posting wrong passwords to /login meanwhile")
    p.add_argument("--spray-from", choices=("rotate", "fixed"), default="rotate",
                   help="sprayers' addresses: a new one per attempt (the throttle never trips), or one each")
    p.add_argument("--login-concurrency", type=int, default=None,
                   help="password checks at once for the server (serve --login-concurrency; default the app's, 2)")
    p.add_argument("--argon2", choices=("bench", "default"), default="bench",
                   help="password-hash costs: BENCH_SETTINGS' cheap ones, or the app's defaults")
    a = p.parse_args(argv)
    if not (1 <= a.labelers <= 500 and 1 <= a.items <= 100_000 and 0 < a.seconds <= 600 and 0 <= a.think_s <= 60
            and 1 <= a.workers <= 16 and 1 <= a.threads <= 256 and 0 <= a.spray <= 200
            and (a.login_concurrency is None or 1 <= a.login_concurrency <= 64)):
        p.error("labelers 1..500, items 1..100000, seconds 0..600, think-s 0..60, workers 1..16, threads 1..256, "
                "spray 0..200, login-concurrency 1..64")
    print(json.dumps(run(a.labelers, a.items, a.seconds, a.think_s, workers=a.workers, threads=a.threads, db=a.db,
                         spray=a.spray, argon2=a.argon2, spray_from=a.spray_from,
                         login_concurrency=a.login_concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
