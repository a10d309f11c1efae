#!/usr/bin/env python
"""Sampling benchmark: continuations per second of the built-in model with the task's settings, megacoach's
inverse-CDF draw (`megacoach.sampling.sample_categorical`) against `torch.multinomial`, the same model, queries and
KV-cached loop.

  .venv/bin/python benchmarks/sampling.py                    # 128 queries x 4 continuations, batches of 128
  .venv/bin/python benchmarks/sampling.py --batch-sizes 64,128,256 --repeats 3

Each figure is the best of --repeats timed passes (after one untimed warm-up). Labeling (`megacoach label auto`,
the demo's first phase) and every PPO rollout sample this way. Ends with one JSON line:
  {"samples_per_s": {"inverse_cdf": {BATCH: ...}, "multinomial": {BATCH: ...}}, "speedup": {BATCH: ...}}
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="base model: 'builtin' (default), a folder or a hub name")
    p.add_argument("--queries", type=int, default=128, help="distinct queries")
    p.add_argument("--k", type=int, default=4, help="continuations per query (as for best-of-K labels)")
    p.add_argument("--batch-sizes", default="128", help="sequences per generate call, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting (the best is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    import megacoach.sampling as sampling
    from megacoach.config import TaskConfig
    from megacoach.lm.loading import load_causal_lm
    from megacoach.continuations import TaskSampler
    from megacoach.tasks import load_queries

    torch.set_num_threads(a.threads)
    model, tok = load_causal_lm(a.model)
    model.eval()
    task = TaskConfig()
    queries = load_queries(task, tok, "train", a.queries, a.seed)
    sampler = TaskSampler(sampling.HFGenerator(model, tok.pad_token_id), tok, task)
    inverse_cdf = sampling.sample_categorical

    def multinomial(logp, generator=None):
        return torch.multinomial(logp.exp(), 1, generator=generator)

    sizes = [int(x) for x in a.batch_sizes.split(",")]
    out: dict = {"inverse_cdf": {}, "multinomial": {}}
    n = a.queries * a.k
    try:
        for name, fn in (("inverse_cdf", inverse_cdf), ("multinomial", multinomial)):
            sampling.sample_categorical = fn  # HFGenerator.generate looks the draw up at call time
            sampler.continuations(queries[:4], 1, torch.Generator().manual_seed(0))  # warm-up
            for bs in sizes:
                best = float("inf")
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    sampler.continuations(queries, a.k, torch.Generator().manual_seed(a.seed), batch_size=bs)
                    best = min(best, time.perf_counter() - t0)
                out[name][bs] = round(n / best, 1)
                print(f"{name:12s} batch {bs:4d}: {n / best:7.1f} samples/s ({n} samples of {task.response_length} "
                      f"tokens in {best:.2f} s)", flush=True)
    finally:
        sampling.sample_categorical = inverse_cdf
    speedup = {bs: round(out["inverse_cdf"][bs] / out["multinomial"][bs], 2) for bs in sizes}
    print(json.dumps({"samples_per_s": out, "speedup": speedup, "threads": a.threads, "k": a.k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
