"""`megacoach train`: the paper's offline RLHF loop, from the base model to the report.

  1. the Apprentice starts as an exact copy of the base model; a frozen copy is the Coherence Coach's reference;
  2. the human evaluators (here: a mock labeler) compare K continuations of the initial Apprentice (best of K);
  3. the Values Coach is trained on those comparisons (normalised on initial-policy samples);
  4. PPO on the Megacoach reward, score - beta * KL, with the guards watching every iteration;
  5. initial vs final samples on held-out queries, and RUN_DIR/report.html.
Every stage is resumable: labels live in the store, the Values Coach in RUN_DIR/values_coach, PPO in checkpoints.
"""

from __future__ import annotations

import gc
import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rich.console import Console

from megacoach import hardware, seeds
from megacoach.config import Config
from megacoach.continuations import TaskSampler
from megacoach.distributed import Dist, check_world
from megacoach.errors import ConfigError, HaltError
from megacoach.guards.core import Guards
from megacoach.labels.labelers import label_items, load_labeler
from megacoach.labels.records import NewSample
from megacoach.lm.adapters import AdapterOff, add_lora
from megacoach.lm.hf import check_logits, left_pad
from megacoach.lm.loading import resolve_model_path
from megacoach.progress import StageProgress
from megacoach.loop import PPOLoop
from megacoach.memory import set_mmap_threshold
from megacoach.online import OnlineLabeling
from megacoach.ppo.policy import enable_checkpointing, frozen_reference
from megacoach.ppo.trainer import PPOTrainer
from megacoach.reward.data import as_comparisons
from megacoach.reward.model import RewardModel, load_onto_base
from megacoach.reward.train import retrain_from_scratch
from megacoach.runs import RunDir
from megacoach.sampling import HFGenerator, ResponseGenerator
from megacoach.tasks import Query, load_queries

STAGES = "Human evaluators (mock) -> Values Coach -> Apprentice (PPO under the Coherence Coach)"


def seed_everything(seed: int, threads: int, mmap_threshold_mib: float | None = None) -> None:
    """Seeds, torch threads and (run.mmap_threshold_mib) the allocator setting of the process."""
    set_mmap_threshold(mmap_threshold_mib)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def store_url(cfg: Config, run: RunDir) -> str:
    return cfg.labels.db or f"sqlite:///{(run.path / 'labels.db').resolve()}"


# ------------------------------------------------------------------------------------------ labels
def collect_labels(cfg: Config, store, sampler, labeler, run_id: str, batch: str, policy: str, log,
                   iteration: int = 0, console=None) -> int:
    """`labels.num_comparisons` best-of-K items of `sampler`'s policy in `batch`, labeled into the store.

    labeler: a mock labeler labels them at once; None ('people'): the human evaluators label them in the labeling
    app, and this waits until `online.min_initial_labels` of them are labeled (at most `online.wait_timeout_s`).
    Resumable: the items the batch already holds are kept and only the rest is created. Sampling shows its progress
    (`console`: a live bar on a terminal; piped, or with no console through `log`: a plain line every 30 s)."""
    have = len(store.items(batch=batch))
    t0 = time.time()
    if cfg.labels.num_comparisons > have:
        queries = load_queries(cfg.task, sampler.tok, "train", cfg.labels.num_comparisons,
                               seeds.seed_of(cfg.run.seed, seeds.Stream.LABEL_QUERIES))[have:]
        gen = seeds.generator(cfg.run.seed, seeds.Stream.LABEL_SAMPLING, have, device=sampler.device)
        rng = seeds.rng(cfg.run.seed, seeds.Stream.LABEL_SPLITS, have)
        specs = []
        with StageProgress("sampling for the human evaluators", len(queries) * cfg.labels.k, console=console, log=log,
                           unit="continuations") as progress:
            groups = sampler.continuations(queries, cfg.labels.k, gen, batch_size=cfg.labels.sample_batch_size,
                                           progress=progress)
        for q, group in zip(queries, groups):
            split = "valid" if rng.random() < cfg.labels.valid_fraction else "train"
            specs.append(dict(query_text=q.text, query_token_ids=q.token_ids, split=split, batch=batch,
                              source="offline", run_id=run_id,
                              samples=[NewSample(c.text, c.response_ids, policy=policy, iteration=iteration,
                                                 seed=cfg.run.seed, run_id=run_id) for c in group]))
        store.create_items(specs)
        log(f"human evaluators: {len(specs)} best-of-{cfg.labels.k} items of the initial Apprentice in the store "
            f"(sampling {time.time() - t0:.0f}s)")
    if labeler is not None:
        todo = store.items_without_labels(labeler=store.get_or_create_labeler(labeler.name, kind="program",
                                                                              role="program").id, batch=batch)
        rng = seeds.rng(cfg.run.seed, seeds.Stream.LABEL_SPLITS, have)
        n = len(label_items(store, labeler, todo, rng=rng, guideline_version=cfg.labels.guideline_version).written)
        log(f"human evaluators ({labeler.name}): labeled {n} comparisons (total {time.time() - t0:.0f}s)")
        return len(store.comparisons(batch=batch))
    need = min(cfg.online.min_initial_labels, cfg.labels.num_comparisons)
    deadline = time.time() + cfg.online.wait_timeout_s
    log(f"waiting for the human evaluators to label {need} items of batch {batch!r} in the labeling app "
        f"(megacoach label serve --db {store_url(cfg, RunDir(cfg.run.out))})")
    while (n := len(store.comparisons(batch=batch))) < need:
        if time.time() > deadline:
            raise HaltError(f"only {n} of {need} labels arrived within {cfg.online.wait_timeout_s:.0f}s; "
                            f"resume with `megacoach train --resume {cfg.run.out}` when the labelers are back")
        time.sleep(2.0)
    return n


