"""Instruct models: queries in the tokenizer's chat template (task.chat_template, task.system_prompt), responses that
end at the tokenizer's EOS (task.stop_at_eos) or at stop strings (task.stop), with sampling ending once every row
has stopped, padding after each stop masked out of log-probs, values, KL, rewards, advantages and losses, and the
invalid-response penalty for a response that did not stop within task.response_length. On a tiny Llama (rotary
positions) with a chat template set on a local tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from families import build_chat_model

STOPS = {"chat_template": True, "system_prompt": "Answer in verse.", "stop_at_eos": True, "stop": ["!"],
         "truncate_token": None, "query_length": 40, "response_length": 12, "query_min_tokens": 4}


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat") / "llama")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    texts = ["Tell me of the river.", "What says the king?", "Sing of the spring!", "Who comes from Padua?",
             "Speak of the meadow.", "Where is my lady?", "How fares the town?", "What news, good nurse?"] * 4
    path.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(texts)))
    return path


def _trainer(model_dir, prompts, **task):
    from megacoach.config import load_config
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer, train_queries
    from megacoach.reward.model import RewardModel

    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(model_dir)},
                                                 "task": {**STOPS, "query_source": str(prompts), **task},
                                                 "ppo": {"batch_size": 16, "mini_batch_size": 8},
                                                 "run": {"max_iterations": 2}}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(model_dir))
    coach = RewardModel.from_base(str(model_dir), tokenizer=tok, seed=0).eval()
    return build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=train_queries(cfg, tok))


# ------------------------------------------------------------------------------------------ queries
def test_queries_are_formatted_with_the_chat_template(chat_model_dir, prompts):
    from megacoach.config import load_config
    from megacoach.lm.loading import load_tokenizer
    from megacoach.tasks import load_queries

    tok = load_tokenizer(str(chat_model_dir))
    task = load_config(overrides=[{"task": {**STOPS, "query_source": str(prompts)}}]).task
    q = load_queries(task, tok, "train", 4, 1)[0]
    want = tok.apply_chat_template([{"role": "system", "content": "Answer in verse."},
                                    {"role": "user", "content": q.text}], add_generation_prompt=True, tokenize=False)
    assert want.startswith("<|system|>Answer in verse.") and want.endswith("<|assistant|>")
    assert q.token_ids == tok(want, add_special_tokens=False)["input_ids"][-task.query_length:]
    assert "<|" not in q.text  # the query's text is what was asked; the template is in its tokens only
    plain = load_config(overrides=[{"task": {"query_source": str(prompts)}}]).task
    assert load_queries(plain, tok, "train", 4, 1)[0].token_ids == tok(q.text)["input_ids"]  # the default: plain text


def test_chat_settings_refused_with_the_field_named(tiny_model_dir, prompts):
    from megacoach.config import load_config
    from megacoach.errors import ConfigError
    from megacoach.lm.loading import load_tokenizer
    from megacoach.tasks import load_queries

    with pytest.raises(ConfigError, match="task.system_prompt needs task.chat_template"):
        load_config(overrides=[{"task": {"system_prompt": "Be brief."}}])
    with pytest.raises(ConfigError, match="task.stop"):
        load_config(overrides=[{"task": {"stop": [""]}}])
    task = load_config(overrides=[{"task": {"chat_template": True, "query_source": str(prompts)}}]).task
    with pytest.raises(ConfigError, match="task.chat_template: the model's tokenizer has no chat template"):
        load_queries(task, load_tokenizer(str(tiny_model_dir)), "train", 2, 1)


# ------------------------------------------------------------------------------------------ the sampler
def test_sampler_stops_rows_pads_after_and_ends_early(chat_model_dir):
    from megacoach.lm.hf import left_pad
    from megacoach.lm.loading import load_causal_lm
    from megacoach.sampling import HFGenerator

    lm, tok = load_causal_lm(str(chat_model_dir))
    gen = HFGenerator(lm, tok.pad_token_id)
    q = left_pad([tok(t)["input_ids"] for t in ["The sun is kind", "My lord, the messenger", "Sit down", "Here"]],
                 tok.pad_token_id, 12)
    stop = torch.arange(2, len(tok) // 2)  # about half the vocabulary: rows stop after a few tokens
    free = gen.generate(q, 10, 1.0, torch.Generator().manual_seed(3))
    calls = []
    hook = gen.trunk.register_forward_hook(lambda *a: calls.append(1))
    try:
        roll = gen.generate(q, 10, 1.0, torch.Generator().manual_seed(3), return_hidden=True, stop_ids=stop)
    finally:
        hook.remove()
    is_stop = torch.isin(roll.responses, stop)
    assert bool(is_stop.any(1).all())  # every row stopped...
    first = is_stop.int().argmax(1)
    assert int(first.max()) < 9 and len(calls) == int(first.max()) + 1  # ...and sampling ended with the last one
    for b in range(q.shape[0]):
        f = int(first[b])
        # up to its stop a row is what it would have been without stops (the same draws); after it, padding
        assert torch.equal(roll.responses[b, :f + 1], free.responses[b, :f + 1])
        assert torch.allclose(roll.logprobs[b, :f + 1], free.logprobs[b, :f + 1], atol=1e-6)
        assert bool((roll.responses[b, f + 1:] == tok.pad_token_id).all())
        assert bool((roll.logprobs[b, f + 1:] == 0).all())
    assert roll.responses.shape == (4, 10) and roll.hidden.shape[:2] == (4, 10)


# ------------------------------------------------------------------------------------------ episodes
def test_rollout_masks_the_tail_after_each_stop(chat_model_dir, prompts):
    from megacoach.ppo import episodes

    tr = _trainer(chat_model_dir, prompts)
    assert tr.stops.early and tr.tok.eos_token_id in tr.stops.end_ids.tolist()
    batch = tr.rollout(tr.next_queries())
    m = batch.mask
    lengths = m.sum(1)
    assert m is not None and bool((lengths < tr.cfg.task.response_length).any())  # some stopped early
    assert bool((m[:, 1:] <= m[:, :-1]).all())  # real tokens, then padding
    pad = tr.pad_id
    assert torch.equal(batch.responses, batch.truncated) and bool((batch.responses[~m] == pad).all())
    # a response is valid exactly when it stopped: at the EOS, at a token with '!', and nothing after
    eos = tr.tok.eos_token_id
    last = batch.truncated.gather(1, (lengths - 1).unsqueeze(1))[:, 0]
    stopped = (last == eos) | torch.tensor(["!" in tr.tok.decode([int(t)]) for t in last])
    assert torch.equal(batch.valid, stopped)
    assert bool((batch.path.scores[~batch.valid] == tr.cfg.task.penalty_reward).all())
    assert all("<|endoftext|>" not in t for t in batch.texts)  # the EOS is in the tokens, not in the text
    for name in ("logprobs", "ref_logprobs", "values"):
        assert bool((getattr(batch, name)[~m] == 0).all()), name
    for name in ("kl", "non_score", "rewards", "advantages", "returns"):
        assert bool((getattr(batch.path, name)[~m] == 0).all()), name
    # the score sits on each episode's last real token
    rows = torch.arange(m.shape[0])
    on_last = batch.path.rewards[rows, lengths - 1] - batch.path.non_score[rows, lengths - 1]
    if not tr.cfg.ppo.whiten_rewards:
        assert torch.allclose(on_last, batch.path.scores)
    # the sampling pass's log-probs and values are one full forward pass's at every real token: left padding and
    # position ids are right for this rotary model, and the padding after a stop changes nothing before it
    T, temp = tr.cfg.task.response_length, tr.cfg.task.temperature
    with torch.no_grad():
        out = tr.apprentice(batch.query_responses, pad, T, temp)
    logits = out.logits.clone()
    logits[..., pad] = float("-inf")  # the sampler never samples the pad token
    lp = torch.log_softmax(logits, -1).gather(-1, batch.responses[..., None])[..., 0]
    assert torch.allclose(batch.logprobs[m], lp[m], atol=1e-5)
    assert torch.allclose(batch.values[m], out.values[m], atol=1e-5)
    _, ref, _, _ = episodes.forward_old(tr, batch.query_responses)
    assert torch.allclose(batch.ref_logprobs[m], ref[m], atol=1e-6)


def test_more_left_padding_changes_no_log_prob(chat_model_dir, prompts):
    from megacoach.ppo import episodes

    tr = _trainer(chat_model_dir, prompts)
    batch = tr.rollout(tr.next_queries())
    lp, _, _, _ = episodes.forward_old(tr, batch.query_responses)
    wider = torch.cat([torch.full((batch.query_ids.shape[0], 7), tr.pad_id, dtype=torch.long), batch.query_responses], 1)
    lp_wide, _, _, _ = episodes.forward_old(tr, wider)
    assert torch.allclose(lp[batch.mask], lp_wide[batch.mask], atol=1e-5)


def test_ppo_update_and_metrics_see_only_real_tokens(chat_model_dir, prompts, monkeypatch):
    from megacoach.ppo import objective

    tr = _trainer(chat_model_dir, prompts)
    seen = []
    orig = objective.policy_loss

    def policy_loss(new_logp, old_logp, advantages, clip=0.2, mask=None):
        seen.append(mask)
        return orig(new_logp, old_logp, advantages, clip, mask)

    monkeypatch.setattr(objective, "policy_loss", policy_loss)
    batch, metrics = tr.step()
    assert seen and all(s is not None and s.shape[1] == tr.cfg.task.response_length for s in seen)
    assert sum(int(s.sum()) for s in seen) == int(batch.mask.sum()) * tr.cfg.ppo.ppo_epochs
    assert metrics["objective/response_tokens"] == pytest.approx(float(batch.mask.float().sum(1).mean()))
    assert all(v == v for v in metrics.values())
    batch2, _ = tr.step()
    assert not torch.equal(batch2.logprobs, batch2.ref_logprobs)  # it trained


def test_stop_strings_spread_over_several_tokens(chat_model_dir):
    """A stop string completed by two tokens ends the response at the second: no single token contains it, so the
    sampler cannot stop there, but the episode's rule does."""
    from megacoach.config import TaskConfig
    from megacoach.lm.loading import load_tokenizer
    from megacoach.ppo import episodes

    tok = load_tokenizer(str(chat_model_dir))
    a, b, x = (tok(w)["input_ids"][0] for w in ("A", "Z", " the"))
    stop = tok.decode([a]) + tok.decode([b])  # 'AZ': the text of the two tokens together
    rule = episodes.stop_rule(tok, TaskConfig(stop=[stop], truncate_token=None))
    assert a not in rule.end_ids.tolist() and b not in rule.end_ids.tolist()
    rows = torch.tensor([[x, a, b, x, x], [x, a, x, b, x]], dtype=torch.long)
    truncated, valid = episodes.settle(rows, rule, tok.pad_token_id)
    assert valid.tolist() == [True, False]
    assert truncated[0].tolist() == [x, a, b, tok.pad_token_id, tok.pad_token_id]
    assert truncated[1].tolist() == rows[1].tolist()  # never stopped: kept whole, and invalid


