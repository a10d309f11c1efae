"""Many simulated labelers label at once against a real uvicorn server on 127.0.0.1:
no label is lost, none is doubled, and overlap-1 items get exactly one label."""

from __future__ import annotations

import threading
from collections import Counter

import httpx

from test_app_support import (
    FAST,
    PASSWORD,
    add_items,
    csrf_of,
    live_server,
    make_person,
    make_store,
    make_token,
    take_next,
)

N_PEOPLE = 16
N_PROGRAMS = 4
N_ITEMS = 120
N_CALIBRATION = 3


def test_concurrent_labelers_no_label_lost_or_doubled(tmp_path):
    from megacoach.app.server import create_app

    store = make_store(tmp_path)
    people = [f"p{i:02d}" for i in range(N_PEOPLE)]
    for name in people:
        make_person(store, name)
    tokens = [make_token(store, f"bot{i}") for i in range(N_PROGRAMS)]
    ordinary = add_items(store, N_ITEMS, batch="load")
    calibration = add_items(store, N_CALIBRATION, batch="cal", calibration=True)
    app = create_app(settings=dict(FAST, lock_timeout_s=600), store=store)

    created: list[int] = []
    statuses: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    with live_server(app) as base:
        clients = []
        for name in people:  # log in over HTTP, like a browser
            c = httpx.Client(base_url=base, timeout=30)
            page = c.get("/login")
            r = c.post("/login", data=dict(name=name, password=PASSWORD, csrf_token=csrf_of(page.text)))
            assert r.status_code in (200, 303), r.text
            clients.append((c, {"x-csrf-token": c.get("/api/me").json()["csrf_token"]}))
        for t in tokens:
            clients.append((httpx.Client(base_url=base, timeout=30), {"Authorization": f"Bearer {t}"}))
        barrier = threading.Barrier(len(clients))

        def labeler(idx: int, client: httpx.Client, headers: dict) -> None:
            barrier.wait()
            n = 0
            while True:
                r = take_next(client, headers)
                with lock:
                    statuses[r.status_code] += 1
                if r.status_code != 200:
                    errors.append(f"next {r.status_code} {r.text[:200]}")
                    return
                item = r.json()["item"]
                if item is None:
                    return
                body = dict(item_id=item["item_id"], choice=1 + (idx + n) % item["k"], time_taken_s=5.0)
                n += 1
                if n % 5 == 0:  # a double submit (two tabs / a retried request): exactly one must count
                    results = []
                    ts = [threading.Thread(target=lambda: results.append(client.post("/api/labels", json=body, headers=headers)))
                          for _ in range(2)]
                    [t.start() for t in ts]
                    [t.join() for t in ts]
                else:
                    results = [client.post("/api/labels", json=body, headers=headers)]
                ok = [x for x in results if x.status_code == 201]
                with lock:
                    for x in results:
                        statuses[x.status_code] += 1
                    created.extend(x.json()["comparison_id"] for x in ok)
                    if len(ok) != 1:
                        errors.append(f"item {item['item_id']}: {[x.status_code for x in results]}")
                    for x in results:
                        if x.status_code not in (201, 409):
                            errors.append(f"label {x.status_code} {x.text[:200]}")

        threads = [threading.Thread(target=labeler, args=(i, c, h)) for i, (c, h) in enumerate(clients)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        assert not any(t.is_alive() for t in threads)
        for c, _ in clients:
            c.close()

    assert not errors, errors[:10]
    assert not any(code >= 500 for code in statuses), statuses
    labels = store.comparisons()
    # nothing lost: every 201 is in the store, and the store holds nothing else
    assert sorted(created) == sorted(c.id for c in labels)
    # nothing doubled: one label per (item, labeler); overlap-1 items exactly once; calibration by everyone
    assert len({(c.item_id, c.labeler_id) for c in labels}) == len(labels)
    per_item = Counter(c.item_id for c in labels)
    assert all(per_item[i] == 1 for i in ordinary)
    assert all(per_item[i] == N_PEOPLE + N_PROGRAMS for i in calibration)
    assert len(labels) == N_ITEMS + N_CALIBRATION * (N_PEOPLE + N_PROGRAMS)
    assert len(store.audit_entries(action="label")) == len(labels)
