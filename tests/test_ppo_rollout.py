"""The rollout's scoring passes in row chunks (ppo.forward_batch_size) give what one big pass gives, and the
allocator setting (run.mmap_threshold_mib) is accepted or refused with a clear message."""

from __future__ import annotations

import pytest
import torch


def _trainer(model_dir, task=None, **ppo):
    from megacoach.config import load_config
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(model_dir)}, "ppo": ppo, "task": task or {}}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(model_dir))
    coach = RewardModel.from_base(str(model_dir), tokenizer=tok, seed=0).eval()
    return build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=load_queries(cfg.task, tok, "train", 32, 31))


@pytest.mark.parametrize("rollout_pass", ["sampling", "forward"])
def test_chunked_scoring_equals_one_pass(tiny_model_dir, rollout_pass):
    whole = _trainer(tiny_model_dir, rollout_pass=rollout_pass, forward_batch_size=8)
    chunked = _trainer(tiny_model_dir, rollout_pass=rollout_pass, forward_batch_size=3)  # 3 + 3 + 2 rows
    queries = whole.next_queries()
    assert queries == chunked.next_queries()
    a, b = whole.rollout(queries), chunked.rollout(queries)
    assert torch.equal(a.responses, b.responses)
    for name in ("raw_scores", "logprobs", "ref_logprobs", "values"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5), name
    assert torch.allclose(a.path.advantages, b.path.advantages, atol=1e-4)


def test_forward_batch_size_must_be_positive():
    from megacoach.config import load_config
    from megacoach.errors import ConfigError

    with pytest.raises(ConfigError, match="forward_batch_size"):
        load_config(overrides=[{"ppo": {"forward_batch_size": 0}}])


def test_mmap_threshold_setting():
    from megacoach.config import load_config
    from megacoach.errors import ConfigError
    from megacoach.memory import set_mmap_threshold

    assert set_mmap_threshold(None) is False  # the default: the allocator is left alone
    with pytest.raises(ConfigError, match="mmap_threshold_mib"):
        load_config(overrides=[{"run": {"mmap_threshold_mib": 64}}])
    import sys

    if sys.platform.startswith("linux"):
        import ctypes.util

        if ctypes.util.find_library("c"):
            assert set_mmap_threshold(32) is True  # glibc's largest dynamic value: a harmless setting


def test_rewards_and_advantages_are_whitened_once_over_the_whole_batch(tiny_model_dir):
    """ppo.whiten_rewards and the advantages' whitening take their statistics over the whole rollout batch (8
    episodes here), not over each update minibatch (4): what config.py and ppo/objective.py say."""
    from megacoach.ppo import objective

    # no truncation: every response is valid, so the (random) Values Coach's scores differ from row to row
    tr = _trainer(tiny_model_dir, {"truncate_token": None}, batch_size=8, mini_batch_size=4, whiten_rewards=True)
    beta = tr.kl_ctl.value
    batch = tr.rollout(tr.next_queries())
    p = batch.path
    assert bool(batch.valid.all()) and float(p.scores.std()) > 0
    raw, _ = objective.assemble_rewards(p.scores, p.kl, beta, batch.mask)
    whole = objective.whiten_rewards(raw, batch.mask)
    assert torch.allclose(p.rewards, whole, atol=1e-6)
    adv, returns = objective.gae(whole, batch.values, tr.cfg.ppo.gamma, tr.cfg.ppo.lam, batch.mask)
    assert torch.allclose(p.advantages, objective.whiten(adv, batch.mask), atol=1e-5)
    assert torch.allclose(p.returns, returns, atol=1e-5)
    # whitened per minibatch, the same rows would read otherwise
    halves = torch.cat([objective.whiten_rewards(raw[:4]), objective.whiten_rewards(raw[4:])])
    assert not torch.allclose(p.rewards, halves, atol=1e-3)
    assert abs(float(p.advantages.mean())) < 1e-5 and abs(float(p.advantages.var(unbiased=False)) - 1) < 1e-3
