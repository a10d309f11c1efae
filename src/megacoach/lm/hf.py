"""How megacoach talks to a Hugging Face causal LM: left padding and position ids (as the paper's code does them,
so padding never changes logits), the model's transformer trunk and the width its LM head reads, the model's real
logits from trunk hidden states (`lm_logits`: the head plus the family's own scaling or capping), and its KV cache.

The transformers version is checked once (`require_transformers`): from 5.0 to 5.23 the KV cache argument is
`past_key_values`, and a cache passed as `cache` (this module's name for it, `CACHE_KW`) is swallowed silently by
the model's **kwargs, so sampling recomputes nothing from the cache and its log-probs are wrong."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from megacoach.errors import ConfigError

CACHE_KW = "cache"  # transformers >= 5.24 names the KV cache argument `cache` (formerly `past_key_values`)
MIN_TRANSFORMERS = "5.24.0"  # the first release whose models take `cache=` (5.0-5.23 drop it silently)
PRECISION_ATTR = "_megacoach_precision"  # a model's precision, recorded on it by hardware.set_precision


def require_transformers(version: str | None = None) -> str:
    """The installed transformers version; ConfigError if it is older than MIN_TRANSFORMERS (its models would
    silently ignore megacoach's KV cache and every sampled log-prob would be off)."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ConfigError(f"transformers {version} is installed; megacoach needs transformers>={MIN_TRANSFORMERS} "
                          f"(older 5.x releases take the KV cache as `past_key_values` and silently drop the `cache` "
                          f"argument, so sampled log-probs would be wrong): pip install 'transformers>={MIN_TRANSFORMERS}'")
    return version


