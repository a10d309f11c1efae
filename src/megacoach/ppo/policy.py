"""The Apprentice (policy) with its value head, and the frozen original model (the Coherence Coach's reference).

As in ORIG/DET, the value head sits on the policy's trunk by default (one forward pass gives log-probs and
values); `separate_value_model=True` gives the value function its own copy of the trunk instead.
Only response positions go through the LM head (the query positions' logits are never used), and the head's
output becomes the model's real logits through `lm.hf.lm_logits` (the family's own scaling or capping).
Precision (megacoach/hardware.py): the trunks run under the model's autocast; the LM head, the value head (always
float32) and everything after them in float32.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from megacoach.errors import DataError
from megacoach.lm.hf import autocast, hidden_size_of, linear_head, lm_inputs, lm_logits, trunk_of
from megacoach.ppo import maths


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
    the temperature and one log-softmax (maths.logprobs_and_entropy), through autograd. The [B, T, V] logits live
    only inside this function, which is what `Apprentice.compile_head` compiles (one fused pass over the vocabulary
    forward and backward instead of five)."""
    logits = _no_pad_logits(lm_logits(lm, hidden).float(), pad_id)
    logprobs, entropy = maths.logprobs_and_entropy(logits, tokens, temperature)
    return _sampled_only(logprobs, tokens, pad_id), entropy


def fused_response_head(lm, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                        pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_head` in one pass with its own gradient (ppo.fused_head; megacoach/ppo/maths.py), for a model
    whose logits are a scaled float32 linear head (`lm.hf.linear_head`)."""
    weight, bias, scale = linear_head(lm)
    logprobs, entropy = maths.linear_logprobs_and_entropy(hidden.to(weight.dtype), weight,
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
    (maths.linear_logprobs), never as a whole [B, T, V] tensor."""
    T = response_length
    tokens = input_ids[:, -T:].to(next(ref_lm.parameters()).device)
    head = linear_head(ref_lm) if fused else None
    if head is None:
        logits = _no_pad_logits(reference_logits(ref_lm, input_ids, pad_id, T, temperature), pad_id)
        return _sampled_only(maths.logprobs_from_logits(logits, tokens), tokens, pad_id)
    weight, bias, scale = head
    hidden = _reference_hidden(ref_lm, input_ids, pad_id, T)
    return _sampled_only(maths.linear_logprobs(hidden.to(weight.dtype), weight, _no_pad_bias(bias, weight, pad_id),
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
