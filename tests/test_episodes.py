"""The one episode builder: PPO's rollout, the guards' probe batches and the continuations sampler make the same
episodes from the same tokens (truncation, validity, text, Values Coach score, log-probs, reward path)."""

from __future__ import annotations

import pytest
import torch

from megacoach.config import load_config
from megacoach.continuations import TaskSampler
from megacoach.lm.loading import load_causal_lm
from megacoach.pipeline import build_trainer
from megacoach.ppo import episodes
from megacoach.reward.model import RewardModel
from megacoach.sampling import HFGenerator
from megacoach.tasks import load_queries


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(tiny_model_dir)},
                                                 "task": {"truncate_token": "e"},
                                                 "ppo": {"rollout_pass": "forward"}}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(tiny_model_dir))
    coach = RewardModel.from_base(str(tiny_model_dir), tokenizer=tok, seed=0).eval()
    return build_trainer(cfg, lm=lm, tok=tok, values_coach=coach,
                         queries=load_queries(cfg.task, tok, "train", 32, 31))


def test_a_batch_of_given_responses_is_the_rollouts_batch(trainer):
    """What the guards probe (episodes.build on chosen responses) is what PPO optimises (episodes.rollout)."""
    queries = trainer.next_queries()
    rolled = trainer.rollout(queries)
    given = episodes.build(trainer, queries, rolled.responses.tolist())
    assert rolled.valid.any() and not rolled.valid.all()  # both kinds of response are in the batch
    assert torch.equal(given.truncated, rolled.truncated) and torch.equal(given.valid, rolled.valid)
    assert given.texts == rolled.texts
    for name in ("raw_scores", "logprobs", "ref_logprobs", "values"):
        assert torch.allclose(getattr(given, name), getattr(rolled, name), atol=1e-5), name
    for name in ("scores", "kl", "rewards", "advantages", "returns"):
        assert torch.allclose(getattr(given.path, name), getattr(rolled.path, name), atol=1e-4), name
    assert given.entropy is not None and given.entropy.shape == given.logprobs.shape


def test_episode_scores_carry_the_penalty_exactly_where_invalid(trainer):
    batch = trainer.rollout(trainer.next_queries())
    scores = episodes.episode_scores(trainer, batch.query_ids, batch.truncated, batch.valid)
    assert torch.equal(scores, batch.path.scores)
    penalty = trainer.cfg.task.penalty_reward
    assert torch.all(scores[~batch.valid] == penalty)
    assert torch.allclose(scores[batch.valid], batch.raw_scores[batch.valid])


def test_the_continuations_sampler_applies_the_same_rules(trainer):
    sampler = TaskSampler(HFGenerator(trainer.apprentice.lm, trainer.pad_id), trainer.tok, trainer.cfg.task)
    queries = trainer.train_queries[:3]
    groups = sampler.continuations(queries, 2, torch.Generator().manual_seed(5))
    again = episodes.sample(sampler.gen, trainer.tok, trainer.cfg.task, trainer.stops, queries,
                            torch.Generator().manual_seed(5), repeats=2)
    flat = [c for g in groups for c in g]
    assert [c.sampled_ids for c in flat] == again.responses.tolist()
    truncated, valid = episodes.settle(again.responses, trainer.stops, trainer.pad_id)
    assert [c.valid for c in flat] == valid.tolist()
    assert [c.response_ids for c in flat] == [[x for x in row if x != trainer.pad_id] for row in truncated.tolist()]
    assert [c.text for c in flat] == again.texts
    assert [c.query for c in flat] == again.queries


def test_given_responses_are_cut_or_padded_to_the_response_length():
    out = episodes.pad_responses([[5, 6, 7, 8, 9], [1], []], pad_id=0, response_length=3)
    assert out.tolist() == [[5, 6, 7], [1, 0, 0], [0, 0, 0]]