def test_the_default_task_has_no_stops(tiny_model_dir):
    from megacoach.config import TaskConfig
    from megacoach.lm.loading import load_tokenizer
    from megacoach.ppo import episodes

    rule = episodes.stop_rule(load_tokenizer(str(tiny_model_dir)), TaskConfig())
    assert not rule.early and rule.end_ids is None
    r = torch.tensor([[5, 6, 7]])
    assert episodes.response_mask(rule, r, 1) is None


def test_a_whole_instruct_run(chat_model_dir, prompts, tmp_path):
    from megacoach.cli import main

    out = tmp_path / "run"
    sets = [f"task.{k}={json.dumps(v)}" for k, v in {**STOPS, "query_source": str(prompts)}.items()]
    args = ["train", "--preset", "tiny", "--model", str(chat_model_dir), "--out", str(out), "--no-guards",
            "--set", "run.max_iterations=1", "--set", "labels.num_comparisons=8"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < m["objective/response_tokens"] <= STOPS["response_length"]


def test_stops_make_no_tensor_off_the_models_device(chat_model_dir, prompts):
    """The stop path (sampler's done mask, the stop rule, masks) under the meta default device of test_device."""
    from test_device import explicit_devices

    tr = _trainer(chat_model_dir, prompts)
    with explicit_devices() as found:
        batch, metrics = tr.step()
    assert not found, "tensors or generators made without a device at:\n" + "\n".join(sorted(found))
    assert batch.mask is not None and batch.mask.device.type == "cpu"


# ------------------------------------------------------------------------------------------ the guards with stops
STOP_TASK = {"stop": ["e"], "truncate_token": None}  # the tiny model ends most responses within a few tokens


@pytest.fixture(scope="module")
def stop_rig(tmp_path_factory):
    import guard_helpers as H
    from conftest import build_tiny_model

    md = build_tiny_model(tmp_path_factory.mktemp("stop_model"), embedding_scale=5.0)
    db, coach = H.prepare_tiny(tmp_path_factory.mktemp("stop_guards"), md, task=STOP_TASK)
    return (md, db, coach), H.build_rig((md, db, coach), tmp_path_factory.mktemp("stop_rig"), task=STOP_TASK)


def test_guards_preflight_with_stops_passes_and_catches_flipped_signs(stop_rig):
    from rich.console import Console

    from megacoach.guards import bugs as B
    from megacoach.guards.alarms import GuardFailure
    from megacoach.guards.core import Guards

    _, (cfg, trainer, store, labeler) = stop_rig
    assert trainer.stops.early
    quiet = Console(quiet=True).print
    report = Guards(cfg, trainer, store, labeler, log=quiet).preflight()
    assert report["passed"], report
    for bug, component in (("kl-sign", "Coherence Coach"), ("score-sign", "Megacoach reward")):
        with B.inject(bug), pytest.raises(GuardFailure) as err:
            Guards(cfg, trainer, store, labeler, log=quiet).preflight()
        assert component in err.value.component, str(err.value)


@pytest.mark.slow
def test_guarded_run_with_stops(stop_rig, tmp_path):
    import guard_helpers as H
    from rich.console import Console

    from megacoach.pipeline import train

    (md, db, coach), _ = stop_rig
    run = H.new_run(tmp_path, db)
    summary = train(H.tiny_config(run, md, coach, task=STOP_TASK), console=Console(quiet=True))
    assert summary["iterations"] == 2
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["objective/response_tokens"] < 8 and "guard/score_gap" in m
