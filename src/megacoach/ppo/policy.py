"""The Apprentice (policy) with its value head, and the frozen original model (the Coherence Coach's reference).

As in ORIG/DET, the value head sits on the policy's trunk by default (one forward pass gives log-probs and
values); `separate_value_model=True` gives the value function its own copy of the trunk instead.
Only response positions go through the LM head (the query positions' logits are never used), and the head's
output becomes the model's real logits through `lm.hf.lm_logits` (the family's own scaling or capping).
Precision (megacoach/hardware.py): the trunks run under the model's autocast; the LM head, the value head (always
float32) and everything after them in float32.

The response heads live here too (the only room that uses them): log-softmax at the temperature, the sampled
tokens' log-probs and the entropies, from the logits (`logprobs_and_entropy`) or in one fused pass from the hidden
states with its own autograd Function (`linear_logprobs_and_entropy`, which turns its saved softmax into the
gradient in place). What the log-probs then become (KL, rewards, advantages, the loss) is ppo/objective.py.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from megacoach.errors import DataError
from megacoach.lm.hf import autocast, hidden_size_of, linear_head, lm_inputs, lm_logits, trunk_of


# ------------------------------------------------------------------------------------------ the response heads
# From the logits (or the hidden states) that predict the response tokens to those tokens' log-probs and the
# entropies, at the sampling temperature: the Apprentice's update and the original model's log-probs read them.


def _check_tokens(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    if logits.shape[:-1] != tokens.shape:
        raise DataError(f"tokens: expected shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise DataError(f"temperature: expected > 0, got {temperature}")


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) over the last axis, in float32 at least (bf16/fp16 logits are upcast)."""
    _check_temperature(temperature)
    lg = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        lg = lg / temperature
    return F.log_softmax(lg, dim=-1)