def normalisation_samples(cfg: Config, store, run_id: str, pad_id: int):
    """The INITIAL Apprentice's samples the Values Coach is normalised on, from the offline labels: query + truncated
    response sequences, or with `reward.model` (query ids, response ids) pairs, which a coach with its own tokenizer
    reads as text."""
    if cfg.reward.model is None:
        return normalisation_sequences(store, run_id, cfg.reward.normalize_samples, pad_id, cfg.task.query_length)
    pairs = [(list(c.query_token_ids), list(s.token_ids)) for c in store.comparisons(batch=f"{run_id}/offline")
             for s in c.samples]
    return pairs[:cfg.reward.normalize_samples]


def normalisation_sequences(store, run_id: str, n: int, pad_id: int, query_length: int) -> torch.Tensor:
    """Query + truncated response sequences of the INITIAL Apprentice, from the offline labels."""
    seqs = []
    for c in store.comparisons(batch=f"{run_id}/offline"):
        for s in c.samples:
            seqs.append(left_pad([c.query_token_ids], pad_id, query_length)[0].tolist() + list(s.token_ids))
            if len(seqs) >= n:
                break
        if len(seqs) >= n:
            break
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long, device="cpu")


def resolve_hardware(cfg: Config, dist: Dist | None = None) -> hardware.Hardware:
    """The run's device and precisions, for this process (its local GPU under several processes)."""
    dist = dist or Dist.single()
    return hardware.resolve(cfg, dist.local_rank, dist.processes)


def values_coach_path(cfg: Config, run: RunDir) -> Path:
    """Where the run's Values Coach is read from (reward.path) or saved to (RUN_DIR/values_coach)."""
    return Path(cfg.reward.path) if cfg.reward.path else run.path / "values_coach"


