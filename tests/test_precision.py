"""Numeric precision on the CPU, one switch at a time, on the tiny model (bf16 on the CPU is slow but correct).

model.precision: fp32 (the CPU default), bf16-mixed (float32 master weights and optimiser state, bf16 autocast for
the forward passes, log-probs, values, advantages and losses in float32), bf16 (bfloat16 weights); the older
model.dtype=bfloat16; model.reference_precision and reward.precision for the models that only infer.
"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from megacoach import hardware
from megacoach.config import load_config
from megacoach.errors import ConfigError
from megacoach.lm.hf import precision_of
from megacoach.lm.loading import load_causal_lm
from megacoach.pipeline import build_trainer
from megacoach.reward.model import RewardModel
from megacoach.tasks import load_queries


def _trainer(model_dir, dtype: str = "float32", **sections):
    over = [{"model": {"name_or_path": str(model_dir), "dtype": dtype}}]
    over += [{k: v} for k, v in sections.items()]
    cfg = load_config(preset="tiny", overrides=over)
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(model_dir), dtype)
    coach = RewardModel.from_base(str(model_dir), dtype=dtype, tokenizer=tok, seed=0).eval()
    return build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=load_queries(cfg.task, tok, "train", 32, 31))


def _float32_path(batch) -> None:
    for name in ("logprobs", "ref_logprobs", "values", "raw_scores"):
        assert getattr(batch, name).dtype == torch.float32, name
    for name in ("kl", "rewards", "advantages", "returns"):
        assert getattr(batch.path, name).dtype == torch.float32, name


def test_the_older_bf16_dtype_gets_through_an_iteration(tiny_model_dir):
    """model.dtype=bfloat16 used to fail at the first PPO iteration (the float32 value head read bf16 states)."""
    tr = _trainer(tiny_model_dir, "bfloat16")
    assert precision_of(tr.apprentice.lm) == "bf16" and tr.apprentice.value_head.weight.dtype == torch.float32
    batch, metrics = tr.iteration()
    _float32_path(batch)
    assert all(v == v for k, v in metrics.items() if isinstance(v, float))  # finite, no NaN


def _autocast_dtypes(module) -> list:
    """Hooks recording the output dtype of every Linear/Conv1D in `module`'s trunk."""
    seen = []
    for m in module.modules():
        if type(m).__name__ in ("Linear", "Conv1D"):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_bf16_mixed_keeps_float32_masters_and_a_float32_path(tiny_model_dir):
    fp32 = _trainer(tiny_model_dir)
    mixed = _trainer(tiny_model_dir, model={"name_or_path": str(tiny_model_dir), "precision": "bf16-mixed"})
    assert precision_of(mixed.apprentice.lm) == "bf16-mixed" and precision_of(mixed.ref_lm) == "bf16-mixed"
    assert mixed.values_coach.precision == "bf16-mixed"
    seen = _autocast_dtypes(mixed.apprentice.lm.transformer)
    batch, _ = mixed.iteration()
    assert torch.bfloat16 in seen  # the trunk's matmuls ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in mixed.apprentice.parameters())  # ... on float32 master weights
    states = [s for st in mixed.optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)  # and float32 optimiser state
    _float32_path(batch)
    # the same responses scored in fp32: bf16 forward passes change the log-probs a little, not their meaning
    again = fp32.apprentice(batch.query_responses, fp32.pad_id, 8, 0.7).logits
    lp32 = torch.log_softmax(again, -1).gather(-1, batch.responses[..., None])[..., 0]
    assert (lp32 - batch.logprobs).abs().max() < 0.1


def test_models_that_only_infer_can_hold_bf16_weights(tiny_model_dir):
    fp32 = _trainer(tiny_model_dir)
    tr = _trainer(tiny_model_dir, model={"name_or_path": str(tiny_model_dir), "reference_precision": "bf16"},
                  reward={"precision": "bf16"})
    assert next(tr.ref_lm.parameters()).dtype == torch.bfloat16 and precision_of(tr.apprentice.lm) == "fp32"
    coach = tr.values_coach
    assert next(coach.trunk.parameters()).dtype == torch.bfloat16 and coach.head.weight.dtype == torch.float32
    batch, _ = tr.iteration()
    _float32_path(batch)
    qr = batch.query_truncated
    assert (fp32.values_coach(qr) - coach(qr)).abs().max() < 0.1  # bf16 trunk, float32 head: close to fp32
    from megacoach.ppo import episodes

    ref32 = episodes.reference_logprobs(fp32, batch.query_responses)
    assert (ref32 - batch.ref_logprobs).abs().max() < 0.1


def test_a_values_coach_trains_in_bf16_mixed_on_float32_weights(tiny_model_dir):
    from megacoach.config import RewardConfig
    from megacoach.reward.data import Comparison
    from megacoach.reward.train import retrain_from_scratch

    comps = [Comparison([5, 6, 7, 8], [[9, 10, 11], [12, 13]], i % 2) for i in range(8)]
    coach, metrics = retrain_from_scratch(str(tiny_model_dir), comps, comps[:4], RewardConfig(batch_size=4),
                                          log=None, precision="bf16-mixed")
    assert coach.precision == "bf16-mixed" and metrics["steps"] == 2
    assert all(p.dtype == torch.float32 for p in coach.parameters())
    assert coach(torch.tensor([[5, 6, 7, 9]], device="cpu")).dtype == torch.float32


def test_precision_settings_resolve_and_contradictions_are_refused(tiny_model_dir):
    base = {"name_or_path": str(tiny_model_dir)}
    hw = hardware.resolve(load_config(overrides=[{"model": {**base, "dtype": "bfloat16"}}]))
    assert (hw.apprentice, hw.reference, hw.values_coach, hw.values_coach_training) == ("bf16", "bf16", "bf16",
                                                                                        "bf16-mixed")
    hw = hardware.resolve(load_config(overrides=[{"model": {**base, "precision": "bf16-mixed",
                                                            "reference_precision": "bf16"}}]))
    assert (hw.apprentice, hw.reference, hw.values_coach) == ("bf16-mixed", "bf16", "bf16-mixed")
    with pytest.raises(ConfigError, match="model.dtype"):
        hardware.resolve(load_config(overrides=[{"model": {**base, "dtype": "bfloat16", "precision": "fp32"}}]))
    before = torch.backends.cuda.matmul.allow_tf32
    hw = hardware.resolve(load_config(overrides=[{"model": {**base, "tf32": True}}]))
    hw.apply()  # TF32 is a GPU switch: the CPU is never touched
    assert hw.tf32 is False and torch.backends.cuda.matmul.allow_tf32 == before


def test_a_run_says_which_precision_each_model_runs_in(tiny_model_dir, tmp_path):
    from megacoach.pipeline import train

    out = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(tiny_model_dir)},
                                                 "run": {"out": str(out), "max_iterations": 1},
                                                 "labels": {"num_comparisons": 8}}])
    console = Console(record=True, width=200)
    train(cfg, console=console)
    saved = json.loads((out / "precision.json").read_text())
    assert saved["device"] == "cpu" and saved["apprentice"] == "fp32" and saved["values_coach"] == "fp32"
    assert saved["original_model"] == "fp32" and saved["value_head"] == "fp32"
    assert "hardware: device cpu: Apprentice fp32" in console.export_text()
