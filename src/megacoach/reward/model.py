"""The Values Coach (reward model): the base LM's trunk plus a scalar head, read at the last real token.

As in the paper's reference code (ORIG):
- the trunk is the base language model without its LM head; no dropout anywhere;
- the head is Linear(d_model, 1) with weight ~ N(0, 1/sqrt(d_model + 1)) and bias 0, where d_model is the width
  of the hidden state the trunk hands on (what the LM head reads: OPT's `word_embed_proj_dim` when it projects);
- precision (megacoach/hardware.py, `set_precision`): the trunk runs in the coach's precision (fp32, bf16 autocast
  over float32 weights, or bf16 weights); the head, gain and bias are float32 and score in float32;
- the raw reward of a query + response sequence is the head applied to the hidden state of its LAST REAL
  (non-pad) token; queries are left-padded and responses right-padded with the pad token, so with the
  attention mask and shifted position ids of `lm_inputs` padding changes nothing;
- the output is normalised: score = gain * raw + bias, with gain and bias non-trainable buffers set so that
  samples of the initial policy score mean 0, std 1 (normalize.py). Training uses the normalised output.
- `best_of_k(queries, responses)` scores K responses per query computing each query once (a KV cache
  repeated K times, differentiably): the same rewards as the full sequences at about half the cost.

With `reward.lora_r` (`add_lora`) the trunk trains through a LoRA adapter (PEFT): only the adapter and the head
change. With `reward.model` the coach may be another base model than the Apprentice's; when its tokenizer differs
it reads the Apprentice's tokens as text, tokenized again with its own (`read_from`, reward/retokenize.py).

Saved in the Hugging Face style (`save_pretrained` / `RewardModel.from_pretrained`):
  config.json + model.safetensors   the trunk (transformers `save_pretrained`; loads with AutoModel); with LoRA,
                                    adapter_config.json + adapter_model.safetensors instead (the adapter; the base
                                    is reloaded from reward_config.json's `base_model`)
  tokenizer files                   the tokenizer, so the Apprentice's can be checked against it
  reward_head.safetensors           head.weight, head.bias, gain, bias
  reward_config.json                base model, d_model, pad id, gain/bias, normalisation stats, LoRA settings
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from megacoach.errors import ConfigError, DataError
from megacoach.hardware import set_precision
from megacoach.lm.hf import (CACHE_KW, autocast, cache_of, device_of, hidden_size_of, lm_inputs, position_ids_from_mask,
                             precision_of, require_transformers)
from megacoach.lm.loading import load_causal_lm, load_tokenizer, resolve_model_path
from megacoach.reward.data import sequences_tensor
from megacoach.reward.retokenize import Retokenizer

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
FORMAT = "megacoach-values-coach"
FORMAT_VERSION = 1
_DROPOUT_ATTRS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout",
                  "summary_first_dropout")


def _no_dropout(module: nn.Module) -> None:
    cfg = getattr(module, "config", None)
    for attr in _DROPOUT_ATTRS:
        if cfg is not None and hasattr(cfg, attr):
            setattr(cfg, attr, 0.0)
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def last_real_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B] index of the last non-pad token of each row (0 for a row of pads only)."""
    mask = (input_ids != pad_id).long()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (mask * positions).argmax(dim=1)


