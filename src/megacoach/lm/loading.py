"""Loading any causal LM + tokenizer with one code path: the built-in model, a local folder, a GGUF file, or a hub name.

`from_pretrained(name_or_path)` is the only loader; 'builtin' resolves to the folder shipped in the package, a
`.gguf` file to its converted folder in megacoach's cache (converted on first use: megacoach/lm/gguf.py), the name
of a model `megacoach model get` fetches (megacoach/lm/catalog.py) to the folder it wrote.
The pad token is a dedicated token (never EOS): if a tokenizer has none, `<|pad|>` is added and the
embeddings are resized (the new row is never sampled: sampling masks it out).
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import torch

from megacoach.errors import ConfigError, DataError
from megacoach.lm import catalog, gguf
from megacoach.lm.hf import require_transformers

PAD_TOKEN = "<|pad|>"


def builtin_model_path() -> Path:
    return Path(str(resources.files("megacoach") / "lm" / "builtin_model"))


def resolve_model_path(name_or_path: str, field: str = "model.name_or_path") -> str:
    """The folder (or hub name) of `name_or_path`; ConfigError naming `field` for a missing folder or file. A GGUF
    file resolves to its converted folder (converted into the cache on first use)."""
    if name_or_path == "builtin":
        p = builtin_model_path()
        if not (p / "config.json").is_file():
            raise ConfigError(f"{field}: the built-in model is missing at {p}; rebuild it with "
                              "`megacoach pretrain --out src/megacoach/lm/builtin_model`")
        return str(p)
    if name_or_path in catalog.CATALOG:  # a model `megacoach model get` fetches by name
        return str(catalog.fetched_folder(name_or_path, field))
    if gguf.is_gguf(name_or_path):
        return str(gguf.cached_folder(name_or_path, field=field, log=_tell))
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"{field}: no model folder at {name_or_path!r} (expected a Hugging Face "
                          "model folder with config.json, 'builtin', or a hub name)")
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def _tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types for a corrupt or missing tokenizer
        raise DataError(f"tokenizer at {name_or_path!r} cannot be loaded: {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]} (expected tokenizer.json / tokenizer_config.json)") from None
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"
    return tok


# GPT-2's "gelu_new" is the tanh approximation of GELU written as five elementwise Python ops; PyTorch's fused
# kernel computes the same formula in one pass (equal up to float rounding, ~2e-6 on the built-in model).
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def load_causal_lm(name_or_path: str, dtype: str = "float32", tokenizer=None, fused_activation: bool = True,
                   device: torch.device | str | None = None):
    """(model, tokenizer). The model is in eval mode, dropout disabled (the paper uses none), its weights in
    `dtype`, on `device` (default: where transformers puts it, the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    require_transformers()
    path = resolve_model_path(name_or_path)
    tok = tokenizer or load_tokenizer(name_or_path)
    try:
        cfg = AutoConfig.from_pretrained(path)
        for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, 0.0)
        act = getattr(cfg, "activation_function", None)
        if fused_activation and act in FUSED_ACTIVATIONS:
            cfg.activation_function = FUSED_ACTIVATIONS[act]
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:
        raise DataError(f"model at {name_or_path!r} cannot be loaded: {str(err).splitlines()[0][:300]}") from None
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok

