"""Training the Values Coach: one epoch, linear LR decay, K sequences per forward pass, normalisation
before and after, held-out metrics, bad input, and retraining from scratch."""

import math
import random

import pytest
import torch

from megacoach.config import RewardConfig
from megacoach.errors import DataError
from megacoach.reward import (Comparison, RewardModel, as_comparison, comparison_batch, evaluate,
                              retrain_from_scratch, train_reward_model)
from megacoach.reward.train import batch_rewards

GOOD = 77  # the "preferred" token: the chosen sample ends with it, no other sample contains it


def synthetic(n: int, seed: int, k: int = 4, pad: int = 1) -> list[Comparison]:
    rng = random.Random(seed)
    vocab = [t for t in range(2, 300) if t != GOOD]
    out = []
    for _ in range(n):
        q = [rng.choice(vocab) for _ in range(rng.randint(3, 8))]
        samples = [[rng.choice(vocab) for _ in range(rng.randint(2, 6))] for _ in range(k)]
        chosen = rng.randrange(k)
        samples[chosen][-1] = GOOD
        out.append(Comparison(q, samples, chosen))
    return out


@pytest.fixture()
def model(tiny_model_dir):
    torch.manual_seed(0)
    return RewardModel.from_base(str(tiny_model_dir), seed=0)


def test_comparison_batch_layout():
    comps = [Comparison([5, 6], [[7], [8, 9]], 1), Comparison([4], [[3, 3, 3], [2]], 0)]
    ids, chosen = comparison_batch(comps, pad_id=1)
    assert chosen.tolist() == [1, 0]
    assert ids.tolist() == [[5, 6, 7, 1, 1], [5, 6, 8, 9, 1], [1, 4, 3, 3, 3], [1, 4, 2, 1, 1]]
    # pads already in the records (left of queries, after truncation) are not doubled
    ids2, _ = comparison_batch([Comparison([1, 1, 5, 6], [[7, 1, 1], [8, 9]], 0)], pad_id=1)
    assert ids2.tolist() == [[5, 6, 7, 1], [5, 6, 8, 9]]


def test_batch_rewards_shared_query_matches_full(model):
    comps = synthetic(6, seed=11)
    with torch.no_grad():
        a, ca = batch_rewards(model, comps, 1, share_query=True)
        b, cb = batch_rewards(model, comps, 1, share_query=False)
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(ca, cb)


def test_as_comparison_adapts_records():
    c = as_comparison({"query": [1, 2], "samples": [[3], [4]], "best": 1})
    assert c == Comparison([1, 2], [[3], [4]], 1)
    with pytest.raises(DataError, match="missing field"):
        as_comparison({"query": [1], "samples": [[3], [4]]})


def test_training_learns_and_reports(model):
    train, valid = synthetic(96, seed=1), synthetic(48, seed=2)
    norm = torch.randint(2, 300, (32, 10), generator=torch.Generator().manual_seed(5))
    cfg = RewardConfig(learning_rate=3e-3, batch_size=12, epochs=1)  # the paper's one pass
    before = evaluate(model, valid)
    calls = []
    hook = model.trunk.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    logs = []
    try:
        m = train_reward_model(model, train, valid, cfg, pad_id=1, normalisation_samples=norm, seed=0,
                               log=logs.append)
    finally:
        hook.remove()
    assert m["steps"] == 8 and m["num_train"] == 96 and m["k"] == 4  # exactly one epoch
    # training passes: per step, one forward of the B = 12 queries, then one of all B*K = 48 responses
    assert calls.count(12) >= 8 and calls.count(48) >= 8
    assert m["valid_accuracy"] > 0.6 > before["accuracy"] + 0.1  # chance is 0.25
    assert m["valid_loss"] < before["loss"]
    assert m["train_examples_per_s"] > 0 and 0 <= m["train_accuracy"] <= 1
    assert set(m["normalisation"]) == {"before", "after"}
    with torch.no_grad():
        out = model(norm)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-4)  # normalised again after training
    assert out.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert model.normalisation["after"]["gain"] == pytest.approx(model.gain.item())
    assert any("held-out accuracy" in line for line in logs)


