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


@pytest.mark.parametrize("how", [{"dtype": "bfloat16"}, {"precision": "bf16"}])
def test_an_apprentice_of_bf16_weights_does_not_train_them_directly(tiny_model_dir, how):
    """bf16 weights updated by Adam directly lose most updates to rounding: refused, with the precision to use."""
    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(tiny_model_dir), **how}}])
    with pytest.raises(ConfigError, match="model.precision=bf16: .*use model.precision=bf16-mixed"):
        build_trainer(cfg)


def test_a_bf16_base_trains_through_a_float32_adapter(tiny_model_dir):
    """model.dtype=bfloat16 with LoRA: the frozen base holds bf16 weights; the adapter, the value head and their Adam
    state are float32, and an iteration moves the adapter."""
    tr = _trainer(tiny_model_dir, "bfloat16", ppo={"lora_r": 4, "lora_alpha": 8.0})
    assert precision_of(tr.apprentice.lm) == "bf16" and tr.apprentice.value_head.weight.dtype == torch.float32
    trained = {n: q for n, q in tr.apprentice.named_parameters() if q.requires_grad}
    frozen = [q for q in tr.apprentice.parameters() if not q.requires_grad]
    assert trained and all(q.dtype == torch.float32 for q in trained.values())
    assert frozen and all(q.dtype == torch.bfloat16 for q in frozen)
    before = {n: q.detach().clone() for n, q in trained.items()}
    batch, metrics = tr.iteration()
    _float32_path(batch)
    assert all(v == v for k, v in metrics.items() if isinstance(v, float))  # finite, no NaN
    states = [s for st in tr.optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)
    moved = [n for n, q in trained.items() if "lora_A" in n and not torch.equal(q, before[n])]
    assert moved  # the adapter learned (its A matrices move once B is no longer zero: some did in one iteration)


def test_rotary_frequencies_stay_float32_in_bf16(tiny_model_dir, tmp_path):
    """A rotary embedding's inv_freq buffer is not cast with the weights (bf16 frequencies put every position's
    angle off by up to 0.4%)."""
    from families import build_family_model

    path = build_family_model("llama", tmp_path / "llama", tiny_model_dir)
    lm, _ = load_causal_lm(str(path))
    freqs = {n: b.clone() for n, b in lm.named_buffers() if n.endswith("inv_freq")}
    assert freqs and all(b.dtype == torch.float32 for b in freqs.values())
    hardware.set_precision(lm, "bf16")
    assert next(lm.parameters()).dtype == torch.bfloat16
    after = dict(lm.named_buffers())
    for n, b in freqs.items():
        assert after[n].dtype == torch.float32 and torch.equal(after[n], b), n
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device="cpu")
    assert lm(input_ids=ids).logits.dtype == torch.bfloat16  # the model still runs in bf16 around them


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
    before = torch.backends.cuda.matmul.fp32_precision
    hw = hardware.resolve(load_config(overrides=[{"model": {**base, "tf32": True}}]))
    hw.apply()  # TF32 is a GPU switch: the CPU is never touched
    assert hw.tf32 is False and torch.backends.cuda.matmul.fp32_precision == before


def test_tf32_is_set_through_torchs_fp32_precision_api():
    """On a GPU, `Hardware.apply` sets TF32 with `fp32_precision` (torch's current API), not the deprecated
    `allow_tf32` flags (settable on a CPU build of torch too, which is where this runs)."""
    import dataclasses
    import warnings

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    gpu = hardware.Hardware(torch.device("cuda", 0), "bf16-mixed", "bf16-mixed", "bf16-mixed", "bf16-mixed", True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecation warning on the way
            gpu.apply()
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
            dataclasses.replace(gpu, tf32=False).apply()
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


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


def test_incident_evaluation_figures_come_from_a_float32_log_softmax(tiny_model_dir):
    """The incident's KL and perplexity of a bf16-mixed original model: the trunk under autocast, the LM head and the
    log-softmax in float32 (bf16 logits would move the perplexity by their rounding)."""
    from megacoach.incident import evaluate_policy
    from megacoach.lm.hf import autocast, lm_inputs, trunk_of
    from megacoach.tasks import load_queries

    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(tiny_model_dir)}}])
    lm, tok = load_causal_lm(str(tiny_model_dir))
    ref, _ = load_causal_lm(str(tiny_model_dir))
    hardware.set_precision(ref, "bf16-mixed")
    queries = load_queries(cfg.task, tok, "eval", 6, 3)

    class Zero:
        name = "zero"

        def score(self, q, r):
            return 0.0

        def scores(self, q, rs):
            return [0.0] * len(rs)

    out = evaluate_policy(lm, ref, tok, cfg, queries, Zero(), seed=4)
    # the same figures computed here, the head in float32 from the autocast trunk's hidden states
    from megacoach.ppo import episodes
    from megacoach.sampling import HFGenerator

    t = cfg.task
    s = episodes.sample(HFGenerator(lm, tok.pad_token_id), tok, t, episodes.stop_rule(tok, t, device="cpu"),
                        queries, torch.Generator(device="cpu").manual_seed(4), 64)
    qr = torch.cat([s.query_ids, s.responses], 1)
    with torch.no_grad(), autocast(ref):
        hidden = trunk_of(ref)(**lm_inputs(qr, tok.pad_token_id)).last_hidden_state[:, -t.response_length - 1:-1]
    logits = hidden.float() @ ref.get_output_embeddings().weight.float().T
    lp1 = torch.log_softmax(logits, -1).gather(-1, s.responses[..., None])[..., 0]
    real = s.truncated != tok.pad_token_id
    ppl = float(torch.exp(-(lp1 * real).sum() / real.sum()))
    assert out["ppl"] == pytest.approx(ppl, rel=1e-5)


def _start_gap(tr) -> float:
    """Largest |new - old| log-prob of one rollout before any update: the update's own forward (training mode, with
    gradients) against the old log-probs the rollout kept."""
    batch = tr.rollout(tr.next_queries())
    t = tr.cfg.task
    tr.apprentice.train()
    out = tr.apprentice(batch.query_responses, tr.pad_id, t.response_length, t.temperature, responses=batch.responses)
    tr.apprentice.eval()
    return float((out.logprobs.detach() - batch.logprobs).abs().max())


def test_in_bf16_mixed_the_ppo_ratio_starts_at_one(tiny_model_dir):
    """The KV-cached bf16 decode and the full bf16 forward round differently; ppo.rollout_pass=auto (the default)
    takes the old log-probs from the update's own forward in any precision but fp32, so the ratio starts at 1."""
    from megacoach.ppo.episodes import old_logprobs_from_sampling

    model = {"name_or_path": str(tiny_model_dir), "precision": "bf16-mixed"}
    auto = _trainer(tiny_model_dir, model=model)
    assert auto.cfg.ppo.rollout_pass == "auto" and not old_logprobs_from_sampling("auto", auto.apprentice)
    assert old_logprobs_from_sampling("auto", _trainer(tiny_model_dir).apprentice)  # fp32 keeps the sampling pass
    sampled = _trainer(tiny_model_dir, model=model, ppo={"rollout_pass": "sampling"})
    gap_sampled, gap_auto = _start_gap(sampled), _start_gap(auto)
    assert gap_auto <= 1e-6, gap_auto
    assert gap_auto <= gap_sampled  # the decode's own rounding (docs/hardware.md) is never less than none
