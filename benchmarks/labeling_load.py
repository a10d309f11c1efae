"""Load test of the labeling app: N concurrent simulated human evaluators against a local server.

    .venv/bin/python benchmarks/labeling_load.py                 # 50 labelers, <= 3000 items, <= 30 s
    .venv/bin/python benchmarks/labeling_load.py --labelers 50 --items 3000 --seconds 30
    .venv/bin/python benchmarks/labeling_load.py --think-s 2     # each labeler pauses 2 s per label

The server (uvicorn, one process, SQLite label store in a temporary folder) runs in a child
process on 127.0.0.1; each simulated labeler is a thread with its own browser-like session (log-in,
session cookie, CSRF header) that loops GET /api/next -> POST /api/labels until the items run out
or the time is up (with no pause by default: the server's saturation throughput; ``--think-s``
adds a human-like pause between labels). Prints one JSON line: labels per second, latency percentiles of the label
submissions (and of /api/next), errors, and a check that no label was lost or doubled.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_SETTINGS = dict(argon2_time_cost=1, argon2_memory_kib=8 * 1024, too_fast_s=0.0, lock_timeout_s=600,
                      session_idle_s=3600)
PASSWORD = "load-test-password-123"


def _serve(db_url: str, port: int) -> None:
    import logging

    import uvicorn

    from megacoach.app.server import create_app

    logging.getLogger("uvicorn.access").disabled = True
    uvicorn.run(create_app(db_url, BENCH_SETTINGS), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed(db_url: str, labelers: int, items: int) -> None:
    from megacoach.app.security import Passwords
    from megacoach.app.settings import AppSettings
    from megacoach.labels.records import NewSample
    from megacoach.labels.store import LabelStore

    with LabelStore(db_url) as store:
        pw = Passwords.from_settings(AppSettings(**BENCH_SETTINGS)).hash(PASSWORD)
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


def run(labelers: int, items: int, seconds: float, think_s: float = 0.0) -> dict:
    import httpx

    from megacoach.labels.store import LabelStore

    tmp = tempfile.mkdtemp(prefix="megacoach-load-")
    db_url = f"sqlite:///{Path(tmp) / 'labels.db'}"
    _seed(db_url, labelers, items)
    port = _free_port()
    proc = mp.get_context("spawn").Process(target=_serve, args=(db_url, port), daemon=True)
    proc.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError("the labeling server did not start")
            time.sleep(0.1)

        clients = []
        for i in range(labelers):
            c = httpx.Client(base_url=base, timeout=30, limits=httpx.Limits(max_connections=2))
            page = c.get("/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            r = c.post("/login", data=dict(name=f"evaluator{i:03d}", password=PASSWORD, csrf_token=token))
            if r.status_code not in (200, 303):
                raise RuntimeError(f"log-in failed: {r.status_code} {r.text[:200]}")
            clients.append((c, {"x-csrf-token": c.get("/api/me").json()["csrf_token"]}))

        submit_s: list[float] = []
        next_s: list[float] = []
        created: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(labelers + 1)
        stop_at = [0.0]

        def labeler(idx: int, c, headers: dict) -> None:
            barrier.wait()
            n = 0
            while time.monotonic() < stop_at[0]:
                t0 = time.perf_counter()
                r = c.get("/api/next", headers=headers)
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
                if think_s > 0:
                    time.sleep(think_s * (0.5 + ((idx * 7919 + n * 104729) % 1000) / 1000.0))
                with lock:
                    next_s.append(t1 - t0)
                    submit_s.append(t2 - t1)
                    if r.status_code == 201:
                        created.append(r.json()["comparison_id"])
                    else:
                        errors.append(f"label {r.status_code} {r.text[:120]}")

        threads = [threading.Thread(target=labeler, args=(i, c, h), daemon=True) for i, (c, h) in enumerate(clients)]
        for t in threads:
            t.start()
        stop_at[0] = time.monotonic() + seconds
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join(timeout=seconds + 60)
        elapsed = time.perf_counter() - start
        for c, _ in clients:
            c.close()
    finally:
        proc.terminate()
        proc.join(timeout=10)

    with LabelStore(db_url) as store:
        stored = [c.id for c in store.comparisons()]
        pairs = {(c.item_id, c.labeler_id) for c in store.comparisons()}
    lost = len(set(created) - set(stored))
    extra = len(set(stored) - set(created))
    return dict(
        benchmark="labeling_load", labelers=labelers, items=items, think_s=think_s, seconds=round(elapsed, 2),
        labels=len(created),
        labels_per_s=round(len(created) / elapsed, 1) if elapsed > 0 else None,
        submit_p50_ms=_pct(submit_s, 0.50), submit_p99_ms=_pct(submit_s, 0.99),
        next_p50_ms=_pct(next_s, 0.50), next_p99_ms=_pct(next_s, 0.99),
        cycle_p99_ms=_pct([a + b for a, b in zip(next_s, submit_s)], 0.99),
        errors=len(errors), first_error=errors[0] if errors else None,
        lost=lost, unexpected=extra, doubled=len(stored) - len(pairs), cpus=os.cpu_count(),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labelers", type=int, default=50, help="concurrent simulated labelers (threads)")
    p.add_argument("--items", type=int, default=3000, help="items to label at most (one label each)")
    p.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    p.add_argument("--think-s", type=float, default=0.0, help="mean pause per label per labeler (0: flat out)")
    a = p.parse_args(argv)
    if not (1 <= a.labelers <= 500 and 1 <= a.items <= 100_000 and 0 < a.seconds <= 600 and 0 <= a.think_s <= 60):
        p.error("labelers 1..500, items 1..100000, seconds 0..600, think-s 0..60")
    print(json.dumps(run(a.labelers, a.items, a.seconds, a.think_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
