"""Reproducing the section 4.4 incident (and the other bug kinds) end to end, with or without the guards.

Used by `megacoach incident` and benchmarks/guards.py. One scenario = one bug kind x one guard mode:

    mode 'full'      every guard (preflight, the batch check before each update, live monitors)
    mode 'monitors'  no preflight: the batch check and the live monitors only
    mode 'labelers'  no preflight, no batch check: only the monitors that watch samples and labels
    mode 'off'       no guards at all (`--no-guards`): the run goes where the bug takes it

The human evaluators' labels and the Values Coach are made once and cached (`cache/`): a best-of-K label
set of the initial policy by the mock labeler (VADER), and a Values Coach trained on it — a second one,
trained under the bug, for the kinds that act on the Values Coach's training. Every run copies the labels
into its own label store (so the guards' fresh labels never leak between runs) and then runs the ordinary
pipeline (`megacoach.pipeline.train`) inside the bug's patch.

After the run the Apprentice as it stood at the end (or at the halt) is compared with the initial policy on
held-out queries: the labelers' score (in units of its spread over the initial policy's samples), the KL to
the original model, and the perplexity of the samples under the original model (fluency).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from megacoach import seeds
from megacoach.config import load_config
from megacoach.continuations import TaskSampler
from megacoach.errors import ConfigError, HaltError
from megacoach.guards import bugs as bugs_mod
from megacoach.guards.alarms import GuardFailure
from megacoach.labels.labelers import labeler_scores, load_labeler
from megacoach.labels.records import NewSample
from megacoach.labels.store import LabelStore
from megacoach.hardware import load_model
from megacoach.lm.adapters import add_lora
from megacoach.lm.hf import autocast, device_of, lm_inputs, lm_logits, trunk_of
from megacoach import pipeline
from megacoach.pipeline import collect_labels, seed_everything, train, values_coach
from megacoach.ppo import episodes, objective
from megacoach.ppo.episodes import stop_rule
from megacoach.ppo.policy import Apprentice, frozen_reference, load_apprentice_state
from megacoach.runs import RunDir
from megacoach.sampling import HFGenerator

MODES = ("full", "monitors", "labelers", "off")

# The demo's settings, cut to a few minutes on a CPU: the paper's task (64-token queries, 24-token responses,
# temperature 0.7, truncation at '.'), PPO batch 64 with 4 epochs x 4 minibatches, a fixed beta as in
# paper-details' measurement of the incident. One change: the invalid-response penalty is 0, not -1. Flipped
# with the reward (as in ORIG, where the penalty is part of the score), a -1 penalty becomes a +1 bonus that this
# small model collects far more easily — by never ending a sentence — than it can write dark text; the run
# then shows a policy that stops finishing sentences instead of the incident. (The guards stop both.)
# And the labelers compare pairs (K = 2): best-of-4 labels only say which sample was the most positive, and a
# Values Coach trained on them scores neutral and dark text alike (measured: about -1.4 for both), so the flipped
# objective stops at bland, sentiment-free lines; pairs teach it the whole scale.
INCIDENT_SETTINGS: dict = {
    "model": {"name_or_path": "builtin"},
    "task": {"penalty_reward": 0.0},
    "labels": {"labeler": "vader", "num_comparisons": 4000, "k": 2},
    "reward": {"epochs": 2},  # the incident's figures (docs/guards.md) were measured with two passes
    "kl": {"adaptive": False, "init_kl_coef": 0.05},
    "ppo": {"batch_size": 64, "mini_batch_size": 16, "learning_rate": 3e-5, "lr_decay": False,
            "total_episodes": 64 * 80},
    "run": {"eval_queries": 128, "checkpoint_every": 1000, "sample_table_every": 5},
}


def mode_guards(mode: str) -> dict:
    if mode not in MODES:
        raise ConfigError(f"guard mode {mode!r} (expected one of {', '.join(MODES)})")
    return {"full": {"enabled": True},
            "monitors": {"enabled": True, "preflight": False},
            "labelers": {"enabled": True, "preflight": False, "batch_check": False},
            "off": {"enabled": False}}[mode]


@dataclass
class Outcome:
    bug: str
    mode: str
    run_dir: str
    halted: bool
    stopped_by: str | None  # 'preflight:<component>', 'guard/<name>', 'andon', or None
    reason: str | None
    iterations_to_halt: int | None  # PPO updates done before the stop (0: refused before the first)
    iterations: int  # updates done
    initial: dict = field(default_factory=dict)  # labeler mean/sd, ppl, kl on held-out queries
    final: dict = field(default_factory=dict)
    labeler_score_drop: float = 0.0  # (initial - final labeler mean) / initial sd; > 0 = worse
    samples: list = field(default_factory=list)
    seconds: float = 0.0
    curve: list = field(default_factory=list)  # per iteration: labeler/score, objective/score, kl

    def as_dict(self) -> dict:
        return asdict(self)


def build_config(overrides: list[dict], base: dict | None = None):
    """INCIDENT_SETTINGS (or `base`, e.g. {} for the demo's defaults) <- overrides."""
    return load_config(overrides=[INCIDENT_SETTINGS if base is None else base, *overrides])


# ------------------------------------------------------------------------------------------ cache
def cache_key(cfg) -> str:
    t = cfg.task
    k = "" if cfg.labels.k == 4 else f"-k{cfg.labels.k}"
    return (f"{cfg.model.name_or_path}-{cfg.labels.labeler}-{cfg.labels.num_comparisons}-{cfg.run.seed}-"
            f"{t.query_length}x{t.response_length}{k}").replace("/", "_").replace(":", "_")


def coach_key(cfg) -> str:
    """The Values Coach's training settings: a coach trained otherwise on the same labels is another entry."""
    r = cfg.reward
    return f"lr{r.learning_rate:g}-b{r.batch_size}-e{r.epochs}"


def prepare(cfg, cache: Path, bug: str | None, log) -> tuple[Path, Path]:
    """(labels.db, Values Coach folder) in `cache`, made once: labels of the initial policy by the mock labeler,
    and a Values Coach trained on them (under the bug when it acts on the Values Coach's training)."""
    b = bugs_mod.get(bug) if bug else None
    variant = (f"coach-{b.name}" if b is not None and b.affects_values_coach else "coach-clean") + "-" + coach_key(cfg)
    cache = Path(cache)
    key = cache_key(cfg)
    root = cache / key
    coach_dir = root / variant / "values_coach"
    db = root / "labels.db"
    if (coach_dir / "reward_config.json").is_file() and db.is_file():
        return db, coach_dir
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.run.seed, cfg.run.threads, cfg.run.mmap_threshold_mib)
    lm, tok = load_model(cfg)
    store = LabelStore(f"sqlite:///{db.resolve()}")
    have = store.count_comparisons()  # the labels may be there already, made for another coach
    if 0 < have < cfg.labels.num_comparisons:  # an interrupted collection: start it again
        store.close()
        for part in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            part.unlink(missing_ok=True)
        store, have = LabelStore(f"sqlite:///{db.resolve()}"), 0
    try:
        if have < cfg.labels.num_comparisons:
            sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
            collect_labels(cfg, store, sampler, load_labeler(cfg.labels.labeler), "incident", "incident/offline",
                           "initial", log)
        with bugs_mod.inject(b.name if b is not None and b.affects_values_coach else None):
            values_coach(cfg, RunDir(root / variant), store, tok, "incident", log)
    finally:
        store.close()
    return db, coach_dir