def values_coach(cfg: Config, run: RunDir, store, tok, run_id: str, log, dist: Dist | None = None,
                 hw: hardware.Hardware | None = None, defer: bool = False):
    """Stage 3: load RUN_DIR/values_coach (or reward.path) or train it on the labels so far, on the run's device.
    Returns (the Values Coach, its training metrics or None when loaded).

    `defer` (one process, LoRA on the Apprentice): the Values Coach is not loaded here but in `build_trainer`, from
    `values_coach_path`, where a LoRA coach on the Apprentice's base joins it without a second copy of the base; one
    trained here is saved and freed (its copy of the base, its optimiser state) before PPO's models are built.
    The returned coach is then None.
    Several processes: rank 0 reads the store and the files and hands the comparisons (or the loaded
    Values Coach) to the others; all of them train it together; rank 0 saves it."""
    dist = dist or Dist.single()
    hw = hw or resolve_hardware(cfg, dist)
    path = values_coach_path(cfg, run)

    def saved() -> bool:
        if (path / "reward_config.json").is_file():
            return True
        if cfg.reward.path:
            raise ConfigError(f"reward.path: no Values Coach at {path} (expected reward_config.json)")
        return False

    if dist.run_on_main(saved):
        if defer:
            log(f"Values Coach: read from {path} when PPO's models are built")
            return None, None
        log(f"Values Coach: loaded from {path}")
        coach = dist.run_on_main(RewardModel.from_pretrained, path, policy_tokenizer=tok,  # handed over on the host
                                 read_text=cfg.reward.model is not None)
        return hardware.move(coach, hw.device).set_precision(hw.values_coach), None

    def labels():
        train = as_comparisons(store.comparisons(split="train"))
        valid = as_comparisons(store.comparisons(split="valid"))
        return train, valid, normalisation_samples(cfg, store, run_id, tok.pad_token_id)

    train, valid, norm = dist.run_on_main(labels)
    model, metrics = retrain_from_scratch(cfg.model.name_or_path, train, valid, cfg.reward, normalisation_samples=norm,
                                          seed=cfg.run.seed, log=log,
                                          dtype=hardware.weights_dtype_name(hw.values_coach_training), tokenizer=tok,
                                          device=hw.device, dist=dist, precision=hw.values_coach_training)

    def save() -> None:
        model.save_pretrained(path)
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))

    dist.run_on_main(save)
    if defer:  # its copy of the base goes now; build_trainer reads the saved coach back (the same weights)
        del model
        gc.collect()
        return None, metrics
    return model.set_precision(hw.values_coach), metrics


# ------------------------------------------------------------------------------------------ the composition root
def train_queries(cfg: Config, tok) -> list[Query]:
    """PPO's pool of training queries: eight batches' worth, at least 512."""
    return load_queries(cfg.task, tok, "train", max(cfg.ppo.batch_size * 8, 512),
                        seeds.seed_of(cfg.run.seed, seeds.Stream.TRAIN_QUERIES))


def build_trainer(cfg: Config, *, lm=None, tok=None, values_coach=None, queries: list[Query] | None = None,
                  generator: ResponseGenerator | None = None, dist: Dist | None = None,
                  hw: hardware.Hardware | None = None, values_coach_path: str | Path | None = None) -> PPOTrainer:
    """The PPO trainer of a run, assembled in one place (`megacoach train`, the guards' scenarios, benchmarks
    and tests all build it here): the Apprentice (`lm`, default `model.name_or_path` loaded), the frozen
    original model for the Coherence Coach, the Values Coach (default: `reward.path`, else a fresh head on the
    base model, seeded `run.seed`), the training queries (default `train_queries`) and the sampler.

    Every model is put here on the run's device (`hw`, default resolved from `run.device` for this process) in its
    precision (`model.precision`, `model.reference_precision`, `reward.precision`); the Apprentice's log-probs are
    checked once against its own forward (`lm.hf.check_logits`). With `ppo.lora_r` the Apprentice is `lm` with a
    LoRA adapter (lm.adapters) and the original model is the same weights with the adapter off; a LoRA Values Coach
    over the same base joins it as a second adapter: one saved (`values_coach_path`, default `reward.path`) is read
    straight onto that base (reward.model.load_onto_base), never loading a second copy of it."""
    hw = hw or resolve_hardware(cfg, dist)
    hardware.check_trainable(hw.apprentice, bool(cfg.ppo.lora_r))  # no half-precision weight trains directly
    if lm is None:
        lm, tok = hardware.load_model(cfg, hw)
    hardware.place(lm, hw.device, hw.apprentice)
    check_logits(lm, tok.pad_token_id)
    coach_path = values_coach_path or (cfg.reward.path if values_coach is None else None)
    if cfg.ppo.lora_r:  # one copy of the weights: the Apprentice adapts it, the original model switches it off
        lm = add_lora(lm, cfg.ppo.lora_r, cfg.ppo.lora_alpha, cfg.ppo.lora_dropout, cfg.ppo.lora_target_modules)
        ref = AdapterOff(lm)  # (over a bf16 base the adapter trains in float32: lm.adapters.add_lora)
        if values_coach is None and coach_path and cfg.reward.model is None:  # a saved LoRA Values Coach on this
            values_coach = load_onto_base(coach_path, lm, cfg.model.name_or_path, tok,  # base: no second copy
                                          hw.values_coach)
    else:
        ref = hardware.set_precision(frozen_reference(lm), hw.reference)
    if values_coach is None:
        if coach_path:
            values_coach = RewardModel.from_pretrained(coach_path, policy_tokenizer=tok, device=hw.device,
                                                       read_text=cfg.reward.model is not None)
        else:
            values_coach = RewardModel.for_run(cfg.reward, cfg.model.name_or_path, tokenizer=tok, seed=cfg.run.seed)
        values_coach.eval()
    hardware.move(values_coach, hw.device).set_precision(hw.values_coach)
    if cfg.ppo.lora_r:
        values_coach.share_base(lm)  # a LoRA Values Coach on the same base: its adapter joins it (one base copy)
    if cfg.ppo.gradient_checkpointing:  # only the update's backward pass recomputes (sampling is inference)
        enable_checkpointing(lm, cfg.ppo.checkpoint_recompute)
    queries = train_queries(cfg, tok) if queries is None else queries
    trainer = PPOTrainer(cfg, lm, ref, tok, values_coach, queries, generator=generator, dist=dist)
    if cfg.run.compile and not trainer.apprentice.fused_head:  # the fused head needs no compiler
        blocker = hardware.compile_blocker(hw.device)
        if blocker is None:
            hardware.compile_in_process()  # no pool of compile-worker processes (memory, no gain: hardware.py)
            trainer.apprentice.compile_head()
        else:
            warnings.warn(f"run.compile: staying eager: {blocker}", stacklevel=2)
    return trainer


