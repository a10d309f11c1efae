"""Benchmark: do the guards stop every bug kind, how early, and do they leave clean runs alone?

  .venv/bin/python benchmarks/guards.py                       # full size: built-in model, every bug, 10 clean seeds
  .venv/bin/python benchmarks/guards.py --bugs incident --clean-seeds 1 --iterations 3 --clean-iterations 2 \\
      --comparisons 200 --eval-queries 32                     # a smoke test (minutes)

For each bug kind (megacoach/guards/bugs.py), under the incident's settings (megacoach/incident.py:
built-in model, VADER as the human evaluators, batch 64, fixed beta 0.05), with every guard on:
  iterations_to_halt   PPO updates done before the guards stopped the run (0 = refused by the preflight)
  labeler_score_drop   how far the labelers' (VADER's) score of the Apprentice had fallen by then, on held-out
                       queries, in standard deviations of the initial policy's samples (> 0 = worse)
The same is measured with the preflight off (`monitors`: the batch check and the live monitors) and with the
preflight and the batch check off (`labelers`: only the monitors that watch samples and labels), to show each
layer on its own (--modes), and without guards (`off`) for what the bug does when nobody stops it.

Clean runs: --clean-seeds seeds of the demo's settings (`megacoach train` defaults: 2,000 comparisons, adaptive
KL, 3,072 episodes) with every guard on; a halt is a false halt. By default the seeds share one set of labels
and one Values Coach (--fresh-coach: one per seed) and differ in PPO's randomness.

Labels and Values Coaches are cached in --cache (reused across invocations). The last line printed is one JSON
object: {"bugs": {NAME: {"halted", "iterations_to_halt", "labeler_score_drop", ...}}, "clean_seeds": N,
"false_halts": K, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="base model (default: the built-in one)")
    p.add_argument("--bugs", default="all", help="bug kinds, comma-separated, or 'all' or 'none'")
    p.add_argument("--modes", default="full,monitors", help="guard modes for the bug runs: full, monitors, labelers, "
                   "off (comma-separated; 'full' is the one reported at the top level)")
    p.add_argument("--iterations", type=int, default=30, help="PPO iterations at most per bug run")
    p.add_argument("--comparisons", type=int, default=4000, help="labeled comparisons for the bug runs' Values Coach")
    p.add_argument("--clean-seeds", type=int, default=10, help="clean runs of the demo's settings")
    p.add_argument("--clean-iterations", type=int, default=None, help="PPO iterations per clean run (default: the "
                   "demo's 3,072 episodes = 48)")
    p.add_argument("--clean-comparisons", type=int, default=None, help="labels.num_comparisons of the clean runs "
                   "(default: the demo's 2,000)")
    p.add_argument("--first-seed", type=int, default=1, help="clean runs use seeds first-seed .. first-seed + "
                   "clean-seeds - 1 (split the clean runs over several processes, then gather them with --reuse)")
    p.add_argument("--threads", type=int, default=None, help="run.threads of every run (default: the config's 2)")
    p.add_argument("--fresh-coach", action="store_true", help="clean runs: labels and Values Coach per seed")
    p.add_argument("--clean-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override for the clean runs only (repeatable), e.g. ppo.learning_rate=5e-5")
    p.add_argument("--eval-queries", type=int, default=128, help="held-out queries for the before/after measures")
    p.add_argument("--out", default="runs/bench-guards", help="run folders")
    p.add_argument("--cache", default="runs/incident-cache", help="labels and Values Coaches, reused")
    p.add_argument("--quiet", action="store_true", help="hide the runs' own progress output")
    p.add_argument("--reuse", action="store_true", help="keep scenarios already finished in --out (their "
                   "incident.json) instead of running them again")
    return p.parse_args(argv)


def summary(o) -> dict:
    return {"halted": o.halted, "iterations_to_halt": o.iterations_to_halt,
            "labeler_score_drop": round(o.labeler_score_drop, 3), "stopped_by": o.stopped_by,
            "kl_at_stop": round(o.final.get("kl", 0.0), 3), "ppl_initial": round(o.initial.get("ppl", 0.0), 1),
            "ppl_at_stop": round(o.final.get("ppl", 0.0), 1), "iterations": o.iterations,
            "seconds": round(o.seconds, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    from megacoach.config import parse_override
    from megacoach.guards.bugs import BUGS
    from megacoach.incident import Outcome, run_scenario

    def scenario(bug, mode, folder, *a, **k):
        done = folder / "incident.json"
        if args.reuse and done.is_file():
            return Outcome(**json.loads(done.read_text()))
        return run_scenario(bug, mode, folder, *a, **k)

    console = Console(quiet=args.quiet)
    out, cache = Path(args.out), Path(args.cache)
    names = list(BUGS) if args.bugs == "all" else [] if args.bugs == "none" else args.bugs.split(",")
    modes = args.modes.split(",")
    threads = {} if args.threads is None else {"threads": args.threads}
    result: dict = {"bugs": {}, "modes": {}}
    t0 = time.time()
    for name in names:
        for mode in modes:
            over = [{"model": {"name_or_path": args.model},
                     "run": {"max_iterations": args.iterations, "eval_queries": args.eval_queries, **threads},
                     "labels": {"num_comparisons": args.comparisons},
                     "ppo": {"total_episodes": 64 * args.iterations}}]
            o = scenario(name, mode, out / f"{name}-{mode}", cache, over, console, args.eval_queries)
            s = summary(o)
            result["modes"].setdefault(name, {})[mode] = s
            if mode == "full" or name not in result["bugs"]:
                result["bugs"][name] = s
            print(f"{name:20s} {mode:9s} halted={s['halted']!s:5s} after {s['iterations_to_halt']} updates by "
                  f"{s['stopped_by']}; labeler drop {s['labeler_score_drop']:+.2f} sd; KL {s['kl_at_stop']:.2f}; "
                  f"ppl {s['ppl_initial']:.0f}->{s['ppl_at_stop']:.0f} ({s['seconds']:.0f}s)", flush=True)
    false_halts, clean = 0, []
    for seed in range(args.first_seed, args.first_seed + args.clean_seeds):
        over = [{"model": {"name_or_path": args.model}, "run": {"seed": seed, "eval_queries": args.eval_queries,
                                                                **threads}}]
        if args.clean_iterations:
            over.append({"run": {"max_iterations": args.clean_iterations}})
        if args.clean_comparisons:
            over.append({"labels": {"num_comparisons": args.clean_comparisons}})
        over.extend(parse_override(item) for item in args.clean_set)
        o = scenario(None, "full", out / f"clean-{seed}", cache, over, console, args.eval_queries, base={},
                         coach_seed=None if args.fresh_coach else 1)
        s = summary(o)
        clean.append({"seed": seed, **s})
        false_halts += int(o.halted)
        print(f"clean seed {seed:2d}: halted={o.halted} ({o.stopped_by}); {o.iterations} iterations; labeler "
              f"{-o.labeler_score_drop:+.2f} sd; KL {s['kl_at_stop']:.2f} ({s['seconds']:.0f}s)", flush=True)
    result.update({"clean_seeds": args.clean_seeds, "false_halts": false_halts, "clean": clean,
                   "seconds": round(time.time() - t0, 1)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
