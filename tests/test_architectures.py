"""Several transformers families through megacoach: log-probs, sampling, the Values Coach and one PPO step.

Each family is a tiny random-weight model made here (tests/families.py). For each one:
  * megacoach's logits (trunk -> `lm_logits`: the LM head plus the family's own scaling or capping) give the
    log-probs of the model's own forward, `model(input_ids).logits`, on a left-padded batch;
  * the update's fused response head gives autograd's log-probs, entropies and gradient, and the original model's
    log-probs made in chunks those of its whole logits, where it serves;
  * the KV-cached sampler's log-probs equal those of a full forward over query + sampled response, and so do the
    Apprentice's;
  * the Values Coach scores (its head on the width the LM head reads), shares queries across K responses, and saves
    and loads with the same scores;
  * one PPO iteration runs (with the rollout's old log-probs and values from the sampling pass).
"""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES, build_family_model
from megacoach.config import load_config
from megacoach.lm.hf import check_logits, hidden_size_of, lm_inputs, lm_logits, logits_transform, trunk_of
from megacoach.lm.loading import load_causal_lm
from megacoach.pipeline import build_trainer
from megacoach.ppo import episodes
from megacoach.ppo.policy import Apprentice, reference_logprobs
from megacoach.reward.model import RewardModel
from megacoach.sampling import HFGenerator
from megacoach.tasks import load_queries

T, TEMP = 8, 0.7


def _batch(vocab: int, pad: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.randint(2, vocab, (3, 12), generator=gen, device="cpu")
    ids[ids == pad] = 2
    ids[0, :4] = pad  # left padding
    ids[1, :1] = pad
    return ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_runs_through_megacoach(family, tiny_model_dir, tmp_path):
    path = build_family_model(family, tmp_path / family, tiny_model_dir)
    lm, tok = load_causal_lm(str(path))
    pad = tok.pad_token_id

    # the model's real logits: megacoach's log-probs are its own forward's
    ids = _batch(len(tok), pad)
    real = ids != pad
    with torch.no_grad():
        own = torch.log_softmax(lm(**lm_inputs(ids, pad)).logits.float(), -1)[real]
        ours = torch.log_softmax(lm_logits(lm, trunk_of(lm)(**lm_inputs(ids, pad)).last_hidden_state).float(), -1)[real]
    assert (own - ours).abs().max() < 1e-4, (family, logits_transform(lm.config))
    assert check_logits(lm, pad) < 1e-4

    # sampling with the KV cache: the same log-probs as one full forward of query + response
    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(path)}, "task": {"truncate_token": "e"},
                                                 "ppo": {"batch_size": 4, "mini_batch_size": 2}}])
    queries = load_queries(cfg.task, tok, "train", 16, 31)
    q = episodes.pad_queries(queries[:3], pad, cfg.task.query_length)
    roll = HFGenerator(lm, pad).generate(q, T, TEMP, torch.Generator(device="cpu").manual_seed(0), return_hidden=True)
    qr = torch.cat([q, roll.responses], 1)
    with torch.no_grad():
        full = lm(**lm_inputs(qr, pad)).logits[:, -T - 1:-1].float() / TEMP
        masked = full.clone()
        masked[..., pad] = float("-inf")  # the sampler never samples the pad token
        lp = torch.log_softmax(masked, -1).gather(-1, roll.responses[..., None])[..., 0]
        app = Apprentice(lm)(qr, pad, T, TEMP).logits
    assert (roll.logprobs - lp).abs().max() < 1e-4, family
    assert (app - full).abs().max() < 1e-4, family
    assert roll.hidden.shape[-1] == hidden_size_of(lm)

    # the update's fused response head (ppo.fused_head), where the family's logits are a scaled linear head: the
    # log-probs, entropies and LM-head gradient of autograd's
    fused = Apprentice(lm, fused_head=True)
    assert fused.fused_head == all(op != "softcap" for op, _ in logits_transform(lm.config)), family
    heads = []
    for app_ in (Apprentice(lm), fused):
        lm.zero_grad(set_to_none=True)
        out = app_(qr, pad, T, TEMP, responses=qr[:, -T:])
        out.logprobs.sum().backward()
        heads.append((out.logprobs.detach(), out.entropy, lm.get_output_embeddings().weight.grad))
    lm.zero_grad(set_to_none=True)
    for ref, got in zip(*heads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=family)
    torch.testing.assert_close(reference_logprobs(lm, qr, pad, T, TEMP, fused=True),
                               reference_logprobs(lm, qr, pad, T, TEMP), rtol=1e-4, atol=1e-5, msg=family)

    # the Values Coach: its head reads what the LM head reads; best-of-K shares the query; saved = loaded
    coach = RewardModel.from_base(str(path), tokenizer=tok, seed=0).eval()
    assert coach.d_model == hidden_size_of(lm)
    with torch.no_grad():
        k_resp = roll.responses.view(3, 1, T).expand(3, 2, T).clone()
        k_resp[:, 1, -2:] = pad
        shared = coach.best_of_k(q, k_resp)
        alone = torch.stack([coach(torch.cat([q, k_resp[:, j]], 1)) for j in range(2)], 1)
        assert (shared - alone).abs().max() < 1e-4, family
        coach.save_pretrained(tmp_path / "coach")
        again = RewardModel.from_pretrained(tmp_path / "coach", policy_tokenizer=tok)
        assert again.d_model == coach.d_model
        assert torch.equal(again(qr), coach(qr))

    # one PPO iteration
    trainer = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries)
    batch, metrics = trainer.iteration()
    assert batch.values.shape == (4, T) and all(v == v for v in metrics.values() if isinstance(v, float))


def test_transformers_older_than_the_cache_argument_is_refused_with_a_clear_error():
    from megacoach.errors import ConfigError
    from megacoach.lm.hf import MIN_TRANSFORMERS, require_transformers

    assert MIN_TRANSFORMERS == "5.24.0"
    require_transformers("5.24.0")
    require_transformers("5.30.1")
    for old in ("5.0.0", "5.23.0", "4.57.6"):
        with pytest.raises(ConfigError, match=r"transformers>=5\.24\.0"):
            require_transformers(old)


def test_a_trunk_that_ignores_the_kv_cache_is_caught(tiny_model_dir):
    """What transformers 5.0-5.23 do with `cache=`: swallow it and start a fresh cache (log-probs silently off)."""
    from megacoach.errors import ConfigError
    from megacoach.lm.hf import CACHE_KW

    lm, tok = load_causal_lm(str(tiny_model_dir))
    gen = HFGenerator(lm, tok.pad_token_id)
    trunk = gen.trunk
    gen.trunk = lambda **kw: trunk(**{k: v for k, v in kw.items() if k != CACHE_KW})
    q = torch.full((1, 4), 5, dtype=torch.long, device="cpu")
    with pytest.raises(ConfigError, match="ignored the KV cache"):
        gen.generate(q, 3, 1.0, torch.Generator(device="cpu").manual_seed(0))
