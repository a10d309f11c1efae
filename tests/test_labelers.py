"""Mock labelers (VADER, noisy, inverted, custom callables) and auto-labeling through the store."""

from __future__ import annotations

import random
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest

from megacoach.errors import ConfigError, DataError
from megacoach.labels.labelers import (
    CallableLabeler,
    InvertedLabeler,
    Labeler,
    NoisyLabeler,
    VaderLabeler,
    argbest,
    label_items,
    load_labeler,
    permutation,
)
from megacoach.labels.records import NewSample
from megacoach.labels.store import LabelStore

RESPONSES = ["I hate this, it is awful.", "What a wonderful, lovely day!", "It is a table.", "Good."]


@pytest.fixture(scope="module")
def vader():
    return VaderLabeler()


def test_vader_prefers_most_positive(vader):
    scores = vader.scores("q", RESPONSES)
    assert scores[1] > scores[3] > scores[2] == 0.0 > scores[0]
    assert vader.choose("q", RESPONSES, random.Random(0)) == 1
    assert vader.kind == "program" and vader.name == "mock:vader"
    assert isinstance(vader, Labeler)


def test_ties_broken_by_rng_deterministically(vader):
    neutral = ["a table", "a chair", "a lamp", "a door"]
    assert vader.scores("q", neutral) == [0.0] * 4
    picks = [vader.choose("q", neutral, random.Random(seed)) for seed in range(200)]
    assert picks == [vader.choose("q", neutral, random.Random(seed)) for seed in range(200)]  # reproducible
    assert set(picks) == {0, 1, 2, 3}  # every tied response can win
    assert argbest([1.0, 3.0, 3.0], np.random.default_rng(0)) in (1, 2)  # numpy Generators work too


def test_inverted_prefers_least(vader):
    inv = InvertedLabeler(vader)
    assert inv.choose("q", RESPONSES, random.Random(0)) == 0
    assert inv.scores("q", RESPONSES) == [-s for s in vader.scores("q", RESPONSES)]
    assert inv.name == "mock:vader:invert" and inv.kind == "program"
    with pytest.raises(ConfigError, match="cannot be inverted"):
        InvertedLabeler(CallableLabeler(lambda q, r: 0, "f")).choose("q", RESPONSES, random.Random(0))


@pytest.mark.parametrize("agreement", [0.0, 0.3, 0.7, 1.0])
def test_noisy_agreement_rate_and_uniform_errors(vader, agreement):
    noisy = NoisyLabeler(vader, agreement)
    rng = random.Random(1)
    n = 4000
    picks = Counter(noisy.choose("q", RESPONSES, rng) for _ in range(n))
    assert abs(picks[1] / n - agreement) < 0.03
    for other in (0, 2, 3):  # disagreements spread evenly over the other K-1
        assert abs(picks[other] / n - (1 - agreement) / 3) < 0.03
    assert noisy.scores("q", RESPONSES) == vader.scores("q", RESPONSES)


def test_noisy_bad_agreement(vader):
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ConfigError, match="agreement"):
            NoisyLabeler(vader, bad)


def test_permutation_uniform():
    rng = random.Random(0)
    counts = Counter(tuple(permutation(rng, 3)) for _ in range(6000))
    assert len(counts) == 6 and all(abs(c / 6000 - 1 / 6) < 0.03 for c in counts.values())
    assert sorted(permutation(np.random.default_rng(0), 5)) == [0, 1, 2, 3, 4]


def test_load_labeler_builtin_specs():
    v = load_labeler("vader")
    assert isinstance(v, VaderLabeler)
    inv = load_labeler("vader:invert")
    assert isinstance(inv, InvertedLabeler) and isinstance(inv.base, VaderLabeler)
    noisy = load_labeler("vader:noise=0.7")
    assert isinstance(noisy, NoisyLabeler) and noisy.agreement == 0.7 and noisy.name == "mock:vader:agree=0.7"
    chain = load_labeler("vader:invert:agree=0.9")
    assert isinstance(chain, NoisyLabeler) and isinstance(chain.base, InvertedLabeler)
    for lab in (v, inv, noisy, chain):
        assert lab.kind == "program"
        again = load_labeler(lab.name)  # a stored name is a spec
        assert type(again) is type(lab) and again.name == lab.name


