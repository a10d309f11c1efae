"""`megacoach reward train|eval`: the Values Coach (reward model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from megacoach.commands.common import (ConfigOpt, DbOpt, ModelOpt, PresetOpt, SeedOpt, SetOpt, console, open_store,
                                       resolve_config)

app = typer.Typer(no_args_is_help=True, help="The Values Coach (reward model): train and evaluate.")


@app.command("train")
def reward_train(
    config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, model: ModelOpt = None, seed: SeedOpt = None,
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where to save the Values Coach.")] = Path("runs/values_coach"),
):
    """Train a fresh Values Coach on all labels in the store (normalised on the base policy's samples)."""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    import torch

    from megacoach import seeds
    from megacoach.continuations import TaskSampler
    from megacoach.hardware import load_model, weights_dtype_name
    from megacoach.pipeline import resolve_hardware, seed_everything
    from megacoach.reward.train import retrain_from_scratch
    from megacoach.sampling import HFGenerator
    from megacoach.tasks import load_queries

    cfg = resolve_config(config, preset, set_, model__name_or_path=model, run__seed=seed, labels__db=db)
    seed_everything(cfg.run.seed, cfg.run.threads, cfg.run.mmap_threshold_mib)
    store = open_store(db, cfg)
    hw = resolve_hardware(cfg)
    lm, tok = load_model(cfg, hw)
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
    qs = load_queries(cfg.task, tok, "train", cfg.reward.normalize_samples,
                      seeds.seed_of(cfg.run.seed, seeds.Stream.NORMALISATION_QUERIES))
    conts = [g[0] for g in sampler.continuations(qs, 1, torch.Generator(device=sampler.device).manual_seed(cfg.run.seed))]
    norm = (_sequences(conts, tok.pad_token_id, cfg.task.query_length) if cfg.reward.model is None
            else [(c.query.token_ids, c.response_ids) for c in conts])  # a coach of its own base reads them as text
    model_, metrics = retrain_from_scratch(cfg.model.name_or_path, store.comparisons(split="train"),
                                           store.comparisons(split="valid"), cfg.reward, normalisation_samples=norm,
                                           seed=cfg.run.seed, log=console.print, tokenizer=tok, device=hw.device,
                                           dtype=weights_dtype_name(hw.values_coach_training),
                                           precision=hw.values_coach_training)
    model_.save_pretrained(out)
    console.print(f"Values Coach saved to {out}: held-out accuracy {metrics.get('valid_accuracy')} (with every "
                  f"choice reversed {metrics.get('valid_reversed_accuracy')})")


def _sequences(conts, pad_id: int, query_length: int):
    """Query (left-padded to query_length) + response token ids per continuation, right-padded to one width."""
    # torch-heavy: only reached from `reward train`, which has imported torch already
    import torch

    from megacoach.lm.hf import left_pad

    rows = [left_pad([c.query.token_ids], pad_id, query_length)[0].tolist() + c.response_ids for c in conts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device="cpu")


@app.command("eval")
def reward_eval(
    path: Annotated[Path, typer.Argument(help="A saved Values Coach folder.")],
    db: DbOpt = None,
    split: Annotated[str, typer.Option("--split", help="train or valid")] = "valid",
):
    """Best-of-K accuracy and loss of a Values Coach on the store's labels, and the accuracy with every choice
    reversed (below chance for a coach that agrees with the labelers)."""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.reward.model import RewardModel
    from megacoach.reward.train import evaluate

    coach = RewardModel.from_pretrained(path)
    res = evaluate(coach, open_store(db).comparisons(split=split))
    if not res["n"]:
        console.print(f"Values Coach {path}: no {split} comparisons in the label store")
        return
    console.print(f"Values Coach {path} on {res['n']} {split} comparisons: accuracy {res['accuracy']:.4f} "
                  f"(chance {res['chance']:.4f}; with every choice reversed {res['reversed_accuracy']:.4f}), "
                  f"loss {res['loss']:.4f}")