def test_epochs_and_linear_lr_decay(model, monkeypatch):
    lrs = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        assert self.param_groups[0]["eps"] == 1e-5
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    cfg = RewardConfig(learning_rate=1e-3, batch_size=8, epochs=2)
    m = train_reward_model(model, synthetic(20, seed=3), [], cfg, pad_id=1, seed=0, log=None)
    n = 2 * math.ceil(20 / 8)
    assert m["steps"] == n == 6 and m["valid_accuracy"] is None
    assert lrs == pytest.approx([1e-3 * (1 - i / n) for i in range(n)])


def test_no_dropout_in_training(model):
    model.train()
    ids, _ = comparison_batch(synthetic(2, seed=4), pad_id=1)
    with torch.no_grad():
        assert torch.equal(model.raw(ids), model.raw(ids))


def test_seeded_training_is_deterministic(tiny_model_dir):
    cfg = RewardConfig(learning_rate=1e-3, batch_size=8)
    train, valid = synthetic(24, seed=5), synthetic(8, seed=6)
    norm = torch.randint(2, 300, (16, 10), generator=torch.Generator().manual_seed(5))
    a, ma = retrain_from_scratch(str(tiny_model_dir), train, valid, cfg, norm, seed=7, log=None)
    b, mb = retrain_from_scratch(str(tiny_model_dir), train, valid, cfg, norm, seed=7, log=None)
    assert ma["valid_loss"] == pytest.approx(mb["valid_loss"], abs=1e-6)
    assert torch.allclose(a.head.weight, b.head.weight)
    # a fresh Values Coach starts from the base LM's weights, not from a previous one
    fresh = RewardModel.from_base(str(tiny_model_dir), seed=7)
    wte = lambda m: m.trunk.get_input_embeddings().weight  # noqa: E731
    assert not torch.allclose(wte(a), wte(fresh))
    assert torch.allclose(wte(RewardModel.from_base(str(tiny_model_dir), seed=8)), wte(fresh))


@pytest.mark.parametrize("comps,match", [
    ([Comparison([5], [[6], [7]], 2)], "chosen index 2 out of range"),
    ([Comparison([5], [[6]], 0)], "expected K >= 2"),
    ([Comparison([5], [[6], [7]], 0), Comparison([5], [[6], [7], [8]], 0)], "one K"),
    ([Comparison([5], [[6], [7000]], 0)], "token id 7000 outside the vocabulary"),
    ([], "no comparisons"),
])
def test_bad_comparisons(model, comps, match):
    with pytest.raises(DataError, match=match):
        train_reward_model(model, comps, [], RewardConfig(batch_size=2), pad_id=1, log=None)


def test_retrain_from_label_store(tiny_model_dir, tmp_path):
    from megacoach.labels.records import NewSample
    from megacoach.labels.store import LabelStore

    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    try:
        store.get_or_create_labeler("vader", kind="program")
        for i, c in enumerate(synthetic(24, seed=9)):
            item = store.create_item("q", c.query_ids, [NewSample("s", s + [1, 1]) for s in c.sample_ids],
                                     split="valid" if i % 4 == 0 else "train")
            store.add_comparison(item.item.id, c.chosen, "vader")
        records = store.comparisons(split="train")
        assert as_comparison(records[0]).sample_ids == [s for s in records[0].sample_token_ids]
        model, m = retrain_from_scratch(str(tiny_model_dir), store, cfg=RewardConfig(batch_size=6, epochs=1), seed=1,
                                       log=None)
    finally:
        store.close()
    assert m["num_train"] == 18 and m["num_valid"] == 6 and m["steps"] == 3
    assert 0 <= m["valid_accuracy"] <= 1
