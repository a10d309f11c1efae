"""A tiny GGUF file for the tests: a random-weight Llama (2 layers, width 32) with a byte-level BPE tokenizer, a
ChatML chat template and `<|im_end|>` as end of sequence, written with the `gguf` package (F32 tensors, named as
llama.cpp names them)."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokenizer_parts(texts: list[str], vocab_size: int = 300) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges) of a byte-level BPE trained on `texts`, the special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


def write_tiny_gguf(path: Path, texts: list[str], seed: int = 0, n_layer: int = 2, d: int = 32, n_head: int = 4,
                    n_kv: int = 2, ff: int = 64) -> Path:
    import gguf
    import numpy as np

    tokens, merges = _tokenizer_parts(texts)
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(d // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", w(vocab, d, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    hd = d // n_head
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(n_head * hd, d))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(n_kv * hd, d))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(n_kv * hd, d))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(d, n_head * hd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(ff, d))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(ff, d))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(d, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