def _chosen(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logp, -1, tokens.long().unsqueeze(-1)).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    # 0 * log 0 = 0. Zero logp where p underflows BEFORE multiplying, so that neither the value nor
    # the gradient sees 0 * (-inf) (a where() after the product would still backpropagate NaN).
    safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(p * safe_logp).sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each chosen token: ``log_softmax(logits / temperature)[..., token]``.

    Numerically stable (log_softmax, never log(softmax)); computed in float32 at least, so bf16/fp16
    logits do not lose precision. Logits of +-1e4 or -inf (forbidden tokens) are fine.

    Args:
        logits: ``[B, T, V]``, already aligned with ``tokens`` (logits at position t predict
            ``tokens[:, t]``; the caller does the usual shift by one).
        tokens: ``[B, T]`` integer token ids.
        temperature: the sampling temperature; the policy's log-probs must use the same temperature
            the responses were sampled with (0.7 for the style tasks), or the ratio is off.

    Returns:
        ``[B, T]`` log-probs (<= 0), float32 (or float64 for float64 logits).
    """
    _check_tokens(logits, tokens)
    return _chosen(_log_softmax(logits, temperature), tokens)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at each position: ``-sum_v p_v log p_v``.

    Stable for huge logits and for -inf logits (0 * log 0 is taken as 0).

    Args:
        logits: ``[..., V]``; temperature as in :func:`logprobs_from_logits`.

    Returns:
        ``[...]`` entropies (>= 0).
    """
    return _entropy(_log_softmax(logits, temperature))


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the chosen tokens [B, T], entropies [B, T]) from ONE log-softmax of ``logits`` [B, T, V].

    The same numbers as :func:`logprobs_from_logits` and :func:`entropy_from_logits` (the same operations in the
    same order), in one pass over the vocabulary instead of two: the PPO update needs both at every response
    position. Gradients flow into the log-probs only; the entropy is a statistic (computed without gradient).
    """
    _check_tokens(logits, tokens)
    logp = _log_softmax(logits, temperature)
    chosen = _chosen(logp, tokens)
    with torch.no_grad():
        entropy = _entropy(logp.detach())
    return chosen, entropy


# ------------------------------------------------------------------------------------------ the fused response head
# The response head in one pass with its own gradient (ppo.fused_head).
#
# From the hidden states h [N, d] that predict the response tokens and a linear LM head (weight W [V, d], bias b):
#
#     z       = scale * (h W^T + b)          scale = the family's logit factor / the temperature
#     logp    = z - logsumexp(z)             (one log-softmax over the vocabulary)
#     chosen  = logp[token]                  the sampled tokens' log-probs (what PPO's ratio reads)
#     entropy = -sum_v softmax(z)_v logp_v   a statistic: no gradient
#     d chosen / d z = onehot(token) - softmax(z)
#
# Autograd through those ops keeps the [N, V] logits and log-probs for its backward pass, and makes several more
# [N, V] tensors in it. `linear_logprobs_and_entropy` computes z in chunks of rows (the whole [N, V] logits never
# exist at once), keeps only softmax(z) for the backward pass, and turns it into the logits' gradient in place: one
# [N, V] tensor in all, and two matmuls each way. The same numbers as `logprobs_and_entropy` over
# `lm.hf.lm_logits`, up to float rounding (tests/test_speed_levers.py); no compiler is needed. `linear_logprobs` is
# the same forward without gradient or entropy: the original model's log-probs for the Coherence Coach.

HEAD_CHUNK_ROWS = 128  # rows of z per chunk: 128 x 8192 float32 = 4 MiB (measured: 128 to 256 rows are best)


def _chunked_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                      scale: float, chunk: int, probs: torch.Tensor | None = None,
                      entropy: torch.Tensor | None = None) -> torch.Tensor:
    """chosen [N] from h [N, d]; fills `probs` [N, V] with softmax(z) and `entropy` [N] where they are given. z is
    made `chunk` rows at a time in one reused buffer."""
    n, v = h.shape[0], weight.shape[0]
    chosen = torch.empty(n, dtype=torch.float32, device=h.device)
    buf = torch.empty(min(chunk, n), v, dtype=torch.float32, device=h.device)
    spare = torch.empty_like(buf) if probs is None and entropy is not None else None
    wt = weight.t()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = buf[: e - s]
        hs = h[s:e] if scale == 1.0 else h[s:e] * scale  # the scale on the narrow side: [rows, d], not [rows, V]
        if bias is None:
            torch.mm(hs, wt, out=z)
        else:
            torch.addmm(bias, hs, wt, beta=scale, out=z)
        z.sub_(z.amax(dim=-1, keepdim=True))  # z - max(z): exp cannot overflow
        picked = z.gather(1, tokens[s:e, None]).squeeze(1)
        # exp(z): into the kept softmax, a spare buffer (for the entropy), or z itself (nothing else reads it)
        out = probs[s:e] if probs is not None else None if spare is None else spare[: e - s]
        p = z.exp_() if out is None else torch.exp(z, out=out)
        total = p.sum(dim=-1)
        log_total = total.log()
        chosen[s:e] = picked - log_total
        if entropy is not None:  # -sum softmax * logp = log(total) - sum(exp(z) * z) / total
            entropy[s:e] = log_total - torch.linalg.vecdot(p, z) / total
        if probs is not None:
            p.div_(total[:, None])  # softmax(z), for the backward pass
    return chosen


class _LinearLogprobs(torch.autograd.Function):
    """(chosen [N], entropy [N]) from h [N, d], W [V, d], b [V] or None, tokens [N]; see the module's docstring."""

    @staticmethod
    def forward(ctx, h, weight, bias, tokens, scale: float, chunk: int, keep: bool):
        # keep: a backward pass will come, and it needs softmax(z)
        probs = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device) if keep else None
        entropy = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        chosen = _chunked_logprobs(h, weight, bias, tokens, scale, chunk, probs, entropy)
        ctx.mark_non_differentiable(entropy)
        ctx.scale = scale
        ctx.save_for_backward(h, weight, bias, tokens, probs)
        return chosen, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_chosen, _grad_entropy):
        if getattr(ctx, "spent", False):  # said here too: saved-tensor hooks would skip autograd's version check
            raise RuntimeError("the fused head's backward pass ran twice over one graph (retain_graph=True): its "
                               "saved softmax was modified by an inplace operation, into the first gradient")
        ctx.spent = True
        h, weight, bias, tokens, probs = ctx.saved_tensors
        g = grad_chosen.float() * ctx.scale
        grad_z = probs.mul_(-g[:, None])  # in place: softmax(z) is not read again (a second backward fails loudly)
        grad_z[torch.arange(grad_z.shape[0], device=grad_z.device), tokens] += g
        grad_h = grad_z @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_z.t() @ h if ctx.needs_input_grad[1] else None
        grad_b = grad_z.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _flat(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
          temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """(hidden as [N, d], tokens as [N], the leading shape) after the checks of the inputs."""
    _check_temperature(temperature)
    if hidden.shape[:-1] != tokens.shape:
        raise DataError(f"tokens: expected shape {tuple(hidden.shape[:-1])}, got {tuple(tokens.shape)}")
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"the fused head runs in float32 (hidden {hidden.dtype}, weight {weight.dtype})")
    return hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long(), hidden.shape[:-1]


