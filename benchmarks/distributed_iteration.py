#!/usr/bin/env python
"""Speed of one PPO iteration on 1 process and on N data-parallel processes (megacoach/distributed.py).

Starts each configuration as a launcher would (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on 127.0.0.1: gloo on CPUs) and runs the PPO trainer exactly as `megacoach train` does: rank 0
calls `trainer.iteration()`, the other ranks `trainer.lockstep.follow(trainer)`. Model: the built-in Shakespeare GPT-2 (or
--model); the global batch is the same for every process count. Rank 0 reports the wall time of each
iteration and the part of it spent in collectives (gathering the rollout, the gradient all-reduce, metric
reductions, messages), measured by timing the `Dist` methods.

    .venv/bin/python benchmarks/distributed_iteration.py                       # 1 process x 2 threads, 2 x 1
    .venv/bin/python benchmarks/distributed_iteration.py --runs 1x1 1x2 2x1    # PROCESSESxTHREADS

Prints progress to stderr and, last, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLLECTIVES = ("gather", "gather_object", "broadcast_object", "all_sum", "reduce_gradients", "mean_metrics",
               "run_on_main")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["1x2", "2x1"], help="PROCESSESxTHREADS configurations to time")
    p.add_argument("--model", default="builtin")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--query-length", type=int, default=32)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the JSON file rank 0 writes its figures to
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worker(a) -> None:
    import torch

    import megacoach  # noqa: F401
    from megacoach.config import build_config
    from megacoach.distributed import Dist
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    torch.set_num_threads(a.threads)
    dist = Dist.from_env()
    spent = {"s": 0.0}
    for name in COLLECTIVES:  # time every collective this process takes part in
        inner = getattr(dist, name)

        def timed(*args, _inner=inner, **kw):
            t = time.perf_counter()
            try:
                return _inner(*args, **kw)
            finally:
                spent["s"] += time.perf_counter() - t
        setattr(dist, name, timed)

    cfg = build_config({
        "model": {"name_or_path": a.model},
        "task": {"query_length": a.query_length, "response_length": a.response_length},
        "kl": {"adaptive": False, "init_kl_coef": 0.05},
        "ppo": {"batch_size": a.batch_size, "mini_batch_size": a.mini_batch_size, "ppo_epochs": a.ppo_epochs,
                "total_episodes": a.batch_size * (a.warmup + a.iterations)},
        "run": {"seed": a.seed, "threads": a.threads},
    })
    torch.manual_seed(dist.seed(a.seed))
    policy, tok = load_causal_lm(a.model)
    coach = RewardModel.from_base(a.model, tokenizer=tok, seed=a.seed).eval()
    queries = load_queries(cfg.task, tok, "train", 512, a.seed + 31)
    trainer = build_trainer(cfg, lm=policy, tok=tok, values_coach=coach, queries=queries, dist=dist)
    if not dist.is_main:
        trainer.lockstep.follow(trainer)
        dist.close()
        return
    rows = []
    for i in range(a.warmup + a.iterations):
        spent["s"] = 0.0
        t = time.perf_counter()
        _, m = trainer.iteration()
        dt = time.perf_counter() - t
        rows.append({"iteration_s": dt, "rollout_s": m["time/rollout_s"], "collectives_s": spent["s"],
                     "counted": i >= a.warmup})
        log(f"  {dist.processes} x {a.threads}: iteration {i + 1} {dt:.2f}s (rollout {m['time/rollout_s']:.2f}s, "
            f"collectives {spent['s']:.2f}s){'' if i >= a.warmup else ' warm-up'}")
    if trainer.lockstep is not None:
        trainer.lockstep.release()
    dist.close()
    with open(a.worker, "w") as f:
        json.dump(rows, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a, processes: int, threads: int) -> list[dict]:
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    port = free_port()
    args = [sys.executable, os.path.abspath(__file__), "--worker", out, "--threads", str(threads),
            "--model", a.model, "--batch-size", str(a.batch_size), "--mini-batch-size", str(a.mini_batch_size),
            "--ppo-epochs", str(a.ppo_epochs), "--query-length", str(a.query_length),
            "--response-length", str(a.response_length), "--iterations", str(a.iterations),
            "--warmup", str(a.warmup), "--seed", str(a.seed)]
    procs = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads)}
        if processes == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        procs.append(subprocess.Popen(args, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{processes} x {threads}: exit codes {codes}")
    with open(out) as f:
        rows = json.load(f)
    os.unlink(out)
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    results = []
    for run in a.runs:
        processes, threads = (int(x) for x in run.split("x"))
        log(f"{processes} process(es) x {threads} thread(s), global batch {a.batch_size}:")
        rows = [r for r in launch(a, processes, threads) if r["counted"]]
        med = {k: round(statistics.median(r[k] for r in rows), 3) for k in ("iteration_s", "rollout_s", "collectives_s")}
        results.append({"processes": processes, "threads_each": threads, **{f"median_{k}": v for k, v in med.items()},
                        "iterations_s": [round(r["iteration_s"], 3) for r in rows]})
    print(json.dumps({"benchmark": "distributed_iteration", "model": a.model, "batch_size": a.batch_size,
                      "mini_batch_size": a.mini_batch_size, "ppo_epochs": a.ppo_epochs,
                      "query_length": a.query_length, "response_length": a.response_length,
                      "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
