"""Helpers for the guards' tests: a deterministic text labeler, and a tiny run whose Values Coach is built
to agree with it (a random tiny model cannot learn anything, so the direction has to be constructed).

`prepare_tiny(base, model_dir)` makes a Values Coach from the tiny model (random head, normalised on
initial-policy samples) and collects best-of-K labels from the tiny model with `CoachLabeler` — human
evaluators who share that coach's taste — into a label store (the run id is RUN_NAME). Each test run copies the
store into its own folder named RUN_NAME (so the pipeline finds its offline labels there and does not label
again) and loads the Values Coach from `reward.path`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

RUN_NAME = "guardrun"


COACH_PATH: Path | None = None  # set by prepare_tiny; CoachLabeler loads the Values Coach from here


class CoachLabeler:
    """Labels with a fixed Values Coach's opinion of the text (re-tokenised): human evaluators whose taste the
    tiny Values Coach shares exactly, so the direction of everything downstream is known."""

    kind = "program"
    name = "mock:coach"

    def __init__(self):
        from megacoach.reward.model import RewardModel

        self.coach = RewardModel.from_pretrained(COACH_PATH)
        self.tok = self.coach.tokenizer
        self.cache: dict = {}

    def score(self, query: str, text: str) -> float:
        key = (query, text)
        if key not in self.cache:
            from megacoach.lm.hf import left_pad

            q = self.tok(query)["input_ids"][-24:]
            r = self.tok(text)["input_ids"] if text else []
            ids = left_pad([q], self.tok.pad_token_id, 24)
            ids = torch.cat([ids, torch.tensor([r], dtype=torch.long, device="cpu").reshape(1, -1)], 1)
            with torch.no_grad():
                self.cache[key] = float(self.coach(ids)[0])
        return self.cache[key]

    def scores(self, query, responses):
        return [self.score(query, r) for r in responses]

    def choose(self, query, responses, rng):
        from megacoach.labels.labelers import argbest

        return argbest(self.scores(query, responses), rng)


def tiny_config(run_dir: Path, model_dir: Path, coach: Path | None = None, guards: dict | None = None, **sections):
    from megacoach.config import load_config

    over = [{"model": {"name_or_path": str(model_dir)},
             "run": {"out": str(run_dir), "max_iterations": 2},
             "labels": {"labeler": "guard_helpers:CoachLabeler", "num_comparisons": 96, "valid_fraction": 0.5},
             # the random tiny model rarely samples '.': stop at any token with an 'e' so most responses are valid
             "task": {"truncate_token": "e"},
             "guards": {"enabled": True, "canaries": "none", "probe_queries": 16, **(guards or {})}}]
    if coach is not None:
        over.append({"reward": {"path": str(coach)}})
    for k, v in sections.items():
        over.append({k: v})
    return load_config(preset="tiny", overrides=over)


def prepare_tiny(base: Path, model_dir: Path, **sections) -> tuple[Path, Path]:
    """(labels.db, Values Coach folder) for tiny test runs: a Values Coach (random head, normalised on
    initial-policy samples), and best-of-K labels of the tiny model by CoachLabeler (that coach's taste).
    `sections` go over the tiny config (e.g. labels={"num_comparisons": 160})."""
    global COACH_PATH
    from rich.console import Console

    from megacoach.labels.labelers import load_labeler
    from megacoach.labels.store import LabelStore
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import collect_labels
    from megacoach.reward.model import RewardModel
    from megacoach.reward.normalize import normalise
    from megacoach.continuations import TaskSampler
    from megacoach.sampling import HFGenerator
    from megacoach.tasks import load_queries

    run = base / RUN_NAME
    run.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(run, model_dir, **sections)
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(model_dir))
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
    coach = RewardModel.from_base(str(model_dir), tokenizer=tok, seed=0).eval()
    qs = load_queries(cfg.task, tok, "train", 32, 5)
    seqs = [sampler.query_tensor([c.query])[0].tolist() + c.response_ids
            for g in sampler.continuations(qs, 2, torch.Generator().manual_seed(5)) for c in g]
    normalise(coach, seqs)
    out = base / "coach"
    coach.save_pretrained(out)
    COACH_PATH = out
    store = LabelStore(f"sqlite:///{run / 'labels.db'}")
    collect_labels(cfg, store, sampler, load_labeler(cfg.labels.labeler), RUN_NAME, f"{RUN_NAME}/offline", "initial",
                   Console(quiet=True).print)
    store.close()
    return run / "labels.db", out


def new_run(tmp: Path, db: Path) -> Path:
    """A fresh run folder named RUN_NAME holding a copy of the prepared label store."""
    run = tmp / RUN_NAME
    run.mkdir(parents=True)
    shutil.copy(db, run / "labels.db")
    return run


def build_rig(prepared, base: Path, **sections):
    """(cfg, trainer, store, labeler) of the guards' tiny rig, built as the pipeline builds them: the prepared
    labels copied into a fresh run under `base`, the prepared Values Coach, `sections` over the tiny config."""
    from megacoach.labels.labelers import load_labeler
    from megacoach.labels.store import LabelStore
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    md, db, coach_dir = prepared
    run = new_run(base, db)
    cfg = tiny_config(run, md, coach_dir, **sections)
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(md))
    coach = RewardModel.from_pretrained(coach_dir, policy_tokenizer=tok)
    trainer = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=load_queries(cfg.task, tok, "train", 64, 31))
    store = LabelStore(f"sqlite:///{run / 'labels.db'}")
    return cfg, trainer, store, load_labeler(cfg.labels.labeler)