def copy_labels(src_db: Path, dst_db: Path, run_id: str, src_batch: str = "incident/offline") -> int:
    """Offline labels of one store, written into another as `run_id`'s offline batch (same samples, choices)."""
    src = LabelStore(f"sqlite:///{Path(src_db).resolve()}")
    dst = LabelStore(f"sqlite:///{Path(dst_db).resolve()}")
    try:
        comps = src.comparisons(batch=src_batch)
        specs = [dict(query_text=c.query_text, query_token_ids=c.query_token_ids, split=c.split,
                      batch=f"{run_id}/offline", source="offline", run_id=run_id,
                      samples=[NewSample(s.text, s.token_ids, policy=s.policy, iteration=s.iteration, seed=s.seed,
                                         run_id=run_id) for s in c.samples]) for c in comps]
        contents = dst.create_items(specs)
        for name in {c.labeler_name for c in comps}:
            dst.get_or_create_labeler(name, kind="program", role="program")
        dst.add_comparisons([dict(item_id=it.item.id, chosen=c.chosen, labeler=c.labeler_name,
                                  shown_order=c.shown_order, guideline_version=c.guideline_version)
                             for it, c in zip(contents, comps)])
        return len(comps)
    finally:
        src.close()
        dst.close()


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_policy(lm, ref_lm, tok, cfg, queries, labeler, seed: int) -> dict:
    """Samples of `lm` on `queries` (the task's sampling), their labeler scores, KL to the original model
    (sampled log-ratio summed over the response) and perplexity under the original model (truncated text)."""
    t = cfg.task
    pad = tok.pad_token_id
    gen = HFGenerator(lm, pad)
    s = episodes.sample(gen, tok, t, stop_rule(tok, t, device=gen.device), queries,
                        torch.Generator(device=gen.device).manual_seed(seed), 64)
    ls = labeler_scores(labeler, [q.text for q in queries], s.texts)
    kls, nll_sum, n_tok = [], 0.0, 0
    for i in range(0, len(queries), 64):
        qr = torch.cat([s.query_ids[i:i + 64], s.responses[i:i + 64]], 1).to(device_of(ref_lm))
        with autocast(ref_lm):  # the trunk in the model's precision, the head and log-softmax in float32
            hidden = trunk_of(ref_lm)(**lm_inputs(qr, pad)).last_hidden_state[:, -t.response_length - 1:-1]
        logits = lm_logits(ref_lm, hidden, float32=True).float().to(s.logprobs.device) / t.temperature
        ref_lp = torch.log_softmax(logits, -1).gather(-1, s.responses[i:i + 64, :, None]).squeeze(-1)
        kls.append(objective.sequence_kl(s.logprobs[i:i + 64], ref_lp, None if s.mask is None else s.mask[i:i + 64]))
        # fluency: the original model's perplexity (temperature 1) of the truncated text it would read
        lp1 = torch.log_softmax(logits * t.temperature, -1).gather(-1, s.responses[i:i + 64, :, None]).squeeze(-1)
        real = s.truncated[i:i + 64] != pad
        nll_sum += float(-(lp1 * real).sum())
        n_tok += int(real.sum())
    return {"labeler_mean": float(np.mean(ls)), "labeler_sd": float(np.std(ls)), "kl": float(torch.cat(kls).mean()),
            "ppl": float(math.exp(nll_sum / max(1, n_tok))), "valid": float(s.valid.float().mean()), "texts": s.texts,
            "labeler": ls.tolist()}