def eval_queries(cfg: Config, tok, n: int | None = None) -> list[Query]:
    """The held-out queries of the before/after comparison (the pipeline, the loop and the incident agree)."""
    return load_queries(cfg.task, tok, "eval", cfg.run.eval_queries if n is None else n,
                        seeds.seed_of(cfg.run.seed, seeds.Stream.EVAL_QUERIES))


# ------------------------------------------------------------------------------------------ the run
def train(cfg: Config, resume: bool = False, console=None, dist: Dist | None = None) -> dict:
    """Run (or resume) the whole offline loop. Returns a summary; raises HaltError when halted.

    The guards watch the run when `guards.enabled`. Under `accelerate launch` / `torchrun` (several processes;
    `dist`, default from the environment), every process holds the models and trains them together
    (megacoach/distributed.py); rank 0 alone writes the run folder, talks to the label store, the labelers and
    the guards, and returns the summary (the others return {} when rank 0 finishes, or raise its halt)."""
    own_dist = dist is None
    dist = dist or Dist.from_env()
    try:
        return _train(cfg, resume, console, dist)
    finally:
        if own_dist:
            dist.close()


def _open_run_folder(run: RunDir, cfg: Config, resume: bool) -> None:
    if resume:
        if not (run.path / "config.yaml").is_file():
            raise ConfigError(f"--resume {run.path}: not a megacoach run folder (no config.yaml)")
        run.clear_for_resume()
    elif (run.ckpt_dir / "latest.json").is_file() or (run.path / "values_coach").exists():
        raise ConfigError(f"run.out {run.path} already holds a run; pass --resume {run.path} to continue it, "
                          "or choose another --out")
    run.create(cfg)