def trunk_width(trunk: nn.Module) -> int:
    """The width of a bare trunk's output (no LM head to ask): OPT projects it to `word_embed_proj_dim`."""
    cfg = trunk.config
    return int(getattr(cfg, "word_embed_proj_dim", None) or getattr(cfg, "hidden_size", None) or cfg.n_embd)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map the same strings to the same ids (pad token included)."""
    return a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id


def check_same_tokenizer(reward_tokenizer, policy_tokenizer) -> None:
    """ConfigError unless the two tokenizers map the same strings to the same ids (pad token included)."""
    if policy_tokenizer is None or reward_tokenizer is None:
        return
    if not same_tokenizer(reward_tokenizer, policy_tokenizer):
        raise ConfigError(
            "the Values Coach's tokenizer differs from the Apprentice's "
            f"(vocabulary sizes {len(reward_tokenizer)} vs {len(policy_tokenizer)}, pad ids "
            f"{reward_tokenizer.pad_token_id} vs {policy_tokenizer.pad_token_id}); train the Values Coach "
            "from the Apprentice's base model (reward.path must match model.name_or_path), or set reward.model to "
            "the Values Coach's base so that it scores the decoded text")


class RewardModel(nn.Module):
    """The Values Coach. `forward(input_ids)` -> normalised scores [B]; `raw(input_ids)` -> raw rewards [B]."""

    def __init__(self, trunk: nn.Module, pad_id: int, base_model: str = "", tokenizer=None,
                 seed: int | None = None, d_model: int | None = None):
        super().__init__()
        if not getattr(trunk, "shares_base", False):  # a view of the Apprentice's trunk: its config is not ours
            _no_dropout(trunk)
        self.trunk = trunk
        self.d_model = int(d_model or trunk_width(trunk))
        self.pad_id = int(pad_id)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.normalisation: dict = {}
        self.lora: dict | None = None  # the adapter's settings when the trunk trains through LoRA (add_lora)
        self.retokenizer: Retokenizer | None = None  # set by read_from: the Apprentice's tokens reach it as text
        device = device_of(trunk)
        self.head = nn.Linear(self.d_model, 1, dtype=torch.float32, device=device)
        self.reset_head(seed)
        self.register_buffer("gain", torch.tensor(1.0, device=device))
        self.register_buffer("bias", torch.tensor(0.0, device=device))

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_base(cls, name_or_path: str, dtype: str = "float32", tokenizer=None, seed: int | None = None) -> "RewardModel":
        """A fresh Values Coach on the base LM `name_or_path` ('builtin', a folder, or a hub name)."""
        lm, tok = load_causal_lm(name_or_path, dtype=dtype, tokenizer=tokenizer)
        return cls(lm.base_model, tok.pad_token_id, base_model=name_or_path, tokenizer=tok, seed=seed,
                   d_model=hidden_size_of(lm))

    @classmethod
    def for_run(cls, reward_cfg, apprentice_base: str, tokenizer=None, dtype: str = "float32",
                seed: int | None = None) -> "RewardModel":
        """A fresh Values Coach as the run's `reward` section asks for it: on `reward.model` (default: the
        Apprentice's base `apprentice_base`, sharing its `tokenizer`; another base brings its own tokenizer and, when
        it differs from the Apprentice's, reads the Apprentice's tokens as text), with a LoRA adapter when
        `reward.lora_r` > 0."""
        name = reward_cfg.model or apprentice_base
        if reward_cfg.model is not None:
            resolve_model_path(reward_cfg.model, field="reward.model")  # a missing folder: named as reward.model
        if name == apprentice_base:
            model = cls.from_base(name, dtype=dtype, tokenizer=tokenizer, seed=seed)
        else:
            model = cls.from_base(name, dtype=dtype, seed=seed)
            model.read_from(tokenizer)
        if reward_cfg.lora_r:
            model.add_lora(reward_cfg.lora_r, reward_cfg.lora_alpha, reward_cfg.lora_dropout,
                           reward_cfg.lora_target_modules)
        return model

    def read_from(self, policy_tokenizer) -> None:
        """Score the tokens of `policy_tokenizer` (the Apprentice's): passed straight through when it is this coach's
        own tokenizer, else decoded and tokenized again with this coach's (reward/retokenize.py)."""
        if policy_tokenizer is None or self.tokenizer is None or same_tokenizer(self.tokenizer, policy_tokenizer):
            self.retokenizer = None
        else:
            self.retokenizer = Retokenizer(policy_tokenizer, self.tokenizer)

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | None = None) -> None:
        """Train the trunk through a LoRA adapter of rank `r` (PEFT; the base weights are frozen): only the adapter and
        the head train. The adapter starts as the identity, so the scores are unchanged until the first step."""
        from megacoach.lm.adapters import add_trunk_lora

        self.trunk = add_trunk_lora(self.trunk, r, alpha, dropout, target_modules)
        self.lora = {"r": int(r), "alpha": float(alpha), "dropout": float(dropout),
                     "target_modules": list(target_modules) if target_modules else None}

    def share_base(self, peft_lm) -> bool:
        """Score through the Apprentice's base instead of a copy of it: where this coach is a LoRA adapter on the same
        base weights (same model, precision and device) as the Apprentice's PEFT model `peft_lm`, its adapter joins
        that model (frozen) and this coach's own trunk is dropped; one copy of the base then serves the Apprentice,
        the original model and the Values Coach (lm.adapters.share_trunk). The same scores, exactly. False (nothing
        changed) where it cannot."""
        from megacoach.lm.adapters import has_adapter, share_trunk

        if not self.lora or self.retokenizer is not None or not has_adapter(self.trunk):
            return False
        shared = share_trunk(peft_lm, self.trunk, pad_id=self.pad_id)
        if shared is None:
            return False
        precision = self.precision
        self.trunk = shared
        set_precision(self.trunk, precision, cast=False)
        return True

    def reset_head(self, seed: int | None = None) -> None:
        """Head weight ~ N(0, 1/sqrt(d_model + 1)), bias 0 (ORIG's init_scale 1); drawn on the CPU, whatever the
        device (the same head everywhere for a seed)."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = 1.0 / math.sqrt(self.d_model + 1)
        with torch.no_grad():
            w = torch.randn(self.head.weight.shape, generator=gen, dtype=torch.float32, device="cpu") * std
            self.head.weight.copy_(w.to(self.head.weight.device, self.head.weight.dtype))
            self.head.bias.zero_()

    def set_precision(self, precision: str) -> "RewardModel":
        """Run the trunk in `precision` (fp32, bf16-mixed, bf16: megacoach/hardware.py); the head stays float32."""
        set_precision(self.trunk, precision)
        set_precision(self, precision, cast=False)
        return self

    @property
    def precision(self) -> str:
        return precision_of(self)

    def set_normalisation(self, gain: float, bias: float) -> None:
        with torch.no_grad():
            self.gain.fill_(float(gain))
            self.bias.fill_(float(bias))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # ------------------------------------------------------------------------------------------ scoring
    def raw(self, input_ids: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """[B] float32 raw rewards of query+response sequences [B, T] (any padding with the pad token)."""
        pad = self.pad_id if pad_id is None else pad_id
        input_ids = input_ids.to(self.device)
        with autocast(self):
            hidden = self.trunk(**lm_inputs(input_ids, pad), use_cache=False).last_hidden_state  # [B, T, d]
        idx = last_real_index(input_ids, pad)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # [B, d]
        return self.head(last.float()).squeeze(-1)

    def raw_best_of_k(self, queries: torch.Tensor, responses: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """[B, K] raw rewards of K responses per query, the query computed ONCE and shared by its K responses.

        queries [B, Q] left-padded; responses [B, K, R] right-padded (pad after truncation). Equal to `raw`
        on the concatenated sequences (tested), at about half the cost for 64-token queries and 24-token
        responses: the query's keys and values are computed once and repeated K times (differentiably)."""
        pad = self.pad_id if pad_id is None else pad_id
        queries, responses = queries.to(self.device), responses.to(self.device)
        B, K, R = responses.shape
        qmask = (queries != pad).long()
        with autocast(self):
            out = self.trunk(input_ids=queries, attention_mask=qmask, position_ids=position_ids_from_mask(qmask),
                             use_cache=True)
        cache = cache_of(out)
        r = responses.reshape(B * K, R)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):  # a trunk without a usable KV cache
            return self.raw(torch.cat([queries.repeat_interleave(K, dim=0), r], dim=1), pad).view(B, K)
        cache.batch_repeat_interleave(K)
        rmask = (r != pad).long()
        qlen = qmask.sum(dim=1).repeat_interleave(K)
        rpos = qlen[:, None] + rmask.cumsum(dim=1) - rmask
        mask = torch.cat([qmask.repeat_interleave(K, dim=0), rmask], dim=1)
        with autocast(self):
            hidden = self.trunk(input_ids=r, attention_mask=mask, position_ids=rpos, use_cache=True,
                                **{CACHE_KW: cache}).last_hidden_state  # [B*K, R, d]
        rows = torch.arange(B * K, device=hidden.device)
        last = hidden[rows, last_real_index(r, pad)]
        empty = rmask.sum(dim=1) == 0  # no response token: the last real token is the query's last
        if empty.any():
            q_last = out.last_hidden_state[:, -1].repeat_interleave(K, dim=0)
            last = torch.where(empty[:, None], q_last.to(last.dtype), last)
        return self.head(last.float()).squeeze(-1).view(B, K)

    def forward(self, input_ids: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """[B] normalised scores gain * raw + bias (what PPO adds on the last response token)."""
        return self.gain * self.raw(input_ids, pad_id) + self.bias

    def best_of_k(self, queries: torch.Tensor, responses: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """[B, K] normalised scores of K responses [B, K, R] per left-padded query [B, Q] (query computed once)."""
        return self.gain * self.raw_best_of_k(queries, responses, pad_id) + self.bias

    def score(self, queries: torch.Tensor, responses: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """[B] normalised scores of left-padded queries [B, Q] and (truncated, right-padded) responses [B, R] in the
        Apprentice's tokens (padded with `pad_id`, default this coach's): with a retokenizer (`read_from`) they are
        read as text in this coach's own tokens."""
        if self.retokenizer is None:
            return self(torch.cat([queries, responses], dim=1), pad_id)
        ids = self.retokenizer.sequences(queries.tolist(), responses.tolist())
        return self(ids.to(self.device), self.pad_id)

    def pairs_tensor(self, pairs) -> torch.Tensor:
        """[N, L] on the host: (query ids, response ids) pairs in the Apprentice's tokens as this coach reads them
        (query left-padded, response right-padded; through the retokenizer when there is one)."""
        queries, responses = [list(q) for q, _ in pairs], [list(r) for _, r in pairs]
        if self.retokenizer is not None:
            return self.retokenizer.sequences(queries, responses)
        return sequences_tensor(queries, responses, self.pad_id)

    # ------------------------------------------------------------------------------------------ saving
    def reward_config(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": self.base_model,
                "d_model": self.d_model, "pad_token_id": self.pad_id, "gain": float(self.gain),
                "bias": float(self.bias), "head_init_std": 1.0 / math.sqrt(self.d_model + 1),
                "normalisation": self.normalisation, "lora": self.lora}

    def save_pretrained(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.trunk.save_pretrained(out)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        tensors = {"head.weight": self.head.weight.detach().cpu().contiguous(),
                   "head.bias": self.head.bias.detach().cpu().contiguous(),
                   "gain": self.gain.detach().cpu().reshape(1), "bias": self.bias.detach().cpu().reshape(1)}
        save_file(tensors, str(out / HEAD_FILE), metadata={"format": FORMAT})
        (out / CONFIG_FILE).write_text(json.dumps(self.reward_config(), indent=2))
        return out

    def _read_head(self, head_file: Path, tensors: dict, meta: dict) -> None:
        """The saved head, normalisation and LoRA record (`head_file`'s `tensors`, the config's `meta`)."""
        try:
            with torch.no_grad():
                self.head.weight.copy_(tensors["head.weight"])
                self.head.bias.copy_(tensors["head.bias"])
                self.set_normalisation(tensors["gain"].item(), tensors["bias"].item())
        except (KeyError, RuntimeError) as err:
            raise DataError(f"{head_file}: wrong or missing head tensors ({err}); expected head.weight "
                            f"[1, {self.d_model}], head.bias [1], gain [1], bias [1]") from None
        self.normalisation = meta.get("normalisation", {})
        self.lora = meta.get("lora")

    @classmethod
    def from_pretrained(cls, path: str | Path, policy_tokenizer=None, dtype: str = "float32",
                        device: torch.device | str | None = None, read_text: bool = False) -> "RewardModel":
        """Load a saved Values Coach onto `device` (default the CPU), whatever device it was saved from. If its
        tokenizer differs from `policy_tokenizer`: ConfigError, or with `read_text` (reward.model set) it scores the
        Apprentice's tokens as text (`read_from`)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        require_transformers()
        device = torch.device(device or "cpu")
        p = Path(path)
        if not (p / CONFIG_FILE).is_file() or not (p / HEAD_FILE).is_file():
            raise DataError(f"reward.path: {str(p)!r} is not a saved Values Coach (expected {CONFIG_FILE} and "
                            f"{HEAD_FILE} beside the trunk's config.json)")
        try:
            meta = json.loads((p / CONFIG_FILE).read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{p / CONFIG_FILE}: not valid JSON ({err})") from None
        if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise DataError(f"{p / CONFIG_FILE}: format {meta.get('format')!r} v{meta.get('format_version')} "
                            f"(expected {FORMAT!r} v{FORMAT_VERSION} or older)")
        tok = load_tokenizer(str(p))
        if not read_text:
            check_same_tokenizer(tok, policy_tokenizer)
        try:
            if meta.get("lora"):  # the adapter is here; its base is where the Values Coach was trained from
                trunk = _adapter_trunk(p, meta, tok, dtype).to(device)
            else:
                cfg = AutoConfig.from_pretrained(str(p))
                for attr in _DROPOUT_ATTRS:
                    if hasattr(cfg, attr):
                        setattr(cfg, attr, 0.0)
                trunk = AutoModel.from_pretrained(str(p), config=cfg, dtype=getattr(torch, dtype)).to(device)
            tensors = load_file(str(p / HEAD_FILE), device=str(device))
        except (OSError, ValueError) as err:
            raise DataError(f"Values Coach at {str(p)!r} cannot be loaded: {str(err).splitlines()[0][:300]}") from None
        model = cls(trunk, meta.get("pad_token_id", tok.pad_token_id), base_model=meta.get("base_model", ""),
                    tokenizer=tok, d_model=meta.get("d_model"))
        model._read_head(p / HEAD_FILE, tensors, meta)
        model.read_from(policy_tokenizer)
        model.eval()
        return model


def load_onto_base(path: str | Path, peft_lm, apprentice_base: str, policy_tokenizer=None,
                   precision: str = "fp32") -> RewardModel | None:
    """A saved LoRA Values Coach (`path`) loaded straight onto the Apprentice's PEFT model `peft_lm`: its adapter joins
    that model, frozen (lm.adapters.join_adapter), and its head is read, and no second copy of the base is loaded.
    Only where it was trained on the Apprentice's base (`apprentice_base`, the same folder), with the same tokenizer,
    and its precision `precision` keeps the weights of the base as they are (same dtype); None (nothing changed)
    otherwise, and the caller loads it on its own (`RewardModel.from_pretrained`, then `share_base`)."""
    from safetensors.torch import load_file

    from megacoach.hardware import weights_dtype
    from megacoach.lm.adapters import base_holds, join_adapter, saved_adapter_weights
    from megacoach.lm.hf import trunk_of

    p = Path(path)
    if not (p / CONFIG_FILE).is_file() or not (p / HEAD_FILE).is_file() or not (p / "adapter_config.json").is_file():
        return None
    try:
        meta = json.loads((p / CONFIG_FILE).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # from_pretrained says what is wrong with it
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION or not meta.get("lora"):
        return None
    try:
        same = resolve_model_path(meta.get("base_model") or "") == resolve_model_path(apprentice_base)
    except ConfigError:
        return None
    trunk = trunk_of(peft_lm)
    base = next(q for n, q in trunk.named_parameters() if "lora_" not in n)
    if not same or base.dtype != weights_dtype(precision):
        return None
    tok = load_tokenizer(str(p))
    if policy_tokenizer is None or not same_tokenizer(tok, policy_tokenizer):
        return None
    saved = saved_adapter_weights(p)
    if saved is None:
        return None
    conf, weights, saved_base = saved
    if not base_holds(peft_lm, {k: t.to(base.device) for k, t in saved_base.items()},
                      meta.get("pad_token_id", tok.pad_token_id)):
        return None  # the embeddings it was trained over are not the Apprentice's
    del saved_base
    shared = join_adapter(peft_lm, weights, int(conf["r"]), float(conf["lora_alpha"]),
                          float(conf.get("lora_dropout") or 0.0))
    if shared is None:
        return None
    device = base.device
    model = RewardModel(shared, meta.get("pad_token_id", tok.pad_token_id), base_model=meta.get("base_model", ""),
                        tokenizer=tok, d_model=meta["d_model"])
    model.to(device)
    model._read_head(p / HEAD_FILE, load_file(str(p / HEAD_FILE), device=str(device)), meta)
    set_precision(model.trunk, precision, cast=False)
    set_precision(model, precision, cast=False)
    model.eval()
    return model


def _adapter_trunk(path: Path, meta: dict, tokenizer, dtype: str):
    """The trunk of a saved LoRA Values Coach: its base model (reward_config.json's `base_model`) with the adapter
    saved in `path`."""
    from peft import PeftModel

    base = meta.get("base_model") or ""
    try:
        lm, _ = load_causal_lm(base, dtype=dtype, tokenizer=tokenizer)
    except (ConfigError, DataError) as err:
        raise DataError(f"reward.path: the Values Coach at {str(path)!r} is a LoRA adapter on the base model {base!r}, "
                        f"which cannot be loaded here ({err})") from None
    return PeftModel.from_pretrained(lm.base_model, str(path))
