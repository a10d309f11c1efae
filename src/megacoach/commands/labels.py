"""`megacoach label ...` (the human evaluators' side) and `megacoach reward ...` (the Values Coach)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from megacoach.cli import ConfigOpt, ModelOpt, PresetOpt, SeedOpt, SetOpt, app, console, resolve_config

label_app = typer.Typer(no_args_is_help=True, help="Human evaluators: collect, import, export labels; the labeling app.")
reward_app = typer.Typer(no_args_is_help=True, help="The Values Coach (reward model): train and evaluate.")
app.add_typer(label_app, name="label")
app.add_typer(reward_app, name="reward")

DbOpt = Annotated[Optional[str], typer.Option("--db", help="labels.db: SQLAlchemy URL or SQLite path of the label store.")]


def _store(db: str | None, cfg=None):
    from megacoach.labels.store import LabelStore

    return LabelStore(db or (cfg.labels.db if cfg is not None else None) or "sqlite:///labels.db")


@label_app.command("auto")
def label_auto(
    config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, model: ModelOpt = None, seed: SeedOpt = None,
    db: DbOpt = None,
    labeler: Annotated[Optional[str], typer.Option("--labeler", help="labels.labeler: vader, vader:invert, vader:noise=0.7, module:callable")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="labels.num_comparisons")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="labels.k (continuations per comparison)")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch name stored with the items.")] = "auto",
):
    """Sample queries and K continuations from a policy and label them with a mock labeler into the store."""
    import torch

    from megacoach.labels.labelers import load_labeler
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import collect_labels, seed_everything
    from megacoach.continuations import TaskSampler
    from megacoach.sampling import HFGenerator

    cfg = resolve_config(config, preset, set_, model__name_or_path=model, run__seed=seed, labels__db=db,
                         labels__labeler=labeler, labels__num_comparisons=n, labels__k=k)
    seed_everything(cfg.run.seed, cfg.run.threads, cfg.run.mmap_threshold_mib)
    lab = load_labeler(cfg.labels.labeler)
    store = _store(db, cfg)
    lm, tok = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype)
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
    total = collect_labels(cfg, store, sampler, lab, run_id=batch, batch=batch, policy=cfg.model.name_or_path,
                           log=console.print)
    console.print(f"store now holds {store.count_comparisons()} comparisons ({total} in batch {batch!r})")
    del torch


@label_app.command("export")
def label_export(
    out: Annotated[Path, typer.Argument(help="Output: a .jsonl file, or a folder for a Hugging Face dataset (--format hf).")],
    db: DbOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or hf")] = "jsonl",
    split: Annotated[Optional[str], typer.Option("--split", help="train or valid (default: both)")] = None,
):
    """Export labels (with samples, provenance, labeler, guideline version, timestamps)."""
    from megacoach.errors import ConfigError
    from megacoach.labels.io import export_dataset, export_jsonl

    store = _store(db)
    if fmt == "jsonl":
        n = export_jsonl(store, out, split=split)
    elif fmt == "hf":
        n = len(export_dataset(store, out, split=split))
    else:
        raise ConfigError(f"--format: expected 'jsonl' or 'hf', got {fmt!r}")
    console.print(f"exported {n} comparisons to {out}")


@label_app.command("import")
def label_import(
    path: Annotated[Path, typer.Argument(help="A megacoach .jsonl export, or an OpenAI best-of-4 .json label file.")],
    db: DbOpt = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer for OpenAI files (their GPT-2's: 'gpt2' or a folder).")] = None,
    valid_fraction: Annotated[float, typer.Option("--valid-fraction", help="Share of imported OpenAI records held out.")] = 0.0,
):
    """Import labels; the whole import is one transaction (all or nothing)."""
    from megacoach.labels.io import import_labels
    from megacoach.lm.loading import load_tokenizer

    store = _store(db)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    kwargs = {"valid_fraction": valid_fraction} if path.suffix == ".json" else {}
    res = import_labels(store, path, tok, **kwargs)
    console.print(f"imported {res.comparisons} comparisons ({res.items} items) as batch {res.batch!r}")


try:  # the labeling web app's commands (serve, create-admin, invite, token)
    from megacoach.app.cli import register as _register_app

    _register_app(label_app)
except ImportError:  # pragma: no cover
    pass


@reward_app.command("train")
def reward_train(
    config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, model: ModelOpt = None, seed: SeedOpt = None,
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where to save the Values Coach.")] = Path("runs/values_coach"),
):
    """Train a fresh Values Coach on all labels in the store (normalised on the base policy's samples)."""
    import torch

    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import seed_everything
    from megacoach.reward.train import retrain_from_scratch
    from megacoach.continuations import TaskSampler
    from megacoach.sampling import HFGenerator
    from megacoach.tasks import load_queries

    cfg = resolve_config(config, preset, set_, model__name_or_path=model, run__seed=seed, labels__db=db)
    seed_everything(cfg.run.seed, cfg.run.threads, cfg.run.mmap_threshold_mib)
    store = _store(db, cfg)
    lm, tok = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype)
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
    qs = load_queries(cfg.task, tok, "train", cfg.reward.normalize_samples, cfg.run.seed + 5)
    conts = [g[0] for g in sampler.continuations(qs, 1, torch.Generator().manual_seed(cfg.run.seed))]
    norm = _sequences(conts, tok.pad_token_id, cfg.task.query_length)
    model_, metrics = retrain_from_scratch(cfg.model.name_or_path, store.comparisons(split="train"),
                                           store.comparisons(split="valid"), cfg.reward, normalisation_samples=norm,
                                           seed=cfg.run.seed, log=console.print, tokenizer=tok)
    model_.save_pretrained(out)
    console.print(f"Values Coach saved to {out}: held-out accuracy {metrics.get('valid_accuracy')}")


def _sequences(conts, pad_id: int, query_length: int):
    import torch

    from megacoach.lm.hf import left_pad

    rows = [left_pad([c.query.token_ids], pad_id, query_length)[0].tolist() + c.response_ids for c in conts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])


@reward_app.command("eval")
def reward_eval(
    path: Annotated[Path, typer.Argument(help="A saved Values Coach folder.")],
    db: DbOpt = None,
    split: Annotated[str, typer.Option("--split", help="train or valid")] = "valid",
):
    """Best-of-K accuracy and loss of a Values Coach on the store's labels."""
    from megacoach.reward.model import RewardModel
    from megacoach.reward.train import evaluate

    coach = RewardModel.from_pretrained(path)
    res = evaluate(coach, _store(db).comparisons(split=split))
    console.print(f"Values Coach {path} on {res['n']} {split} comparisons: accuracy {res['accuracy']:.4f}, "
                  f"loss {res['loss']:.4f}")
