#!/usr/bin/env python
"""Sampling benchmark: continuations per second of the built-in model with the task's settings (query 64, response
24, temperature 0.7), as label collection samples them (K continuations per query sharing the query's prefill), for
each KV cache (`static`: model.static_cache, preallocated; `growing`: transformers' DynamicCache, grown by
concatenation) and each draw (megacoach's inverse-CDF `sampling.sample_categorical`, or `torch.multinomial`).

  .venv/bin/python benchmarks/sampling.py                                   # static vs growing, batches 64-512
  .venv/bin/python benchmarks/sampling.py --draws inverse_cdf,multinomial --caches static

Each figure is the best of --repeats timed passes (after one untimed warm-up), in wall-clock seconds, with the
process's CPU seconds beside it (a pass whose CPU time is far below threads x wall time was disturbed). Prints this
machine's fp32 matmul peak. Ends with one JSON line:
  {"samples_per_s": {"static/inverse_cdf": {BATCH: ...}, ...}, "cpu_s": {...}, "matmul_peak_gflop_per_s": ...}
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
    p.add_argument("--batch-sizes", default="64,128,256,512", help="sequences per generate call, comma-separated")
    p.add_argument("--caches", default="static,growing", help="KV caches to time: static, growing")
    p.add_argument("--draws", default="inverse_cdf", help="draws to time: inverse_cdf, multinomial")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting (the best is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    import megacoach.sampling as sampling
    from megacoach.config import TaskConfig
    from megacoach.continuations import TaskSampler
    from megacoach.lm.loading import load_causal_lm
    from megacoach.tasks import load_queries

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from ppo_iteration import matmul_peak_gflops

    torch.set_num_threads(a.threads)
    model, tok = load_causal_lm(a.model)
    model.eval()
    task = TaskConfig()
    queries = load_queries(task, tok, "train", a.queries, a.seed)
    inverse_cdf = sampling.sample_categorical

    def multinomial(logp, generator=None):
        return torch.multinomial(logp.exp(), 1, generator=generator)

    draws = {"inverse_cdf": inverse_cdf, "multinomial": multinomial}
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    rate: dict = {}
    cpu: dict = {}
    n = a.queries * a.k
    try:
        for cache in a.caches.split(","):
            sampler = TaskSampler(sampling.HFGenerator(model, tok.pad_token_id, use_static_cache=cache == "static"),
                                  tok, task)
            for draw in a.draws.split(","):
                sampling.sample_categorical = draws[draw]  # HFGenerator.generate looks the draw up at call time
                sampler.continuations(queries[:8], a.k, torch.Generator().manual_seed(0))  # warm-up
                key = f"{cache}/{draw}"
                rate[key], cpu[key] = {}, {}
                for bs in sizes:
                    best, best_cpu = float("inf"), 0.0
                    for _ in range(a.repeats):
                        t0, c0 = time.perf_counter(), time.process_time()
                        sampler.continuations(queries, a.k, torch.Generator().manual_seed(a.seed), batch_size=bs)
                        if time.perf_counter() - t0 < best:
                            best, best_cpu = time.perf_counter() - t0, time.process_time() - c0
                    rate[key][bs], cpu[key][bs] = round(n / best, 1), round(best_cpu, 2)
                    print(f"{key:24s} batch {bs:4d}: {n / best:7.1f} continuations/s ({n} of {task.response_length} "
                          f"tokens in {best:.2f} s, {best_cpu:.2f} CPU s)", flush=True)
    finally:
        sampling.sample_categorical = inverse_cdf
    peak = matmul_peak_gflops(torch.device("cpu"), torch.float32, a.threads)
    print(f"this machine's fp32 matmul peak: {peak:.0f} GFLOP/s ({a.threads} threads)")
    print(json.dumps({"samples_per_s": rate, "cpu_s": cpu, "matmul_peak_gflop_per_s": round(peak, 1),
                      "threads": a.threads, "k": a.k, "queries": a.queries}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
