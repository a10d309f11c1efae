"""The PPO update's response head in one pass with its own gradient (ppo.fused_head).

From the hidden states h [N, d] that predict the response tokens and a linear LM head (weight W [V, d], bias b):

    z       = scale * (h W^T + b)          scale = the family's logit scaling / the temperature
    logp    = z - logsumexp(z)             (one log-softmax over the vocabulary)
    chosen  = logp[token]                  the sampled tokens' log-probs (what PPO's ratio reads)
    entropy = -sum_v softmax(z)_v logp_v   a statistic: no gradient
    d chosen / d z = onehot(token) - softmax(z)

Autograd through those ops keeps the [N, V] logits and log-probs for its backward pass, and makes several more
[N, V] tensors in it. `linear_logprobs_and_entropy` computes z in chunks of rows (the whole [N, V] logits never
exist at once), keeps only softmax(z) for the backward pass, and turns it into the logits' gradient in place: one
[N, V] tensor in all, and two matmuls each way. The same numbers as `maths.logprobs_and_entropy` over
`lm.hf.lm_logits`, up to float rounding (tests/test_speed_levers.py); no compiler is needed. `linear_logprobs` is
the same forward without gradient or entropy: the original model's log-probs for the Coherence Coach.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from megacoach.errors import DataError

CHUNK_ROWS = 128  # rows of z per chunk: 128 x 8192 float32 = 4 MiB (the measured optimum lies between 128 and 256)


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
        if bias is None:
            torch.mm(h[s:e], wt, out=z)
        else:
            torch.addmm(bias, h[s:e], wt, out=z)
        if scale != 1.0:
            z.mul_(scale)
        z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # z is now logp
        chosen[s:e] = z.gather(1, tokens[s:e, None]).squeeze(1)
        if probs is not None or entropy is not None:
            p = torch.exp(z, out=probs[s:e] if probs is not None else spare[: e - s])
            if entropy is not None:
                entropy[s:e] = torch.linalg.vecdot(p, z).neg_()
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
          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """(hidden as [N, d], tokens as [N], the leading shape) after the checks of the inputs."""
    if scale <= 0:
        raise DataError(f"temperature: expected > 0 (the head's scale is {scale})")
    if hidden.shape[:-1] != tokens.shape:
        raise DataError(f"tokens: expected shape {tuple(hidden.shape[:-1])}, got {tuple(tokens.shape)}")
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"the fused head runs in float32 (hidden {hidden.dtype}, weight {weight.dtype})")
    return hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long(), hidden.shape[:-1]


def linear_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                tokens: torch.Tensor, scale: float,
                                chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of `tokens` [...], entropies [...] without gradient) of softmax(scale * (hidden W^T + b)), for
    float32 `hidden` [..., d], `weight` [V, d] and `bias` [V] (or None); gradients flow into hidden, weight and
    bias through the log-probs."""
    h, tok, lead = _flat(hidden, weight, tokens, scale)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    chosen, entropy = _LinearLogprobs.apply(h.contiguous(), weight, bias, tok, float(scale), int(chunk_rows), keep)
    return chosen.reshape(lead), entropy.reshape(lead)


@torch.no_grad()
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                    scale: float, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """The log-probs of `tokens` [...] alone, without gradient (the original model's, for the Coherence Coach): the
    same chunks, no softmax kept and no entropy."""
    h, tok, lead = _flat(hidden, weight, tokens, scale)
    return _chunked_logprobs(h.contiguous(), weight, bias, tok, float(scale), int(chunk_rows)).reshape(lead)
