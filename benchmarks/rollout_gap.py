#!/usr/bin/env python
"""How far PPO's old log-probs are from the update's own forward before the first step, per precision and
ppo.rollout_pass: the largest and the mean |new - old| over one rollout's response tokens, and the mean PPO ratio.

The old log-probs come from the KV-cached sampling pass ('sampling') or from a full forward ('forward'); the update
recomputes them with a full forward in training mode. In fp32 the two agree up to float rounding; in bf16-mixed the
decode and the full forward round differently (docs/hardware.md), which is why ppo.rollout_pass=auto takes the
forward pass in any precision but fp32.

  python benchmarks/rollout_gap.py [--model builtin] [--batch-size 32] [--threads 2]

Prints one JSON line per (precision, rollout pass) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gap(model: str, precision: str, rollout_pass: str, batch_size: int, seed: int) -> dict:
    import torch

    from megacoach.config import load_config
    from megacoach.pipeline import build_trainer

    cfg = load_config(overrides=[{"model": {"name_or_path": model, "precision": precision},
                                  "ppo": {"rollout_pass": rollout_pass, "batch_size": batch_size,
                                          "mini_batch_size": batch_size},
                                  "run": {"device": "cpu", "seed": seed}}])
    torch.manual_seed(seed)
    tr = build_trainer(cfg)
    batch = tr.rollout(tr.next_queries())
    t = cfg.task
    tr.apprentice.train()
    with torch.no_grad():
        out = tr.apprentice(batch.query_responses, tr.pad_id, t.response_length, t.temperature,
                            responses=batch.responses)
    diff = out.logprobs - batch.logprobs
    return {"precision": precision, "rollout_pass": rollout_pass, "max_abs_gap": float(diff.abs().max()),
            "mean_abs_gap": float(diff.abs().mean()), "mean_ratio": float(diff.exp().mean()),
            "tokens": int(diff.numel()), "model": model}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    for precision in ("fp32", "bf16-mixed"):
        for rollout_pass in ("sampling", "forward"):
            print(json.dumps(gap(a.model, precision, rollout_pass, a.batch_size, a.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