def _train(cfg: Config, resume: bool, console, dist: Dist) -> dict:
    check_world(cfg, dist)  # a process count that cannot split the batches: ConfigError before anything is written
    if cfg.reward.model is not None:  # the Values Coach's own base: a missing folder is said now, not after labeling
        resolve_model_path(cfg.reward.model, field="reward.model")
    console = console or Console()
    if not dist.is_main:
        console = Console(quiet=True)  # rank 0 speaks for all processes
    log = console.print
    run = RunDir(cfg.run.out)
    dist.run_on_main(_open_run_folder, run, cfg, resume)  # several processes: rank 0 alone writes files
    seed_everything(dist.seed(cfg.run.seed), dist.threads(cfg.run.threads), cfg.run.mmap_threshold_mib)  # seed + rank * 100003
    run_id = run.path.resolve().name
    log(f"[bold]megacoach[/] run {run.path}: {STAGES}")
    if dist.processes > 1:
        log(f"data-parallel over {dist.processes} processes, {dist.threads(cfg.run.threads)} torch thread(s) each "
            "(rank 0 writes the run folder and talks to the store)")
    for note in dist.launcher_notes():
        log(f"[yellow]note[/]: {note}")

    # where every model runs, and in which precision (said once, and kept in RUN_DIR/precision.json)
    hw = resolve_hardware(cfg, dist)
    hw.apply()
    log(f"hardware: {hw.line()}")
    dist.run_on_main(lambda: (run.path / "precision.json").write_text(json.dumps(hw.describe(), indent=2)))

    # 1. the Apprentice (and, in build_trainer, the original model)
    policy_lm, tok = hardware.load_model(cfg, hw)
    sampler = TaskSampler(HFGenerator(policy_lm, tok.pad_token_id, cfg.model.static_cache), tok, cfg.task)
    labeler = store = None

    def open_store() -> None:
        # imported here: SQLAlchemy and Alembic (~30 MiB) load only in a process that opens a store
        from megacoach.labels.store import LabelStore

        nonlocal labeler, store
        labeler = None if cfg.labels.labeler == "people" else load_labeler(cfg.labels.labeler)
        store = LabelStore(store_url(cfg, run))

    dist.run_on_main(open_store)

    # 2-3. the human evaluators and the Values Coach
    dist.run_on_main(collect_labels, cfg, store, sampler, labeler, run_id, f"{run_id}/offline", "initial", log,
                     console=console)
    defer = bool(cfg.ppo.lora_r) and cfg.reward.model is None and dist.processes == 1  # one base copy (build_trainer)
    coach, coach_metrics = values_coach(cfg, run, store, tok, run_id, log, dist, hw, defer=defer)
    if coach is not None:
        coach.eval()

    # held-out queries and the initial Apprentice's samples of them (kept for the before/after report)
    held_out = eval_queries(cfg, tok)

    def initial_samples() -> None:
        initial_path = run.path / "initial_samples.jsonl"
        if not initial_path.is_file():
            initial = [g[0] for g in sampler.continuations(held_out, 1, seeds.generator(
                cfg.run.seed, seeds.Stream.EVAL_SAMPLING, device=sampler.device))]
            initial_path.write_text("".join(json.dumps({"query": c.query.text, "response": c.text, "valid": c.valid})
                                            + "\n" for c in initial))

    dist.run_on_main(initial_samples)

    # 4. PPO
    trainer = build_trainer(cfg, lm=policy_lm, tok=tok, values_coach=coach, dist=dist, hw=hw,
                            values_coach_path=values_coach_path(cfg, run) if coach is None else None)
    if not dist.is_main:
        trainer.lockstep.follow(trainer)  # every iteration rank 0 runs, until it finishes (or halts: raised here too)
        return {}
    with dist.local():  # from here on rank 0 works alone, except inside trainer.iteration()
        try:
            summary, loop = _ppo(cfg, run, trainer, store, labeler, sampler, run_id, console, tok, resume, log, hw)
        except BaseException as err:
            if trainer.lockstep is not None:
                trainer.lockstep.release(err)
            raise
        if trainer.lockstep is not None:
            trainer.lockstep.release()

        # 5. before/after and the report
        summary.update(loop.finish(held_out, coach_metrics))
    log(f"[bold green]done[/]: report at {run.path / 'report.html'}")
    return summary


def _ppo(cfg: Config, run: RunDir, trainer, store, labeler, sampler, run_id: str, console, tok, resume: bool, log,
         hw: hardware.Hardware):
    """Stage 4 on rank 0: the PPO loop with the guards (and online labeling)."""
    online = None
    if cfg.online.enabled:
        mock = load_labeler(cfg.online.mock_labeler) if cfg.online.mock_labeler else None
        norm = normalisation_samples(cfg, store, run_id, tok.pad_token_id)
        online = OnlineLabeling(cfg, store, sampler, run_id, run.path, norm, log, mock, hw=hw)
    guards = Guards(cfg, trainer, store, labeler) if cfg.guards.enabled else None
    if guards is not None:  # the sampler against the trainer, before the first optimiser step of every update
        trainer.before_first_step = guards.before_first_step
    loop = PPOLoop(cfg, run, trainer, store, labeler, sampler, run_id, console, guards=guards, online=online)
    if resume:
        loop.restore()
    summary = loop.run()  # raises HaltError after saving everything when a guard or the Andon cord stops it
    return summary, loop


def assert_not_halted(run: RunDir) -> None:
    if run.halted_path.is_file():
        rec = json.loads(run.halted_path.read_text())
        raise HaltError(f"run {run.path} was halted: {rec.get('reason')}; fix the cause and pass --resume")
