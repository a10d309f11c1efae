"""`megacoach label auto|export|import`: the human evaluators' labels (the labeling app's commands are in
megacoach.app.cli; megacoach.cli puts both in the `label` group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from megacoach.commands.common import (ConfigOpt, DbOpt, ModelOpt, PresetOpt, SeedOpt, SetOpt, console, open_store,
                                       resolve_config)
from megacoach.errors import ConfigError

app = typer.Typer()


@app.command("auto")
def label_auto(
    config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, model: ModelOpt = None, seed: SeedOpt = None,
    db: DbOpt = None,
    labeler: Annotated[Optional[str], typer.Option("--labeler", help="labels.labeler: vader, vader:invert, vader:noise=0.7, module:callable")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="labels.num_comparisons")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="labels.k (continuations per comparison)")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch name stored with the items.")] = "auto",
):
    """Sample queries and K continuations from a policy and label them with a mock labeler into the store."""
    # torch-heavy (and the mock labelers, 3 ms): imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.continuations import TaskSampler
    from megacoach.labels.labelers import load_labeler
    from megacoach.hardware import load_model
    from megacoach.pipeline import collect_labels, seed_everything
    from megacoach.sampling import HFGenerator

    cfg = resolve_config(config, preset, set_, model__name_or_path=model, run__seed=seed, labels__db=db,
                         labels__labeler=labeler, labels__num_comparisons=n, labels__k=k)
    seed_everything(cfg.run.seed, cfg.run.threads, cfg.run.mmap_threshold_mib)
    lab = load_labeler(cfg.labels.labeler)
    store = open_store(db, cfg)
    lm, tok = load_model(cfg)
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
    total = collect_labels(cfg, store, sampler, lab, run_id=batch, batch=batch, policy=cfg.model.name_or_path,
                           log=console.print)
    console.print(f"store now holds {store.count_comparisons()} comparisons ({total} in batch {batch!r})")


@app.command("export")
def label_export(
    out: Annotated[Path, typer.Argument(help="Output: a .jsonl file, or a folder for a Hugging Face dataset (--format hf).")],
    db: DbOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or hf")] = "jsonl",
    split: Annotated[Optional[str], typer.Option("--split", help="train or valid (default: both)")] = None,
):
    """Export labels (with samples, provenance, labeler, guideline version, timestamps)."""
    # SQLAlchemy: imported when the command runs, keeps `megacoach --help` light
    from megacoach.labels.io import export_dataset, export_jsonl

    store = open_store(db)
    if fmt == "jsonl":
        n = export_jsonl(store, out, split=split)
    elif fmt == "hf":
        n = len(export_dataset(store, out, split=split))
    else:
        raise ConfigError(f"--format: expected 'jsonl' or 'hf', got {fmt!r}")
    console.print(f"exported {n} comparisons to {out}")


@app.command("import")
def label_import(
    path: Annotated[Path, typer.Argument(help="A megacoach .jsonl export, or an OpenAI best-of-4 .json label file.")],
    db: DbOpt = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer for OpenAI files (their GPT-2's: 'gpt2' or a folder).")] = None,
    valid_fraction: Annotated[float, typer.Option("--valid-fraction", help="Share of imported OpenAI records held out.")] = 0.0,
):
    """Import labels; the whole import is one transaction (all or nothing)."""
    # SQLAlchemy and torch: imported when the command runs, keeps `megacoach --help` light
    from megacoach.labels.io import import_labels
    from megacoach.lm.loading import load_tokenizer

    store = open_store(db)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    kwargs = {"valid_fraction": valid_fraction} if path.suffix == ".json" else {}
    res = import_labels(store, path, tok, **kwargs)
    console.print(f"imported {res.comparisons} comparisons ({res.items} items) as batch {res.batch!r}")
