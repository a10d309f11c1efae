"""The critic-free estimators (ppo.advantage 'rloo', 'grpo') in the trainer: K responses to each query through the
one episode builder, grouped; no value head built, trained or checkpointed; the config refuses what cannot work.
(Their maths is hand-checked in tests/test_ppo_maths.py, their guards in tests/test_guards.py.)"""

from __future__ import annotations

import pytest
import torch

from megacoach.config import load_config
from megacoach.errors import ConfigError


def _trainer(model_dir, **ppo):
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(model_dir)}, "ppo": ppo,
                                                 "task": {"truncate_token": None}}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(model_dir))
    coach = RewardModel.from_base(str(model_dir), tokenizer=tok, seed=0).eval()
    return build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=load_queries(cfg.task, tok, "train", 32, 31))


@pytest.mark.parametrize("ppo,field", [
    ({"advantage": "rloo"}, "ppo.samples_per_query"),  # K = 1: nothing to compare with
    ({"advantage": "grpo", "samples_per_query": 1}, "ppo.samples_per_query"),
    ({"samples_per_query": 3}, "ppo.samples_per_query"),  # 64 responses are not 3 per query
    ({"advantage": "rloo", "samples_per_query": 4, "separate_value_model": True}, "ppo.separate_value_model"),
    ({"advantage": "ppo"}, "ppo.advantage"),
    ({"samples_per_query": 0}, "ppo.samples_per_query"),
])
def test_bad_estimator_settings_are_config_errors(ppo, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[{"ppo": ppo}])


def test_defaults_are_the_papers():
    p = load_config().ppo
    assert p.advantage == "gae" and p.samples_per_query == 1
    assert load_config(overrides=[{"ppo": {"samples_per_query": 4}}]).ppo.samples_per_query == 4  # GAE with K = 4


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_trainer_samples_k_per_query_and_has_no_value_head(tiny_model_dir, advantage):
    tr = _trainer(tiny_model_dir, advantage=advantage, samples_per_query=4)
    assert tr.apprentice.value_head is None and tr.apprentice.value_trunk is None
    assert not any("value" in name for name, _ in tr.apprentice.named_parameters())
    queries = tr.next_queries()
    assert len(queries) == tr.cfg.ppo.batch_size == 8
    assert queries[0:4] == [queries[0]] * 4 and queries[4:8] == [queries[4]] * 4
    batch, metrics = tr.step()
    assert batch.groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] or queries[0] == queries[4]
    assert torch.equal(batch.values, torch.zeros_like(batch.values))
    adv = batch.path.advantages
    # one advantage per response, on every token; centred in each group of 4
    assert torch.allclose(adv, adv[:, :1].expand_as(adv))
    for g in range(2):
        assert abs(float(adv[4 * g:4 * g + 4, 0].sum())) < 1e-4
    assert "ppo/loss/value" in metrics and metrics["ppo/loss/value"] == 0.0 and metrics["ppo/val/var_explained"] == 0
    state = tr.state_dict()["apprentice"]
    assert not any(k.startswith("value_") for k in state)


def test_gae_trainer_keeps_its_value_head_and_draws_queries_as_before(tiny_model_dir):
    tr = _trainer(tiny_model_dir)
    assert tr.apprentice.value_head is not None
    assert "value_head.weight" in tr.state_dict()["apprentice"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    gen.set_state(tr.gens["queries"].get_state())
    idx = torch.randint(0, len(tr.train_queries), (tr.cfg.ppo.batch_size,), generator=gen, device="cpu")
    assert tr.next_queries() == [tr.train_queries[i] for i in idx.tolist()]  # K = 1: one draw per response