def _latest_policy(run_dir: Path, cfg):
    """The Apprentice of the run's latest checkpoint (the base model when there is none); with LoRA
    (`ppo.lora_r`) the base with the checkpoint's adapter."""
    lm, tok = load_model(cfg)
    latest = run_dir / "checkpoints" / "latest.json"
    if latest.is_file():
        info = json.loads(latest.read_text())
        state = torch.load(run_dir / "checkpoints" / info["file"], map_location=device_of(lm), weights_only=False)
        if cfg.ppo.lora_r:
            lm = add_lora(lm, cfg.ppo.lora_r, cfg.ppo.lora_alpha, cfg.ppo.lora_dropout, cfg.ppo.lora_target_modules)
        load_apprentice_state(Apprentice(lm, cfg.ppo.separate_value_model), state["trainer"]["apprentice"],
                              bool(cfg.ppo.lora_r))
    return lm, tok


# ------------------------------------------------------------------------------------------ a scenario
def run_scenario(bug: str | None, mode: str, out: Path, cache: Path, overrides: list[dict] | None = None,
                 console=None, eval_queries: int | None = None, base: dict | None = None,
                 coach_seed: int | None = None) -> Outcome:
    """One bug kind (None: a clean run) under one guard mode; returns what happened and what it did.
    base: settings under the overrides (default INCIDENT_SETTINGS; {} = the demo's defaults). coach_seed:
    the seed of the cached labels and Values Coach (default: the run's seed), so seeds can share one."""
    console = console or Console()
    out = Path(out)
    needs = bugs_mod.get(bug).overrides if bug else None  # e.g. a reward term for term-sign to flip
    if needs:
        overrides = [*(overrides or []), needs]
    if (out / "config.yaml").exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = out.resolve().name
    first = build_config(list(overrides or []), base)
    coach_cfg = first if coach_seed is None else build_config([*(overrides or []), {"run": {"seed": coach_seed}}], base)
    db, coach = prepare(coach_cfg, cache, bug, console.print)
    cfg = build_config([*(overrides or []), {"run": {"out": str(out)}, "reward": {"path": str(coach)},
                                             "guards": mode_guards(mode)}], base)
    copy_labels(db, out / "labels.db", run_id)
    t0 = time.time()
    stopped_by = reason = None
    halted = False
    with bugs_mod.inject(bug):
        try:
            train(cfg, console=console)
        except GuardFailure as err:
            halted, stopped_by, reason = True, f"preflight: {err.component}", str(err)
        except HaltError as err:
            rec = json.loads((out / "HALTED.json").read_text()) if (out / "HALTED.json").is_file() else {}
            halted, stopped_by, reason = True, rec.get("source", "halt"), rec.get("reason", str(err))
    seconds = time.time() - t0
    metrics = RunDir(out).read_metrics()
    done = metrics[-1]["iteration"] if metrics else 0
    if halted and stopped_by and stopped_by.startswith("preflight"):
        iterations_to_halt = 0
    elif halted:
        rec = json.loads((out / "HALTED.json").read_text())
        iterations_to_halt = int(rec.get("iteration", done))
        done = iterations_to_halt
    else:
        iterations_to_halt = None
    # the policy where it stood, against the initial policy, on held-out queries
    lm, tok = _latest_policy(out, cfg)
    ref = frozen_reference(load_policy_base(cfg))
    labeler = load_labeler(cfg.labels.labeler)
    n_eval = eval_queries or cfg.run.eval_queries
    queries = pipeline.eval_queries(cfg, tok, n_eval)  # (the parameter `eval_queries` is a count)
    sampling_seed = seeds.seed_of(cfg.run.seed, seeds.Stream.EVAL_SAMPLING)
    ini = evaluate_policy(ref, ref, tok, cfg, queries, labeler, sampling_seed)
    fin = evaluate_policy(lm, ref, tok, cfg, queries, labeler, sampling_seed)
    drop = (ini["labeler_mean"] - fin["labeler_mean"]) / (ini["labeler_sd"] or 1.0)
    samples = [{"query": q.text[-100:], "initial": a, "final": b, "initial_labeler": x, "final_labeler": y}
               for q, a, b, x, y in list(zip(queries, ini["texts"], fin["texts"], ini["labeler"], fin["labeler"]))[:8]]
    strip = lambda d: {k: v for k, v in d.items() if k not in ("texts", "labeler")}  # noqa: E731
    curve = [{"iteration": m["iteration"], "labeler": m.get("labeler/score"), "score": m.get("objective/score"),
              "kl": m.get("objective/kl")} for m in metrics]
    outcome = Outcome(bug or "none", mode, str(out), halted, stopped_by, reason, iterations_to_halt, done, strip(ini),
                      strip(fin), drop, samples, seconds, curve)
    (out / "incident.json").write_text(json.dumps(outcome.as_dict(), indent=2, default=str))
    return outcome


def load_policy_base(cfg):
    lm, _ = load_model(cfg)
    return lm
