"""Shared test fixtures.

`tiny_model_dir`: a tiny GPT-2 (2 layers, width 32, random weights) with a ~300-token byte-level BPE
tokenizer (special tokens <|endoftext|> and <|pad|>) trained on a few KB of Shakespeare, saved in the
Hugging Face format. Load it like any model: `load_causal_lm(str(tiny_model_dir))`.
Session-scoped and read-only: copy it before changing files in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_VOCAB = 300
TINY_TEXT_CHARS = 6000


def tiny_corpus_texts(max_chars: int = TINY_TEXT_CHARS) -> list[str]:
    """A few KB of speeches from one held-in play (ends of sentences included, so '.' truncation works)."""
    from megacoach.lm.corpus import parse_play, plays_dir

    play = plays_dir() / "comedies" / "as-you-like-it.md"
    texts, total = [], 0
    for speech in parse_play(play.read_text("utf-8")):
        texts.append(speech)
        total += len(speech)
        if total >= max_chars:
            break
    return texts


def build_tiny_model(out_dir: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
                     n_positions: int = 128, vocab_size: int = TINY_VOCAB, embedding_scale: float = 1.0) -> Path:
    """Build and save the tiny tokenizer + GPT-2 to `out_dir`; returns `out_dir`.

    embedding_scale multiplies the (tied) token embeddings: at 1 the random model's next-token distributions are
    nearly uniform (logits within about +-0.5 nats), at 5 they are peaked like a trained model's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from megacoach.lm.pretrain import train_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(tiny_corpus_texts(), vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    if embedding_scale != 1.0:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(embedding_scale)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder of a tiny random-weight GPT-2 + trained tokenizer (vocab ~300, n_positions 128)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
