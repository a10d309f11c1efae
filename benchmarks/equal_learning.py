#!/usr/bin/env python
"""Equal-learning benchmark: megacoach's optimised PPO path and its straightforward path, same seed and data,
give the same `objective/*` trajectory within noise.

  straightforward: old log-probs and values recomputed in a second full forward pass of the Apprentice after
                   sampling (as ORIG), GPT-2's own Python GELU, a growing KV cache, Adam one parameter at a time,
                   the response head and the original model's log-probs through autograd's ops on whole logits;
  optimised:       old log-probs and values kept from the KV-cached sampling pass, fused GELU kernel, the static
                   KV cache (model.static_cache), fused Adam (ppo.fused_optimizer) and the fused response head
                   (ppo.fused_head; run.compile where it does not serve) — every lever megacoach keeps on by
                   default.

Both runs use the built-in model, built-in queries, and the same Values Coach (--values-coach DIR, e.g.
runs/demo/values_coach; by default a fresh head on the base model, normalised — fine for comparing paths).
"Noise" is the same straightforward path with another seed: the optimised path must stay closer to the
straightforward one than a different seed does. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

KEYS = ("objective/score", "objective/kl", "objective/entropy", "objective/score_total", "objective/kl_coef")


def run(path: str, seed: int, a) -> tuple[list[dict], float]:
    import torch

    from megacoach.config import load_config
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import seed_everything
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    on = path == "optimised"
    over = {"run": {"seed": seed, "threads": a.threads, "compile": on},
            "ppo": {"total_episodes": a.iterations * 64, "rollout_pass": "sampling" if on else "forward",
                    "fused_optimizer": on, "fused_head": on},
            "model": {"fused_activation": on, "static_cache": on}}
    if path != "optimised":  # the levers off: one scoring pass over the whole batch
        over["ppo"]["forward_batch_size"] = 64
    cfg = load_config(overrides=[over])
    seed_everything(seed, a.threads, cfg.run.mmap_threshold_mib)
    policy, tok = load_causal_lm("builtin", fused_activation=cfg.model.fused_activation)
    if a.values_coach:
        coach = RewardModel.from_pretrained(a.values_coach, policy_tokenizer=tok)
    else:
        coach = RewardModel.from_base("builtin", tokenizer=tok, seed=0)
    coach.eval()
    queries = load_queries(cfg.task, tok, "train", 512, 31)
    trainer = build_trainer(cfg, lm=policy, tok=tok, values_coach=coach, queries=queries)
    rows = []
    t0 = time.time()
    for _ in range(trainer.n_iterations):
        _, m = trainer.iteration()
        rows.append({k: m[k] for k in ("iteration",) + KEYS})
        print(f"{path} seed {seed} it {m['iteration']}: " + "  ".join(f"{k.split('/')[1]} {m[k]:+.4f}" for k in KEYS),
              file=sys.stderr)
    del torch
    return rows, time.time() - t0


def max_gap(a_rows, b_rows, key) -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a_rows, b_rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--values-coach", default="")
    a = p.parse_args(argv)
    straight, t_s = run("straightforward", a.seed, a)
    optim, t_o = run("optimised", a.seed, a)
    other, _ = run("straightforward", a.seed + 1000, a)
    result = {"iterations": a.iterations, "seconds": {"straightforward": round(t_s, 1), "optimised": round(t_o, 1)},
              "max_gap_optimised_vs_straightforward": {k: round(max_gap(optim, straight, k), 5) for k in KEYS},
              "max_gap_other_seed (noise)": {k: round(max_gap(other, straight, k), 5) for k in KEYS},
              "trajectories": {"straightforward": straight, "optimised": optim, "straightforward_other_seed": other}}
    result["equal_within_noise"] = all(result["max_gap_optimised_vs_straightforward"][k]
                                       <= result["max_gap_other_seed (noise)"][k] for k in KEYS if k != "objective/kl_coef")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
