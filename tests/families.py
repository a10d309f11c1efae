"""Tiny random-weight models of several transformers families, made locally with the tests' tokenizer.

Each is 2 layers of width 32 (OPT: hidden 64 projected to 32, so `word_embed_proj_dim != hidden_size`), saved with
the tiny tokenizer in the Hugging Face format so that every loader megacoach has reads it like any model folder.
Settings that change the logits (Granite's `logits_scaling`, Cohere's `logit_scale`, Gemma-2/3's
`final_logit_softcapping`) are set far from 1 so that a missed one shows.
"""

from __future__ import annotations

from pathlib import Path

_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)

FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=128)),
    "llama": ("LlamaConfig", _LLAMA),
    "qwen2": ("Qwen2Config", _LLAMA),
    "qwen3": ("Qwen3Config", dict(_LLAMA, head_dim=8)),
    "mistral": ("MistralConfig", _LLAMA),
    "opt": ("OPTConfig", dict(hidden_size=64, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=128)),
    "gemma": ("GemmaConfig", dict(_LLAMA, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(_LLAMA, head_dim=8, final_logit_softcapping=1.0, attn_logit_softcapping=50.0,
                                    sliding_window=16)),
    "gemma3": ("Gemma3TextConfig", dict(_LLAMA, head_dim=8, final_logit_softcapping=1.0, sliding_window=16)),
    "granite": ("GraniteConfig", dict(_LLAMA, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.5)),
    "cohere": ("CohereConfig", dict(_LLAMA, logit_scale=0.3)),
    "cohere2": ("Cohere2Config", dict(_LLAMA, logit_scale=0.3, sliding_window=16)),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128)),
    "phi3": ("Phi3Config", dict(_LLAMA, original_max_position_embeddings=128)),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, alibi=False)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                     max_position_embeddings=128, window_size=16)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128)),
    "stablelm": ("StableLmConfig", _LLAMA),
    "starcoder2": ("Starcoder2Config", _LLAMA),
    "olmo2": ("Olmo2Config", _LLAMA),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "codegen": ("CodeGenConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, n_ctx=128)),
    "persimmon": ("PersimmonConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=128)),
    "nemotron": ("NemotronConfig", _LLAMA),
}


def build_family_model(family: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random-weight model of `family`, with the tokenizer of `tokenizer_dir`, saved to `out_dir`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls, kwargs = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = getattr(transformers, cls)(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def build_chat_model(out_dir: Path, seed: int = 0, eos_logit: float = 1.5) -> Path:
    """A tiny random-weight Llama whose local tokenizer (the tests' 300-token BPE) has a chat template (role markers,
    each message ended by the EOS token) and whose EOS token is likely enough that sampled responses stop at it:
    the LM head's EOS row points along the mean final hidden state of some text, `eos_logit` long."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_corpus_texts
    from megacoach.lm.pretrain import train_tokenizer

    out_dir = Path(out_dir)
    tok_dir = out_dir.parent / (out_dir.name + "-tokenizer")
    tok = train_tokenizer(tiny_corpus_texts(), 300)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tok_dir)
    build_family_model("llama", out_dir, tok_dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.tensor([tok(" ".join(tiny_corpus_texts(2000)))["input_ids"][:120]], dtype=torch.long)
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        direction = h.mean(0) / h.mean(0).norm()
        model.get_output_embeddings().weight[tok.eos_token_id] = eos_logit * direction
    model.save_pretrained(out_dir)
    return out_dir