def left_pad(sequences: list[list[int]], pad_id: int, length: int | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Left-pad token lists to `length` (default: the longest); longer sequences keep their last tokens.
    Built on the host from Python lists, then put on `device` (default the CPU)."""
    length = length or max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long, device="cpu")
    for i, s in enumerate(sequences):
        s = s[-length:] if length else []
        if s:
            out[i, length - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
    return out.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids = cumsum(mask) - mask: real tokens count 0, 1, 2, ... whatever padding precedes them."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - mask).clamp(min=0)


def lm_inputs(input_ids: torch.Tensor, pad_id: int) -> dict:
    """Model kwargs for a left- (or right-) padded batch: attention mask and shifted position ids."""
    mask = (input_ids != pad_id).long()
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}


def forward(model, input_ids: torch.Tensor, pad_id: int, **kwargs):
    """One forward pass of any HF causal LM (or its trunk) over a padded batch."""
    return model(**lm_inputs(input_ids, pad_id), **kwargs)


def trunk_of(lm) -> nn.Module:
    """The transformer body of a HF causal LM (GPT-2: `.transformer`; most others: `.model`)."""
    return lm.get_decoder() if hasattr(lm, "get_decoder") and lm.get_decoder() is not None else lm.base_model


def hidden_size_of(lm) -> int:
    """The width of the hidden state the trunk hands to the LM head (what a value or score head must read).

    Usually the model's hidden size; not always: OPT with `word_embed_proj_dim != hidden_size` projects the trunk's
    output down (its decoder's `project_out`) before the head, so the head reads `word_embed_proj_dim`. The head's
    own input width says it for any family; a bare trunk (no LM head) falls back on the config."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1])
    cfg = lm.config
    return int(getattr(cfg, "word_embed_proj_dim", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size"))


def _softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


def logits_transform(config) -> list[tuple[str, float]]:
    """What the family's own forward does to the LM head's output, in order: [('divide', s)] (Granite's
    `logits_scaling`), [('multiply', s)] (Cohere's `logit_scale`), [('softcap', c)] (Gemma-2/3's
    `final_logit_softcapping`: c * tanh(logits / c)); [] for plain families (GPT-2, Llama, ...)."""
    steps = []
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling != 1:
        steps.append(("divide", float(scaling)))
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        steps.append(("multiply", float(scale)))
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap:
        steps.append(("softcap", float(cap)))
    return steps


def lm_logits(lm, hidden: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """The model's real next-token logits from trunk hidden states [..., d]: the LM head, then the family's own
    scaling or capping (`logits_transform`), as `lm(input_ids).logits` computes them. Every place megacoach makes
    logits (sampling, the Apprentice, the original model) goes through here, outside autocast: the hidden state is
    cast to the head's weights' dtype (float32 unless the model's weights are bf16). `float32`: a linear head of bf16
    weights computes in float32 too (evaluation figures; bf16 logits are off by up to 0.4% of their size)."""
    head = lm.get_output_embeddings()
    if float32 and isinstance(head, nn.Linear) and head.weight.dtype != torch.float32:
        bias = None if head.bias is None else head.bias.float()
        logits = nn.functional.linear(hidden.float(), head.weight.float(), bias)
    else:
        logits = head(hidden.to(head.weight.dtype))  # a bf16-mixed model's head reads float32 (its master weights)
    for op, value in logits_transform(lm.config):
        if op == "divide":
            logits = logits / value
        elif op == "multiply":
            logits = logits * value
        else:
            logits = _softcap(logits, value)
    return logits


def linear_head(lm) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """(weight [V, d], bias [V] or None, scale) where the model's logits are exactly `scale * head(hidden)` for a plain
    float32 `nn.Linear` head: the family transforms its logits by nothing or by a factor (Granite's division, Cohere's
    multiplication). None otherwise (a softcapped family such as Gemma-2, a bf16 head, a wrapped or custom head)."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        return None
    scale = 1.0
    for op, value in logits_transform(lm.config):
        if op == "divide":
            scale /= value
        elif op == "multiply":
            scale *= value
        else:
            return None
    return head.weight, head.bias, scale


@torch.inference_mode()
def check_logits(lm, pad_id: int, length: int = 8) -> float:
    """Largest log-prob difference between `lm_logits(trunk(x))` and the model's own `lm(x).logits` on a short
    fixed input; ConfigError if they disagree (a family that changes its logits in a way megacoach does not
    apply would make every log-prob, KL and PPO ratio wrong)."""
    device = next(lm.parameters()).device
    vocab = lm.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(length, dtype=torch.long, device=device) * 7 + 1) % max(2, vocab)
    ids = torch.where(ids == pad_id, (ids + 1) % vocab, ids).unsqueeze(0)
    inputs = lm_inputs(ids, pad_id)
    own = torch.log_softmax(lm(**inputs).logits.float(), -1)
    ours = torch.log_softmax(lm_logits(lm, trunk_of(lm)(**inputs).last_hidden_state).float(), -1)
    gap = float((own - ours).abs().max())
    dtype = next(lm.parameters()).dtype
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    if not gap <= tol:
        raise ConfigError(f"model {type(lm).__name__} ({lm.config.model_type}): log-probs from its trunk and LM head "
                          f"differ from its own forward by {gap:.3g} nats; megacoach applies "
                          f"{logits_transform(lm.config) or 'no'} logit transform for it and does not know what else this "
                          "family does to its logits")
    return gap


def cache_of(out):
    """The KV cache a forward pass with `use_cache=True` returned (under either name)."""
    return out.get(CACHE_KW, out.get("past_key_values"))


# ------------------------------------------------------------------------------------------ where and how it runs
# (megacoach/hardware.py resolves the run's device and each model's precision and records the precision on the
# model; these are what the forward passes read.)
def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether `a` and `b` name one device, as torch matches a tensor with a generator: the same type and index,
    where no index means the type's current device (`cuda` is `cuda:0` unless another is current; `cpu` is
    `cpu:0`)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and _index(a) == _index(b)


def _index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.current_device()
    return 0


def precision_of(module: nn.Module) -> str:
    """The precision recorded on `module`, else the one its weights say (float32 -> fp32, bfloat16 -> bf16)."""
    p = getattr(module, PRECISION_ATTR, None)
    if p is not None:
        return p
    for t in module.parameters():
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(t.dtype, "fp32")
    return "fp32"


def autocast(module: nn.Module):
    """The context the forward passes of `module` run in: bf16 autocast for a bf16-mixed model, else nothing."""
    if getattr(module, PRECISION_ATTR, None) != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_of(module).type, dtype=torch.bfloat16)

