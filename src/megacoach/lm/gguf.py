"""A GGUF file as a model source: converted once into a Hugging Face model folder, then loaded like any folder.

transformers' own GGUF loader reads the file (`from_pretrained(folder, gguf_file=NAME)` dequantises every tensor to
float32 and maps the GGUF names to the family's); megacoach dequantises nothing itself. The model that loader returns
is marked as GGUF-quantised and refuses `save_pretrained`, so the conversion builds a plain model of the same family
from its config, loads the state dict into it and saves that (safetensors), with the tokenizer and its chat template.

Converted folders live in a cache keyed by the file's content (SHA-256): `cache_root()/<first 16 hex digits>`. The
same file under another name or path converts once; a changed file converts again. A folder is written under a
temporary name and renamed when complete, so an interrupted conversion leaves nothing that looks finished.

The `gguf` package (the extra `megacoach[gguf]`) is needed only to convert; a converted folder loads without it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from megacoach.errors import ConfigError, DataError

GGUF_SUFFIX = ".gguf"
INSTALL_HINT = "pip install 'megacoach[gguf]'"
CACHE_ENV = "MEGACOACH_CACHE"  # where converted models (and downloaded model files) are kept
SOURCE_FILE = "megacoach_gguf_source.json"  # written into a converted folder: where it came from


def is_gguf(name_or_path: str) -> bool:
    """Whether `name_or_path` names a GGUF file (by its suffix; it need not exist)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    """The folder converted models are kept in: $MEGACOACH_CACHE, else $XDG_CACHE_HOME/megacoach, else
    ~/.cache/megacoach."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "megacoach"


def content_hash(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of the file's bytes (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_gguf() -> None:
    """ConfigError, one line saying how to install it, where the `gguf` package is missing."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader imports it)
    except ImportError:
        raise ConfigError(f"reading a GGUF file needs the `gguf` package: {INSTALL_HINT}") from None


def _check_file(path: Path, field: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{field}: no GGUF file at {str(path)!r}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise DataError(f"{field}: {str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")


def convert(gguf_file: str | Path, out: str | Path, field: str = "model") -> Path:
    """Write `gguf_file` as a Hugging Face model folder at `out` (config, safetensors weights in float32, tokenizer
    with its chat template). Returns `out`. `out` must not exist yet or be empty."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_file).expanduser(), Path(out).expanduser()
    _check_file(src, field)
    require_gguf()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: the output folder exists and is not empty")
    folder, name = str(src.parent), src.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        raise DataError(f"{field}: transformers cannot read {str(src)!r}: {str(err).splitlines()[0][:300]}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantised: the saved model is a plain one
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # tied embeddings: the loaded state dict names both the embedding and the head; strict loading checks that every
    # weight of the plain model was given one
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise DataError(f"{field}: the weights read from {str(src)!r} do not fit a {loaded.config.model_type} model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / SOURCE_FILE).write_text(json.dumps({"gguf_file": name, "sha256": content_hash(src),
                                               "parameters": sum(p.numel() for p in plain.parameters())}, indent=2))
    return out


def cached_folder(gguf_file: str | Path, field: str = "model.name_or_path", log=None) -> Path:
    """The converted folder of `gguf_file` in the cache, converting it on first use (`log` is told when it does)."""
    src = Path(gguf_file).expanduser()
    _check_file(src, field)
    digest = content_hash(src)
    target = cache_root() / "gguf" / digest[:16]
    if (target / SOURCE_FILE).is_file():
        return target
    require_gguf()
    if log is not None:
        log(f"converting {src.name} (GGUF) into a model folder at {target} (once; kept for later runs)")
    tmp = target.parent / f".{target.name}.{os.getpid()}.{int(time.time())}"
    try:
        convert(src, tmp, field=field)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first: keep its folder
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
