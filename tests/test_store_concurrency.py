"""Several threads and processes writing labels to one SQLite store at once: none lost, none doubled."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections import Counter

from sqlalchemy import text

from megacoach.labels.records import DuplicateLabelError, NewSample
from megacoach.labels.store import LabelStore

N_ITEMS = 12


def _setup(url):
    with LabelStore(url) as store:
        ids = [store.create_item(f"q{i}", [i], [NewSample("a", [1]), NewSample("b", [2]), NewSample("c", [3])]).item.id
               for i in range(N_ITEMS)]
        store.get_or_create_labeler("shared")
    return ids


def _label_all(store, item_ids, own_name):
    """Label every item once as `own_name` and try each item as the shared labeler too.
    Returns (own labels written, shared labels written, duplicates rejected)."""
    store.get_or_create_labeler(own_name)
    own = shared = dup = 0
    for n, item_id in enumerate(item_ids):
        store.add_comparison(item_id, n % 3, own_name, time_taken_s=0.1)
        own += 1
        try:
            store.add_comparison(item_id, 0, "shared")
            shared += 1
        except DuplicateLabelError:
            dup += 1
    return own, shared, dup


def _process_worker(url, item_ids, name, queue):
    try:
        with LabelStore(url) as store:  # each process opens its own store
            queue.put(_label_all(store, item_ids, name))
    except BaseException as e:  # report, don't hang the parent
        queue.put(repr(e))


def _check(url, n_writers, results):
    assert all(isinstance(r, tuple) for r in results), results
    with LabelStore(url) as store:
        labels = store.comparisons()
        assert len(labels) == n_writers * N_ITEMS + N_ITEMS  # every own label + one shared label per item
        assert sum(r[0] for r in results) == n_writers * N_ITEMS
        assert sum(r[1] for r in results) == N_ITEMS  # exactly one writer won each shared label
        assert sum(r[2] for r in results) == (n_writers - 1) * N_ITEMS
        pairs = Counter((c.item_id, c.labeler_name) for c in labels)
        assert max(pairs.values()) == 1  # nothing doubled
        assert len({c.id for c in labels}) == len(labels)
        with store.session(write=False) as s:
            assert s.scalar(text("SELECT count(*) FROM comparisons")) == len(labels)
            assert s.scalar(text("PRAGMA integrity_check")) == "ok"


def test_threads_share_one_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    item_ids = _setup(url)
    store = LabelStore(url)
    results, errors = [], []

    def run(name):
        try:
            results.append(_label_all(store, item_ids, name))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    store.close()
    assert not errors, errors
    _check(url, 6, results)


def test_processes_write_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'procs.db'}"
    item_ids = _setup(url)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(url, item_ids, f"p{i}", queue)) for i in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    _check(url, 4, results)


def _open_worker(url, queue):
    try:
        with LabelStore(url) as store:
            queue.put(store.schema_version())
    except BaseException as e:
        queue.put(repr(e))


def test_processes_open_a_new_store_at_once(tmp_path):
    """The first-open migration is serialised: every process gets a migrated store, none fails."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_worker, args=(url, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [LabelStore.code_schema_version()] * 4
