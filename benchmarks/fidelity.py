#!/usr/bin/env python
"""Fidelity benchmark: does the demo's RLHF run learn what the human evaluators (mock: VADER) prefer,
under the Coherence Coach, while staying fluent?

Runs `megacoach train` on the built-in defaults (the `make demo` settings) unless --run-dir points at a finished
run, then reports:
  - the labeler score on the fixed held-out queries, initial vs final Apprentice (before_after.jsonl), and the rise
    in units of the initial policy's per-sample standard deviation (target: >= 1 sd);
  - the KL to the original model at the end against the adaptive target (target: within +-20%);
  - the perplexity of initial and final samples under the original model (fluency: final should stay close);
  - the curve (labeler/score, objective/score, objective/kl, objective/kl_coef per iteration).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


def perplexity(model, tok, queries: list[str], responses: list[str], query_length: int) -> float:
    """Perplexity of responses (given their queries) under `model`."""
    import torch

    from megacoach.lm.hf import lm_inputs

    nll, n = 0.0, 0
    with torch.inference_mode():
        for q, r in zip(queries, responses):
            q_ids = tok(q)["input_ids"][-query_length:]
            r_ids = tok(r)["input_ids"]
            if not r_ids:
                continue
            ids = torch.tensor([q_ids + r_ids])
            logits = model(**lm_inputs(ids, tok.pad_token_id)).logits[0, len(q_ids) - 1:-1]
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(r_ids), reduction="sum").item()
            n += len(r_ids)
    return math.exp(nll / max(n, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="", help="an existing finished run to analyse (default: run the demo)")
    p.add_argument("--out", default="runs/fidelity", help="where to run the demo")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for the run")
    a = p.parse_args(argv)

    run = Path(a.run_dir or a.out)
    seconds = None
    if not a.run_dir:
        t0 = time.time()
        cmd = [sys.executable, "-m", "megacoach.cli_entry", "train", "--out", str(run)]
        for s in a.set:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
        seconds = round(time.time() - t0, 1)

    import numpy as np

    from megacoach.config import build_config, read_config_file
    from megacoach.lm.loading import load_causal_lm

    cfg = build_config(read_config_file(run / "config.yaml"))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (run / "before_after.jsonl").read_text().splitlines()]
    ini = np.array([r["initial_labeler_score"] for r in rows])
    fin = np.array([r["final_labeler_score"] for r in rows])
    sd = float(ini.std())
    rise_sd = float((fin.mean() - ini.mean()) / sd) if sd > 0 else float("nan")
    last = metrics[-1]
    target = cfg.kl.target
    kl_window = [m["objective/kl"] for m in metrics[-5:]]
    kl_end = float(np.mean(kl_window))
    model, tok = load_causal_lm(cfg.model.name_or_path)
    ppl_ini = perplexity(model, tok, [r["query"] for r in rows], [r["initial"] for r in rows], cfg.task.query_length)
    ppl_fin = perplexity(model, tok, [r["query"] for r in rows], [r["final"] for r in rows], cfg.task.query_length)
    curve = [{"iteration": m["iteration"], "labeler/score": round(m["labeler/score"], 4),
              "objective/score": round(m["objective/score"], 4), "objective/kl": round(m["objective/kl"], 3),
              "objective/kl_coef": round(m["objective/kl_coef"], 4)} for m in metrics]
    print("iteration  labeler/score  objective/score  objective/kl  kl_coef", file=sys.stderr)
    for c in curve:
        print(f"{c['iteration']:9d}  {c['labeler/score']:+13.3f}  {c['objective/score']:+15.3f}  "
              f"{c['objective/kl']:12.2f}  {c['objective/kl_coef']:.4f}", file=sys.stderr)
    result = {
        "run_dir": str(run), "run_seconds": seconds, "heldout_queries": len(rows),
        "labeler_score_initial": round(float(ini.mean()), 4), "labeler_score_final": round(float(fin.mean()), 4),
        "initial_per_sample_sd": round(sd, 4), "rise_in_sd": round(rise_sd, 3), "rise_target_sd": 1.0,
        "kl_end_mean_last5": round(kl_end, 3), "kl_target": target, "kl_within_20pct": abs(kl_end / target - 1) <= 0.2,
        "ppl_initial_samples": round(ppl_ini, 2), "ppl_final_samples": round(ppl_fin, 2),
        "iterations": last["iteration"], "curve": curve,
        "holds": bool(rise_sd >= 1.0 and abs(kl_end / target - 1) <= 0.2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
