"""LoRA through PEFT (ppo.lora_r): only the adapter and the value head train, the original model is the base with
the adapter off (its log-probs are the base model's exactly, the KL is 0 at the start), checkpoints hold what
trains and resume, and the merged model computes what the adapted one does."""

from __future__ import annotations

import io

import pytest
import torch

LORA = {"lora_r": 4, "lora_alpha": 8.0, "rollout_pass": "forward"}


def _trainer(model_dir, **ppo):
    from megacoach.config import load_config
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(model_dir)}, "ppo": {**LORA, **ppo},
                                                 "run": {"max_iterations": 2}}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(model_dir))
    coach = RewardModel.from_base(str(model_dir), tokenizer=tok, seed=0).eval()
    return build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=load_queries(cfg.task, tok, "train", 32, 31))


def _base_logprobs(model_dir, qr, tr):
    from megacoach.lm.loading import load_causal_lm
    from megacoach.ppo.policy import reference_logprobs

    base, _ = load_causal_lm(str(model_dir))
    t = tr.cfg.task
    return reference_logprobs(base, qr, tr.pad_id, t.response_length, t.temperature, tr.cfg.ppo.fused_head)


def test_only_adapter_and_value_head_train_and_reference_is_the_base(tiny_model_dir):
    tr = _trainer(tiny_model_dir)
    before = {n: q.detach().clone() for n, q in tr.apprentice.named_parameters()}
    trainable = {n for n, q in tr.apprentice.named_parameters() if q.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    batch, metrics = tr.step()
    assert torch.equal(batch.ref_logprobs, _base_logprobs(tiny_model_dir, batch.query_responses, tr))
    assert torch.equal(batch.path.kl, torch.zeros_like(batch.path.kl))  # the adapter starts as the identity
    changed = {n for n, q in tr.apprentice.named_parameters() if not torch.equal(q, before[n])}
    assert any("lora_B" in n for n in changed)
    assert changed <= trainable
    batch2, _ = tr.step()  # after an update: the reference is still the base exactly, the Apprentice has moved
    assert torch.equal(batch2.ref_logprobs, _base_logprobs(tiny_model_dir, batch2.query_responses, tr))
    assert not torch.equal(batch2.logprobs, batch2.ref_logprobs)


def test_checkpoint_holds_what_trains_and_resumes(tiny_model_dir):
    a = _trainer(tiny_model_dir)
    a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as RunDir.save_checkpoint / latest_checkpoint: no tensor shared with `a`
    buf.seek(0)
    state = torch.load(buf, map_location="cpu", weights_only=False)
    assert set(state["apprentice"]) == {n for n, q in a.apprentice.named_parameters() if q.requires_grad}
    b = _trainer(tiny_model_dir)
    b.load_state_dict(state)
    _, ma = a.step()
    _, mb = b.step()
    assert {k: v for k, v in ma.items() if not k.startswith("time/")} == \
        {k: v for k, v in mb.items() if not k.startswith("time/")}


def test_lora_settings_refused_with_a_clear_message(tiny_model_dir):
    from megacoach.config import load_config
    from megacoach.errors import ConfigError

    with pytest.raises(ConfigError, match="separate_value_model"):
        load_config(overrides=[{"ppo": {"lora_r": 4, "separate_value_model": True}}])
    with pytest.raises(ConfigError, match="LM head"):
        _trainer(tiny_model_dir, lora_target_modules=["lm_head"])


def test_export_merged_computes_the_adapted_model(tiny_model_dir, tmp_path):
    from megacoach.cli import main
    from megacoach.config import save_config
    from megacoach.lm.hf import lm_inputs
    from megacoach.lm.loading import load_causal_lm

    tr = _trainer(tiny_model_dir)
    tr.step()
    run = tmp_path / "run"
    save_config(tr.cfg, run / "config.yaml")
    tr.apprentice.lm.save_pretrained(run / "apprentice")  # what PPOLoop.finish writes: the adapter
    tr.tok.save_pretrained(run / "apprentice")
    assert (run / "apprentice" / "adapter_config.json").is_file()
    assert main(["export-merged", str(run), str(tmp_path / "merged")]) == 0
    merged, _ = load_causal_lm(str(tmp_path / "merged"))
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]], dtype=torch.long, device="cpu")
    with torch.no_grad():
        want = tr.apprentice.lm(**lm_inputs(ids, tr.pad_id)).logits
        got = merged(**lm_inputs(ids, tr.pad_id)).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, tr.ref_lm(**lm_inputs(ids, tr.pad_id)).logits, atol=1e-6)