@pytest.mark.parametrize("spec, pattern", [
    ("", "expected e.g."),
    ("gpt4", "unknown labeler 'gpt4'"),
    ("vader:sarcastic", "unknown modifier 'sarcastic'"),
    ("vader:noise=lots", "expects a number"),
    ("vader:noise=1.5", "probability"),
    ("no_such_pkg_xyz.mod:fn", "cannot import module"),
    ("math:nosuch", "has no 'nosuch'"),
    ("vader:", "unknown modifier ''"),
    ("os.path:nosuch", "has no 'nosuch'"),
    ("os.path:sep", "neither a labeler nor a callable"),
])
def test_load_labeler_bad_specs(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_labeler(spec)


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mylabelers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "prefs.py").write_text(textwrap.dedent("""
        def longest(query, responses):
            return max(range(len(responses)), key=lambda i: len(responses[i]))

        def broken(query, responses):
            return 99

        class Shortest:
            def choose(self, query, responses, rng):
                return min(range(len(responses)), key=lambda i: len(responses[i]))

            def scores(self, query, responses):
                return [-float(len(r)) for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mylabelers.prefs"
    for name in [m for m in sys.modules if m.startswith("mylabelers")]:
        del sys.modules[name]


def test_load_labeler_custom(custom_module):
    rng = random.Random(0)
    fn = load_labeler(f"{custom_module}:longest")
    assert isinstance(fn, CallableLabeler) and fn.name == f"mock:{custom_module}:longest" and fn.kind == "program"
    assert fn.choose("q", ["a", "abc", "ab"], rng) == 1 and fn.scores("q", ["a"]) is None
    cls = load_labeler(f"{custom_module}:Shortest")
    assert cls.choose("q", ["abc", "a", "ab"], rng) == 1 and cls.name == f"mock:{custom_module}:Shortest"
    inv = load_labeler(f"{custom_module}:Shortest:invert")
    assert inv.choose("q", ["abc", "a", "ab"], rng) == 0
    with pytest.raises(DataError, match="returned 99; expected an index 0..2"):
        load_labeler(f"{custom_module}:broken").choose("q", ["a", "b", "c"], rng)


@pytest.fixture
def store(tmp_path):
    s = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    yield s
    s.close()


def _fill(store, n=10, batch="b0", split="train"):
    rng = random.Random(42)
    out = []
    for i in range(n):
        texts = list(RESPONSES)
        rng.shuffle(texts)
        samples = [NewSample(t, [j + 1], policy="ckpt-0") for j, t in enumerate(texts)]
        out.append(store.create_item(f"query {i}", [i + 1], samples, batch=batch, split=split))
    return out


def test_label_items_writes_program_labels(store, vader):
    contents = _fill(store)
    result = label_items(store, vader, seed=3)
    assert result.labeler == "mock:vader" and len(result.written) == 10 and result.already_labeled == 0
    labels = store.comparisons()
    assert len(labels) == 10
    orders = set()
    for c, content in zip(labels, contents):
        assert c.labeler_kind == "program" and c.labeler_name == "mock:vader"
        assert c.sample_texts[c.chosen] == RESPONSES[1]  # the most positive, in canonical indices
        assert sorted(c.shown_order) == [0, 1, 2, 3]
        orders.add(tuple(c.shown_order))
        assert c.item_id == content.item.id
    assert len(orders) > 1  # samples were shown in random orders
    assert store.get_labeler("mock:vader").kind == "program"
    [audit] = store.audit_entries(action="labels.auto")
    assert audit.actor == "mock:vader" and audit.detail["written"] == 10
    # nothing left for this labeler: a second run writes nothing, doubles nothing
    assert label_items(store, vader).written == [] and store.count_comparisons() == 10


def test_label_items_explicit_items_skip_duplicates_and_filters(store, vader):
    a = _fill(store, 3, batch="a")
    b = _fill(store, 2, batch="b", split="valid")
    inv = InvertedLabeler(vader)
    res = label_items(store, inv, [a[0].item, a[1].item.id], rng=np.random.default_rng(0))
    assert [c.item_id for c in res.written] == [a[0].item.id, a[1].item.id]
    assert all(c.sample_texts[c.chosen] == RESPONSES[0] for c in res.written)
    again = label_items(store, inv, [a[1], a[2]])
    assert again.already_labeled == 1 and [c.item_id for c in again.written] == [a[2].item.id]
    res_b = label_items(store, vader, split="valid")
    assert [c.item_id for c in res_b.written] == [x.item.id for x in b]
    assert {c.split for c in res_b.written} == {"valid"}
    assert len(label_items(store, vader, batch="a", limit=2).written) == 2
    assert store.count_comparisons() == 3 + 2 + 2


def test_label_items_same_seed_same_labels(tmp_path, vader):
    results = []
    for run in range(2):
        with LabelStore(f"sqlite:///{tmp_path / f'r{run}.db'}") as s:
            for i in range(5):
                s.create_item(f"q{i}", [1], [NewSample(t, [1]) for t in ["a table", "a chair", "a lamp"]])
            label_items(s, NoisyLabeler(vader, 0.5), seed=11)
            results.append([(c.chosen, c.shown_order) for c in s.comparisons()])
    assert results[0] == results[1]