def linear_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                tokens: torch.Tensor, temperature: float = 1.0, scale: float = 1.0,
                                chunk_rows: int = HEAD_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of `tokens` [...], entropies [...] without gradient) of softmax(scale * (hidden W^T + b) /
    temperature), for float32 `hidden` [..., d], `weight` [V, d] and `bias` [V] (or None); `scale` is the family's
    own logit factor (`lm.hf.linear_head`). Gradients flow into hidden, weight and bias through the log-probs."""
    h, tok, lead = _flat(hidden, weight, tokens, temperature)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    chosen, entropy = _LinearLogprobs.apply(h.contiguous(), weight, bias, tok, float(scale / temperature),
                                            int(chunk_rows), keep)
    return chosen.reshape(lead), entropy.reshape(lead)


@torch.no_grad()
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                    temperature: float = 1.0, scale: float = 1.0, chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """The log-probs of `tokens` [...] alone, without gradient (the original model's, for the Coherence Coach): the
    same chunks, no softmax kept and no entropy."""
    h, tok, lead = _flat(hidden, weight, tokens, temperature)
    return _chunked_logprobs(h.contiguous(), weight, bias, tok, float(scale / temperature),
                             int(chunk_rows)).reshape(lead)


@dataclass
class PolicyOutput:
    logits: torch.Tensor | None  # [B, T, V] temperature-scaled logits that predict each response token
    values: torch.Tensor | None  # [B, T]
    logprobs: torch.Tensor | None = None  # [B, T] of the given response tokens (instead of logits)
    entropy: torch.Tensor | None = None  # [B, T] without gradient (with logprobs)


# The sampler never samples the pad token (megacoach/sampling.py): it leaves it out of the softmax, so the rollout's
# log-probs are those of the distribution without it. Every log-prob of a sampled token computed here leaves it out
# too (its logit set to NO_PAD_LOGIT: finite, so that 0 * logit stays 0 in the entropy), or PPO's first ratio would
# be off by log(1 - p_pad) per token. A position whose token IS the pad (padding after a stop, or a given response
# shorter than the response length) was not sampled: its log-prob is 0 there.
NO_PAD_LOGIT = -1e30


def _no_pad_logits(logits: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    if pad_id is None:
        return logits
    return logits.index_fill(-1, torch.tensor([pad_id], device=logits.device), NO_PAD_LOGIT)


def _no_pad_bias(bias: torch.Tensor | None, weight: torch.Tensor, pad_id: int | None) -> torch.Tensor | None:
    """A linear head's bias with the pad token's logit pushed to NO_PAD_LOGIT (a new tensor: the model's is kept)."""
    if pad_id is None:
        return bias
    out = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    out[pad_id] = NO_PAD_LOGIT
    return out if bias is None else bias + out


def _sampled_only(logprobs: torch.Tensor, tokens: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    if pad_id is None:
        return logprobs
    return torch.where(tokens.to(logprobs.device) == pad_id, torch.zeros((), dtype=logprobs.dtype,
                                                                         device=logprobs.device), logprobs)


def response_head(lm, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                  pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of `tokens` [B, T], entropies [B, T]) from the hidden states [B, T, d] that predict them: the LM
    head, the family's logit transform, the pad token left out (as the sampler leaves it out; `pad_id` None: kept),
    the temperature and one log-softmax (logprobs_and_entropy), through autograd. The [B, T, V] logits live
    only inside this function, which is what `Apprentice.compile_head` compiles (one fused pass over the vocabulary
    forward and backward instead of five)."""
    logits = _no_pad_logits(lm_logits(lm, hidden).float(), pad_id)
    logprobs, entropy = logprobs_and_entropy(logits, tokens, temperature)
    return _sampled_only(logprobs, tokens, pad_id), entropy


def fused_response_head(lm, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                        pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_head` in one pass with its own gradient (ppo.fused_head; this module), for a model
    whose logits are a scaled float32 linear head (`lm.hf.linear_head`)."""
    weight, bias, scale = linear_head(lm)
    logprobs, entropy = linear_logprobs_and_entropy(hidden.to(weight.dtype), weight,
                                                          _no_pad_bias(bias, weight, pad_id), tokens, temperature, scale)
    return _sampled_only(logprobs, tokens, pad_id), entropy


class Apprentice(nn.Module):
    """A causal LM plus a scalar value head (initialised to zero, as the paper does).

    The value head is float32 on the LM's device, whatever the LM's precision, and reads the hidden state the LM
    head reads (`hidden_size_of`: e.g. OPT's projected width)."""

    def __init__(self, lm, separate_value_model: bool = False, fused_head: bool = False):
        super().__init__()
        self.lm = lm
        d = hidden_size_of(lm)
        device = next(lm.parameters()).device
        self.value_head = nn.Linear(d, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_trunk = copy.deepcopy(trunk_of(lm)) if separate_value_model else None
        # the update's response head: the fused one (ppo.fused_head) where the model's head is a scaled float32
        # linear map, else autograd's (which run.compile may compile)
        self.fused_head = fused_head and linear_head(lm) is not None
        self.head = fused_response_head if self.fused_head else response_head

    def compile_head(self) -> None:
        """Run `response_head` through torch.compile (Inductor; run.compile): same maths, fused kernels. Shapes are
        specialised: the update's minibatches all have one shape, so it compiles once (forward and backward). Not
        for a fused head (`fused_head`), which needs no compiler."""
        if self.fused_head:
            raise ValueError("the Apprentice's response head is the fused one (ppo.fused_head): nothing to compile")
        compiled = torch.compile(response_head, dynamic=False)

        def head(*args):
            try:
                return compiled(*args)
            except Exception as e:  # a compiler that fails here (a broken toolchain): the run goes on eagerly
                warnings.warn(f"run.compile: the compiled response head failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); staying eager", stacklevel=2)
                self.head = response_head
                return response_head(*args)

        self.head = head

    def values_from(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 values from hidden states [B, T, d] (of the policy's trunk, or the value trunk)."""
        return self.value_head(hidden.float()).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, pad_id: int, response_length: int, temperature: float,
                with_values: bool = True, responses: torch.Tensor | None = None) -> PolicyOutput:
        """input_ids = [left-padded query | sampled response]; returns logits/values for the T response tokens, or,
        given `responses` (the last T tokens of input_ids), their log-probs and entropies instead of the logits."""
        T = response_length
        inputs = lm_inputs(input_ids.to(self.value_head.weight.device), pad_id)
        with autocast(self.lm):
            hidden = trunk_of(self.lm)(**inputs).last_hidden_state
            vh = None
            if with_values and self.value_trunk is not None:
                vh = self.value_trunk(**inputs).last_hidden_state[:, -T - 1:-1]
        h = hidden[:, -T - 1:-1]  # the positions whose next-token predictions are the response tokens
        values = self.values_from(h if vh is None else vh) if with_values else None
        if responses is not None:
            # a compiled head is specialised to the update's shape; the fused one serves every shape
            head = self.head if torch.is_grad_enabled() or self.fused_head else response_head
            logprobs, entropy = head(self.lm, h, responses.to(h.device), temperature, pad_id)
            return PolicyOutput(None, values, logprobs, entropy)
        return PolicyOutput(lm_logits(self.lm, h).float() / temperature, values)


def load_apprentice_state(apprentice: Apprentice, state: dict, lora: bool) -> None:
    """Load a checkpoint's Apprentice state. With LoRA (`lora`) the state holds only what trains (the adapter and the
    value head) over the base the run loaded: every trained parameter must be in it (DataError otherwise)."""
    if not lora:
        apprentice.load_state_dict(state)
        return
    missing, unexpected = apprentice.load_state_dict(state, strict=False)
    trained = {name for name, q in apprentice.named_parameters() if q.requires_grad}
    if unexpected or trained & set(missing):
        raise DataError(f"checkpoint: the Apprentice's LoRA state does not fit this run (missing "
                        f"{sorted(trained & set(missing))[:3]}, unexpected {sorted(unexpected)[:3]}): was it saved "
                        "with other ppo.lora_* settings?")


def frozen_reference(lm) -> nn.Module:
    """A frozen copy of the original model: the Coherence Coach measures KL against it."""
    ref = copy.deepcopy(lm)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _reference_hidden(ref_lm, input_ids: torch.Tensor, pad_id: int, response_length: int) -> torch.Tensor:
    """[B, T, d] the original model's hidden states that predict the response tokens (the last T of input_ids)."""
    T = response_length
    input_ids = input_ids.to(next(ref_lm.parameters()).device)
    with autocast(ref_lm):
        return trunk_of(ref_lm)(**lm_inputs(input_ids, pad_id)).last_hidden_state[:, -T - 1:-1]


@torch.inference_mode()
def reference_logits(ref_lm, input_ids: torch.Tensor, pad_id: int, response_length: int,
                     temperature: float) -> torch.Tensor:
    """[B, T, V] the original model's temperature-scaled float32 logits that predict the response tokens."""
    return lm_logits(ref_lm, _reference_hidden(ref_lm, input_ids, pad_id, response_length)).float() / temperature


@torch.inference_mode()
def reference_logprobs(ref_lm, input_ids: torch.Tensor, pad_id: int, response_length: int, temperature: float,
                       fused: bool = False) -> torch.Tensor:
    """[B, T] the original model's log-probs of the response tokens (the last T of input_ids), at the temperature,
    the pad token left out of its softmax as the sampler leaves it out (0 where the token is the pad).
    `fused` (ppo.fused_head) where its head is a scaled float32 linear map: the logits in chunks of rows
    (linear_logprobs), never as a whole [B, T, V] tensor."""
    T = response_length
    tokens = input_ids[:, -T:].to(next(ref_lm.parameters()).device)
    head = linear_head(ref_lm) if fused else None
    if head is None:
        logits = _no_pad_logits(reference_logits(ref_lm, input_ids, pad_id, T, temperature), pad_id)
        return _sampled_only(logprobs_from_logits(logits, tokens), tokens, pad_id)
    weight, bias, scale = head
    hidden = _reference_hidden(ref_lm, input_ids, pad_id, T)
    return _sampled_only(linear_logprobs(hidden.to(weight.dtype), weight, _no_pad_bias(bias, weight, pad_id),
                                               tokens, temperature, scale), tokens, pad_id)


# ------------------------------------------------------------------------------------------ activation memory
# The ops whose outputs the 'pointwise' recompute keeps: the matmuls and attention (those a torch build has).
_KEPT_OP_NAMES = ("mm", "addmm", "bmm", "baddbmm", "linear", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention")


def _keep(kept: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective-recompute policy: keep what the ops in `kept` computed, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(lm, recompute: str = "all") -> None:
    """ppo.gradient_checkpointing: the LM's layers recompute their activations in the backward pass of the update
    (transformers' activation checkpointing, non-reentrant; only in training mode, so sampling and scoring are
    untouched). `recompute` (ppo.checkpoint_recompute): 'all' runs every op of a layer again; 'pointwise' keeps the
    outputs of its matmuls and attention (torch's selective checkpointing) and runs only the cheap elementwise ops
    again. The gradients are the same either way."""
    kwargs: dict = {"use_reentrant": False}
    if recompute == "pointwise":
        aten = torch.ops.aten
        kept = frozenset(getattr(aten, n).default for n in _KEPT_OP_NAMES if hasattr(aten, n))
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, functools.partial(_keep, kept))
    elif recompute != "all":
        raise ValueError(f"recompute={recompute!r} (expected 'all' or 'pointwise')")
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
