"""The guards against the public bug classes beyond the section 4.4 incident (docs/guards.md, "The field's bug
classes"): each check fails on a planted bug and passes clean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megacoach.errors import DataError
from megacoach.guards import bugs as B
from megacoach.guards import stats as S
from megacoach.labels.records import NewSample
from megacoach.labels.store import LabelStore
from megacoach.reward import train as reward_train
from megacoach.reward.loss import best_of_k_loss, blind_to_direction, reversed_choices


# ------------------------------------------------------------------------------------------ direction-aware figures
def _reversed_accuracy(rewards, chosen):
    return torch.stack([best_of_k_loss(rewards, c)[1] for c in reversed_choices(chosen, rewards.shape[1])]).mean()


@pytest.mark.parametrize("k", [2, 4])
def test_reversed_accuracy_falls_below_chance_exactly_when_the_accuracy_is_above(k):
    gen = torch.Generator().manual_seed(k)
    for _ in range(20):
        rewards = torch.randn(32, k, generator=gen)
        truth = rewards.argmax(1)
        noisy = torch.where(torch.rand(32, generator=gen) < 0.3, torch.randint(0, k, (32,), generator=gen), truth)
        acc = float(best_of_k_loss(rewards, noisy)[1])
        rev = float(_reversed_accuracy(rewards, noisy))
        if acc > 1 / k:
            assert rev < 1 / k
        assert not blind_to_direction(acc, rev, 1 / k)
    assert [c.tolist() for c in reversed_choices(torch.tensor([0, 1]), 2)] == [[1, 0]]


def test_reversed_rank_test_mirrors_the_rank_test():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        values = [rng.normal(size=k) for _ in range(60)]
        chosen = [int(np.argmax(v)) if i % 3 else int(rng.integers(k)) for i, v in enumerate(values)]
        rt, rev = S.rank_test(values, chosen), S.reversed_rank_test(values, chosen)
        assert rt.agreement > 0.5 > rev.agreement
        assert rev.agreement == pytest.approx((k / 2 - rt.agreement) / (k - 1))


def _comparisons(n=40, k=2):
    gen = torch.Generator().manual_seed(1)
    return [{"query_ids": [5, 6], "sample_ids": [torch.randint(7, 30, (3,), generator=gen).tolist() for _ in range(k)],
             "chosen": i % k} for i in range(n)]


class _Scorer(torch.nn.Module):
    """A stand-in Values Coach: the score of a sequence is its last token id (what evaluate needs of a coach)."""

    pad_id = 0
    retokenizer = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, ids, pad_id=None):
        return self.w * ids[:, -1].float()

    def best_of_k(self, queries, responses, pad_id=None):
        b, k, r = responses.shape
        return self(torch.cat([queries.repeat_interleave(k, 0), responses.reshape(b * k, r)], 1)).view(b, k)


def test_evaluate_reports_the_reversed_accuracy_and_refuses_a_blind_one(monkeypatch):
    comps = _comparisons()
    for c in comps:  # choose the sample with the highest last token: the stand-in coach agrees with every label
        c["chosen"] = int(np.argmax([s[-1] for s in c["sample_ids"]]))
    coach = _Scorer()
    monkeypatch.setattr(reward_train, "_vocab_size", lambda model: 100)
    res = reward_train.evaluate(coach, comps)
    assert res["accuracy"] > 0.9 and res["reversed_accuracy"] < 0.1 and res["chance"] == 0.5

    def blind(rewards, chosen):  # an accuracy that never reads the choice: "some sample is strictly best"
        loss, _ = best_of_k_loss(rewards, chosen)
        top2 = rewards.float().topk(2, dim=1).values
        return loss, (top2[:, 0] > top2[:, 1]).float().mean()

    monkeypatch.setattr(reward_train, "best_of_k_loss", blind)
    with pytest.raises(DataError, match="does not depend on which sample"):
        reward_train.evaluate(coach, comps)


# ------------------------------------------------------------------------------------------ the labels' way in
def test_the_label_round_trip_passes_clean_and_refuses_a_reversed_read():
    from megacoach.guards.labelcheck import roundtrip_choices
    from megacoach.guards.preflight import check_label_store

    assert roundtrip_choices(LabelStore) == []
    with B.inject("choice-reversed"):
        problems = roundtrip_choices(LabelStore)
        store = LabelStore("sqlite://")
        try:
            check = check_label_store(store)
        finally:
            store.close()
    assert problems and "reads sample" in problems[0]
    assert not check.passed and "label store" in check.component


def test_an_import_that_reads_the_choice_reversed_is_refused(tmp_path):
    from megacoach.labels.io import import_openai_labels

    class Tok:
        def decode(self, ids):
            return " ".join(map(str, ids))

    records = [{"query": [1, 2], "sample0": [3, 4], "sample1": [5, 6], "best": 1},
               {"query": [1, 7], "sample0": [8], "sample1": [9, 9], "best": 0}]
    clean = LabelStore(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        res = import_openai_labels(clean, records, Tok(), vocab_size=50, pad_token_id=None)
        assert res.comparisons == 2
        assert [c.samples[c.chosen].token_ids for c in clean.comparisons()] == [[5, 6], [8]]
    finally:
        clean.close()
    bad = LabelStore(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        with B.inject("choice-reversed"), pytest.raises(DataError, match="choice is read wrongly"):
            import_openai_labels(bad, records, Tok(), vocab_size=50, pad_token_id=None)
        assert bad.count_comparisons() == 0  # nothing imported
    finally:
        bad.close()


# ------------------------------------------------------------------------------------------ sampler vs trainer
def test_rollout_agreement_figures_and_what_differs():
    from megacoach.ppo import consistency as C

    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(16, 8, generator=gen) * 4
    mask = torch.ones(16, 8, dtype=torch.bool)
    mask[:, 6:] = False
    tol = C.tolerances("fp32")
    same = C.rollout_agreement(old + 1e-6 * torch.randn(16, 8, generator=gen), old, mask)
    assert same["tokens"] == 96 and C.disagreement(same, tol) == []
    assert tol["max_logratio"] == pytest.approx(4096 * 2 ** -23) and C.tolerances("bf16")["max_logratio"] == 1.0
    hot = C.rollout_agreement(old * 0.7, old, mask)  # the trainer's log-probs at another temperature
    assert "temperature" in C.disagreement(hot, tol)[0]
    shifted = C.rollout_agreement(old - 1e-3, old, mask)  # one softmax has a term the other lacks
    assert "constant shift" in C.disagreement(shifted, tol)[0]
    outside = old.clone()
    outside[:, 6:] = 0.0  # differences outside the mask count nowhere
    assert C.rollout_agreement(outside, old, mask)["max_logratio"] == 0.0


# ------------------------------------------------------------------------------------------ tiny runs
@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    import guard_helpers as H

    db, coach = H.prepare_tiny(tmp_path_factory.mktemp("classes"), tiny_model_dir)
    return tiny_model_dir, db, coach


@pytest.fixture(scope="module")
def rig(prepared, tmp_path_factory):
    import guard_helpers as H

    return H.build_rig(prepared, tmp_path_factory.mktemp("rig"))


def test_sampler_trainer_check_passes_clean_and_names_a_temperature_slip(rig):
    from megacoach.guards.preflight import check_rollout

    cfg, trainer, _, _ = rig
    qs = trainer.train_queries[:8]
    before = {k: v.clone() for k, v in trainer.apprentice.state_dict().items()}
    clean = check_rollout(trainer, qs, cfg.guards)
    assert clean.passed, clean.message
    assert clean.figures["max_logratio"] <= clean.figures["tolerance_max_logratio"]
    with B.inject("temperature-one-place"):
        slip = check_rollout(trainer, qs, cfg.guards)
    assert not slip.passed and "temperature" in slip.message, slip.message
    after = trainer.apprentice.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # stopped before any step, and restored
    assert trainer.before_first_step is None


def test_the_live_check_halts_a_temperature_slip_before_the_first_step(prepared, tmp_path):
    import json

    import guard_helpers as H
    from rich.console import Console

    from megacoach.errors import HaltError
    from megacoach.pipeline import train

    md, db, coach = prepared
    run = H.new_run(tmp_path, db)
    cfg = H.tiny_config(run, md, coach, guards={"preflight": False})
    with B.inject("temperature-one-place"), pytest.raises(HaltError):
        train(cfg, console=Console(quiet=True))
    rec = json.loads((run / "HALTED.json").read_text())
    assert rec["source"] == "guard/rollout_agreement" and rec["iteration"] == 0, rec["reason"]
    assert "temperature" in rec["reason"]


# ------------------------------------------------------------------------------------------ padding
def test_padding_moves_nothing_clean_and_a_leak_is_named(rig):
    from megacoach.guards import probe as P
    from megacoach.guards.padding import padding_leaks
    from megacoach.guards.preflight import check_padding

    cfg, trainer, _, _ = rig
    qs = trainer.train_queries[:8]
    with P.scratch(trainer):
        batch = trainer.rollout(qs)
    assert padding_leaks(trainer, batch, seed=3) == {}
    with B.inject("pad-leak"):
        leaks = padding_leaks(trainer, batch, seed=3)
        check = check_padding(trainer, qs, 3)
    assert "advantages" in leaks and not check.passed and "advantages" in check.message, check.message


def test_padding_probe_sees_a_score_read_in_the_padding(rig, monkeypatch):
    from megacoach.guards import probe as P
    from megacoach.guards.padding import padding_leaks
    from megacoach.reward import model as reward_model

    cfg, trainer, _, _ = rig
    with P.scratch(trainer):
        batch = trainer.rollout(trainer.train_queries[:8])

    def last_column(input_ids, pad):  # trl#3750: the score read at the last position, a pad after the end
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)

    monkeypatch.setattr(reward_model, "last_real_index", last_column)
    assert "Values Coach scores" in padding_leaks(trainer, batch, seed=3)


# ------------------------------------------------------------------------------------------ reward terms
def test_reward_terms_scorers_and_their_sum_in_the_episode_score():
    from megacoach.errors import ConfigError
    from megacoach.ppo import objective
    from megacoach.reward import terms as T

    assert T.load_scorer("length")("q", "abc") == 3.0 and T.load_scorer("words")("q", "a b c") == 3.0
    assert T.load_scorer("regex:!")("q", "out!") == 1.0 and T.load_scorer("regex:!")("q", "out") == 0.0
    assert T.load_scorer("megacoach.reward.terms:_length")("q", "ab") == 2.0
    for bad in ("regex:(", "nope", "no.such.module:f"):
        with pytest.raises(ConfigError, match="reward.terms"):
            T.load_scorer(bad)
    values = torch.tensor([[3.0, 1.0], [5.0, 0.0]])
    weights = torch.tensor([-0.5, 2.0])
    scores = objective.episode_scores(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), -1.0, values, weights)
    assert scores.tolist() == [1.0 - 1.5 + 2.0, -1.0]  # the terms ride on valid responses only


def _with_terms(trainer, weight):
    from megacoach.config import RewardTerm
    from megacoach.reward.terms import load_terms

    return load_terms([RewardTerm(name="no-exclaiming", scorer="regex:!", weight=weight, examples=[
        {"query": "What say you?", "better": "I pray you, stay.", "worse": "Out, out!"},
        {"query": "Speak.", "better": "I will, my lord.", "worse": "Away!"}])])


def test_reward_term_directions_pass_clean_and_an_inverted_term_is_refused_by_name(rig):
    from megacoach.guards.preflight import check_reward_terms

    cfg, trainer, _, _ = rig
    saved = trainer.terms
    try:
        trainer.terms = _with_terms(trainer, -0.5)
        clean = check_reward_terms(trainer)
        assert clean.passed, clean.message
        with B.inject("term-sign"):
            flipped = check_reward_terms(trainer)
        assert not flipped.passed and "no-exclaiming" in flipped.component, flipped.message
        trainer.terms = _with_terms(trainer, +0.5)  # configured the wrong way round: the examples refuse it
        wrong = check_reward_terms(trainer)
        assert not wrong.passed and "weighted score" in wrong.message
    finally:
        trainer.terms = saved


def test_the_agreement_monitor_logs_the_reversed_figure():
    from megacoach.guards import monitors as M

    th = M.Thresholds(alpha=1e-4, z_halt=S.z_for(1e-4), window=4, min_evidence=24, kl_budget=25.0,
                      agreement_floor=0.5, winrate_floor=None)
    rng = np.random.default_rng(0)
    hist = [{"iteration": 1, "score": rng.normal(0, 1, 64), "labeler": rng.normal(0, 0.4, 64)}]
    base = {"score": rng.normal(0, 1, 256), "labeler": rng.normal(0, 0.4, 256)}
    agree = [{"iteration": 1, "values": [3.0, 0.0, 1.0, 2.0], "chosen": 0, "win": True, "p0": 0.5}] * 30
    m, _ = M.judge(hist, agree, base, None, th, 1.0)
    assert m["guard/agreement"] == 1.0 and m["guard/agreement_reversed"] == pytest.approx(1 / 3)
