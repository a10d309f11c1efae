"""Benchmark: held-out best-of-K accuracy of the Values Coach against the number of labeled comparisons.

  .venv/bin/python benchmarks/reward_accuracy.py                     # full size, built-in model (~tens of minutes on 2 cores)
  .venv/bin/python benchmarks/reward_accuracy.py --model DIR --sizes 16,32 --valid 16   # a smoke test

1. queries: excerpts of the built-in corpus (held-in plays), one query per comparison;
2. K continuations of each from the base model as the initial Apprentice (task defaults: query 64 tokens,
   response 24, temperature 0.7, truncation after '.' from position 16);
3. the VADER mock labeler (the paper's section 3.1.1 stand-in for human evaluators) picks the best of K;
4. a fixed held-out set (--valid comparisons) and nested training subsets (--sizes, each a prefix of the
   next); for each size a fresh Values Coach is trained from the base model with the config's defaults for the
   built-in model (1 epoch, batch 8, Adam lr 3e-4 eps 1e-5 with linear decay; the paper: 1 epoch, batch 32,
   lr 5e-5 — pass --batch-size 32 --lr 5e-5; two passes: --epochs 2), normalisation before/after on initial-policy
   samples)
   and evaluated on the held-out set.

labels_per_s: comparisons produced per second end to end (sampling the K continuations + VADER labeling).
train_examples_per_s: training comparisons (K sequences each) seen per second of optimisation (each pass counted),
  over all sizes.
bow_accuracy: a reference, not a Values Coach: a linear bag-of-words model of the responses (one weight per token,
  no pretrained knowledge) trained on the same comparisons with the same loss (bag_of_words_reference); it shows how
  much the labels alone teach a model that must learn every word's value from them.
The last line printed is one JSON object:
  {"comparisons": [...], "accuracy": [...], "labels_per_s": ..., "train_examples_per_s": ..., "bow_accuracy": [...]}
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="base model: 'builtin' (default), a folder or a hub name")
    p.add_argument("--sizes", default="250,500,1000,2000,4000", help="training set sizes (nested), comma-separated")
    p.add_argument("--valid", type=int, default=500, help="held-out comparisons (fixed across sizes)")
    p.add_argument("--k", type=int, default=4, help="continuations per comparison (best of K)")
    p.add_argument("--labeler", default="vader", help="mock labeler spec (megacoach.labels.labelers.load_labeler)")
    p.add_argument("--query-length", type=int, default=None, help="task.query_length (default: task default, 64)")
    p.add_argument("--response-length", type=int, default=None, help="task.response_length (default 24)")
    p.add_argument("--lr", type=float, default=None, help="reward.learning_rate (default: the config default, 3e-4; paper 5e-5)")
    p.add_argument("--batch-size", type=int, default=None, help="reward.batch_size (default: the config default, 8; paper 32)")
    p.add_argument("--epochs", type=int, default=None, help="reward.epochs (default: the config default, 1; paper 1)")
    p.add_argument("--normalize-samples", type=int, default=None, help="reward.normalize_samples (default 256)")
    p.add_argument("--sample-batch", type=int, default=128, help="sequences per sampling batch")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default=None, help="train the Values Coach on e.g. cuda (sampling stays on CPU)")
    p.add_argument("--coach-model", default=None,
                   help="the Values Coach's base (reward.model) when it is not --model: e.g. smollm2-135m-instruct or a "
                        ".gguf file; it reads the policy's samples as text. Default: --model")
    p.add_argument("--coach-lora", type=int, default=0, help="reward.lora_r: a LoRA adapter on the Values Coach (0: off)")
    p.add_argument("--out", default=None, help="also write the full results (per size metrics) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no per-step training log")
    p.add_argument("--no-bow", dest="bow", action="store_false",
                   help="skip the linear bag-of-words reference (seconds per size)")
    return p.parse_args(argv)


def collect(policy, tok, task, n: int, k: int, labeler_spec: str, seed: int, sample_batch: int, log):
    """n best-of-k comparisons of the initial policy, labeled by the mock labeler. Returns (comparisons, seconds)."""
    from megacoach.labels.labelers import load_labeler
    from megacoach.reward.data import Comparison
    from megacoach.continuations import TaskSampler
    from megacoach.sampling import HFGenerator
    from megacoach.tasks import load_queries

    queries = load_queries(task, tok, "train", n, seed)
    labeler = load_labeler(labeler_spec)
    sampler = TaskSampler(HFGenerator(policy, tok.pad_token_id), tok, task)
    gen = torch.Generator().manual_seed(seed + 13)
    rng = random.Random(seed + 17)
    sampler.continuations(queries[:1], 1, torch.Generator().manual_seed(0))  # warm-up (first calls are slow), untimed
    comps, t_sample, t_label, ceiling = [], 0.0, 0.0, []
    chunk = 512
    for start in range(0, n, chunk):
        part = queries[start:start + chunk]
        t0 = time.perf_counter()
        groups = sampler.continuations(part, k, gen, batch_size=sample_batch)
        t1 = time.perf_counter()
        for q, group in zip(part, groups):
            texts = [c.text for c in group]
            chosen = labeler.choose(q.text, texts, rng)
            comps.append(Comparison(list(q.token_ids), [list(c.response_ids) for c in group], int(chosen)))
            scores = labeler.scores(q.text, texts) if hasattr(labeler, "scores") else None
            if scores is not None:  # ties at the top are a coin flip: no model can beat 1/(number tied)
                ceiling.append(1.0 / sum(x == max(scores) for x in scores))
        t2 = time.perf_counter()
        t_sample += t1 - t0
        t_label += t2 - t1
        log(f"human evaluators ({labeler.name}): {len(comps)}/{n} comparisons "
            f"({len(comps) / (t_sample + t_label):.1f}/s: sampling {t_sample:.0f}s, labeling {t_label:.1f}s)")
    return comps, t_sample, t_label, (sum(ceiling) / len(ceiling) if ceiling else None)


def bag_of_words_reference(train, valid, vocab_size: int, l2: float = 1e-3, steps: int = 300,
                           lr: float = 0.05) -> float:
    """Held-out accuracy of a linear bag-of-words model of the responses, trained on the same comparisons.

    Each response scores sum(w[token]); the K-way softmax cross-entropy of the Values Coach, plus l2 * |w|^2, full
    batch Adam from zero weights (deterministic: no random numbers drawn). No pretrained knowledge at all: it shows
    what the labels alone teach a model that must learn every word's value from them (VADER's own score is such a sum
    over its lexicon, clipped and squashed)."""

    def flat(comps):
        ids, seq = [], []
        for i, c in enumerate(comps):
            for j, s in enumerate(c.sample_ids):
                ids.extend(s)
                seq.extend([i * c.k + j] * len(s))
        k = comps[0].k
        return (torch.tensor(ids, dtype=torch.long), torch.tensor(seq, dtype=torch.long), len(comps), k,
                torch.tensor([c.chosen for c in comps]))

    def scores(w, data):
        ids, seq, n, k, _ = data
        return torch.zeros(n * k).index_add(0, seq, w[ids]).view(n, k)

    tr, va = flat(train), flat(valid)
    w = torch.zeros(max(vocab_size, int(max(tr[0].max(), va[0].max())) + 1), requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores(w, tr), tr[4]) + l2 * (w ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (scores(w, va).argmax(1) == va[4]).float().mean().item()


def main(argv=None) -> int:
    from megacoach.config import RewardConfig, TaskConfig
    from megacoach.errors import MegacoachError
    from megacoach.lm.loading import load_causal_lm
    from megacoach.lm.hf import left_pad
    from megacoach.reward.train import retrain_from_scratch

    args = parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if not sizes or sizes[0] <= 0 or args.valid <= 0:
        print("--sizes and --valid must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    say = lambda m: print(m, flush=True)  # noqa: E731

    try:
        task_kw = {k: v for k, v in {"query_length": args.query_length, "response_length": args.response_length}.items()
                   if v is not None}
        if "query_length" in task_kw:  # built-in excerpts must fit: at least half the query length
            task_kw["query_min_tokens"] = min(TaskConfig().query_min_tokens, max(1, task_kw["query_length"] // 2))
        task = TaskConfig(**task_kw)
        rcfg = RewardConfig(**{k: v for k, v in {"learning_rate": args.lr, "batch_size": args.batch_size,
                                                 "epochs": args.epochs, "normalize_samples": args.normalize_samples,
                                                 "model": args.coach_model, "lora_r": args.coach_lora or None,
                                                 "lora_alpha": 2.0 * args.coach_lora if args.coach_lora else None}.items()
                                if v is not None})
        policy, tok = load_causal_lm(args.model)
        n_total = args.valid + sizes[-1]
        say(f"Values Coach benchmark: base model {args.model!r}, Values Coach on {args.coach_model or args.model!r}"
            f"{f' (LoRA r={args.coach_lora})' if args.coach_lora else ''}, best of {args.k}, labeler {args.labeler!r}, "
            f"held-out {args.valid}, sizes {sizes}; task: query {task.query_length}, response {task.response_length}, "
            f"temperature {task.temperature}, truncate {task.truncate_token!r} after {task.truncate_after}; "
            f"reward: lr {rcfg.learning_rate}, batch {rcfg.batch_size}, epochs {rcfg.epochs}")
        comps, t_sample, t_label, ceiling = collect(policy, tok, task, n_total, args.k, args.labeler, args.seed,
                                           args.sample_batch, say)
        labels_per_s = len(comps) / (t_sample + t_label)
        if ceiling is not None:
            say(f"labeler ties: a Values Coach that knew the labeler's scores exactly would reach {ceiling:.3f} "
                "(exact ties at the top are broken at random)")
        valid, pool = comps[:args.valid], comps[args.valid:]
        # normalisation samples: query + truncated response of the initial policy (one sample per comparison)
        norm_src = pool[-rcfg.normalize_samples:] if len(pool) >= rcfg.normalize_samples else pool
        norm = [left_pad([c.query_ids], tok.pad_token_id, task.query_length)[0].tolist() + c.sample_ids[i % args.k]
                for i, c in enumerate(norm_src)]
        norm_t = left_pad(norm, tok.pad_token_id)  # any padding: the Values Coach reads the last real token
        if args.coach_model is not None:  # a coach of another base reads (query ids, response ids) pairs as text
            norm_t = [(list(c.query_ids), list(c.sample_ids[i % args.k])) for i, c in enumerate(norm_src)]
        del policy

        results = []
        for n in sizes:
            say(f"--- training a fresh Values Coach on {n} comparisons")
            _, m = retrain_from_scratch(args.model, pool[:n], valid, rcfg, normalisation_samples=norm_t,
                                        seed=args.seed, log=log, tokenizer=tok, device=args.device)
            bow = bag_of_words_reference(pool[:n], valid, len(tok)) if args.bow else None
            results.append({"comparisons": n, **{k: m[k] for k in ("valid_accuracy", "valid_loss", "train_loss",
                                                                    "train_accuracy", "train_examples_per_s",
                                                                    "train_seconds", "steps")},
                            "bow_accuracy": bow})
            say(f"{n} comparisons: held-out accuracy {m['valid_accuracy']:.3f}, loss {m['valid_loss']:.4f} "
                f"({m['train_examples_per_s']:.1f} comparisons/s, {m['train_seconds']:.0f}s)"
                + ("" if bow is None else f"; bag-of-words reference {bow:.3f}"))
    except MegacoachError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    total_train = sum(r["comparisons"] for r in results) * rcfg.epochs  # comparisons seen, every pass counted
    train_eps = total_train / sum(r["train_seconds"] for r in results)
    say("")
    say(f"{'comparisons':>11}  {'accuracy':>8}  {'loss':>7}  {'train loss':>10}  {'cmp/s':>7}  {'bag-of-words':>12}")
    for r in results:
        bow = "-" if r["bow_accuracy"] is None else f"{r['bow_accuracy']:.3f}"
        say(f"{r['comparisons']:>11}  {r['valid_accuracy']:>8.3f}  {r['valid_loss']:>7.4f}  {r['train_loss']:>10.4f}  "
            f"{r['train_examples_per_s']:>7.1f}  {bow:>12}")
    say(f"chance {1 / args.k:.3f}; ceiling {ceiling if ceiling is None else round(ceiling, 3)}; held-out {len(valid)}; labels/s {labels_per_s:.2f} (sampling {t_sample:.0f}s, "
        f"VADER {t_label:.1f}s for {len(comps)}); training comparisons/s {train_eps:.1f}")
    summary = {"comparisons": [r["comparisons"] for r in results],
               "accuracy": [round(r["valid_accuracy"], 4) for r in results],
               "labels_per_s": round(labels_per_s, 3), "train_examples_per_s": round(train_eps, 3)}
    if args.bow:
        summary["bow_accuracy"] = [round(r["bow_accuracy"], 4) for r in results]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**summary, "per_size": results, "args": vars(args), "held_out": len(valid),
                       "ceiling": ceiling, "sampling_seconds": t_sample, "labeling_seconds": t_label, "torch": torch.__version__}, f, indent=2)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
