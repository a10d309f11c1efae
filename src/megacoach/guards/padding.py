"""Padding cannot move the objective: perturb every position outside the masks of a probe batch and require
everything at real tokens to stay equal.

The field's padding bugs (a score added at the first pad after EOS, a masked critic value at a pad changing the
real tokens' advantages, advantages averaged over padding, padding rewards summed into every advantage) all let
what sits outside the masks reach what PPO optimises. `padding_leaks` perturbs, on a batch built as PPO's are:

- the Values Coach's input: more padding to the left of each query and after each response (the score must not
  move: it is read at the last real token);
- the token ids after each response's end (the Apprentice's and the original model's log-probs, and the values,
  at real tokens must not move: the models are causal);
- the log-probs, reference log-probs and values outside the mask (the reward path's rewards, advantages and returns
  at real tokens must not move);
- the new log-probs, old log-probs, values, advantages and returns outside the mask in the PPO loss (the loss and
  its gradients at real tokens must not move).

A task without stops (the paper's fixed-length responses) has no padding inside PPO's tensors; the probe then
draws a mask of random lengths, so the reward path's and the loss's handling of masks is checked all the same.
Every comparison reads the real code (`episodes`, `objective`) looked up at call time. `padding_leaks` is also the
tests' helper: it returns the names of the tensors that moved, with the largest change of each.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from megacoach.ppo import episodes, objective


def _probe_mask(batch, seed: int) -> torch.Tensor:
    """The batch's mask, or (no stops) one of random lengths 1..T per row."""
    if batch.mask is not None:
        return batch.mask
    B, T = batch.logprobs.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen, device="cpu").to(batch.logprobs.device)
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def _junk(like: torch.Tensor, gen: torch.Generator, negative: bool = False) -> torch.Tensor:
    x = torch.randn(like.shape, generator=gen, device="cpu").to(device=like.device, dtype=like.dtype) * 7.0
    return -x.abs() - 0.1 if negative else x


def _outside(x: torch.Tensor, mask: torch.Tensor, junk: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, junk)


def _gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.detach().double() - b.detach().double()).abs()
    if mask is not None:
        d = d[mask]
    return float(d.max()) if d.numel() else 0.0


def _tol(x: torch.Tensor) -> float:
    return 1e-4 * (1.0 + float(x.detach().abs().max())) if x.numel() else 1e-4


def padding_leaks(trainer, batch, seed: int = 0) -> dict[str, float]:
    """{tensor name: largest change at real tokens} for everything padding moved (empty: no leak)."""
    tr = trainer
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mask = _probe_mask(batch, seed)
    leaks: dict[str, float] = {}

    def compare(name: str, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None = None, tol: float | None = None):
        g = _gap(a, b, m)
        if g > (tol if tol is not None else _tol(a)):
            leaks[name] = g

    # 1. the Values Coach's score: more padding around the same query and response
    pad = tr.pad_id
    extra = 3
    q = batch.query_ids
    r = batch.truncated
    q_more = torch.cat([torch.full((q.shape[0], extra), pad, dtype=q.dtype, device=q.device), q], 1)
    r_more = torch.cat([r, torch.full((r.shape[0], extra), pad, dtype=r.dtype, device=r.device)], 1)
    compare("Values Coach scores", episodes.values_coach_scores(tr, q, r), episodes.values_coach_scores(tr, q_more, r_more),
            tol=1e-3 * (1.0 + float(batch.raw_scores.abs().max())))

    # 2. the models' log-probs and values: other token ids after each response's end (with stops only: without
    # them every sampled token is real, and positions after a drawn end are still read by the models)
    if batch.mask is not None:
        resp = batch.responses
        noise = torch.randint(0, len(tr.tok), resp.shape, generator=gen, device="cpu").to(resp.device)
        changed = torch.where(mask, resp, noise)
        lp_a, ref_a, val_a, _ = episodes.forward_old(tr, batch.query_responses)
        lp_b, ref_b, val_b, _ = episodes.forward_old(tr, torch.cat([batch.query_ids, changed], 1))
        for name, a, b in (("log-probs", lp_a, lp_b), ("reference log-probs", ref_a, ref_b), ("values", val_a, val_b)):
            compare(name, a, b, mask)

    # 3. the reward path: junk in the log-probs, reference log-probs and values outside the mask
    clean = replace(batch, mask=mask)
    dirty = replace(batch, mask=mask, logprobs=_outside(batch.logprobs, mask, _junk(batch.logprobs, gen, True)),
                    ref_logprobs=_outside(batch.ref_logprobs, mask, _junk(batch.ref_logprobs, gen, True)),
                    values=_outside(batch.values, mask, _junk(batch.values, gen)))
    pa, pb = episodes.reward_path(tr, clean), episodes.reward_path(tr, dirty)
    compare("episode scores", pa.scores, pb.scores)
    for name in ("kl", "rewards", "advantages", "returns"):
        compare(name, getattr(pa, name), getattr(pb, name), mask)

    # 4. the PPO loss and its gradients: junk in every input outside the mask
    p = tr.cfg.ppo

    def loss_and_grads(new, old, adv, vpred, old_v, ret):
        new = new.detach().clone().float().requires_grad_(True)
        vpred = vpred.detach().clone().float().requires_grad_(True)
        with torch.enable_grad():
            loss, _ = objective.ppo_loss(new, old.float(), adv.float(), vpred, old_v.float(), ret.float(), p.cliprange,
                                         p.cliprange_value, p.vf_coef, mask)
            g_new, g_v = torch.autograd.grad(loss, (new, vpred), allow_unused=True)
        zero = torch.zeros_like(new)
        return loss, (zero if g_new is None else g_new), (zero if g_v is None else g_v)

    # new log-probs and values a little away from the old ones (ratios off 1, clipping in play)
    moved = batch.logprobs + 0.05 * torch.randn(batch.logprobs.shape, generator=gen, device="cpu").to(batch.logprobs.device)
    ins = (moved, batch.logprobs, pa.advantages, batch.values + 0.1, batch.values, pa.returns)
    junk = tuple(_outside(x, mask, _junk(x, gen, negative=i < 2)) for i, x in enumerate(ins))
    la, gna, gva = loss_and_grads(*ins)
    lb, gnb, gvb = loss_and_grads(*junk)
    compare("PPO loss", la, lb)
    compare("the loss's gradient w.r.t. the log-probs", gna * mask.numel(), gnb * mask.numel(), mask)
    compare("the loss's gradient w.r.t. the values", gva * mask.numel(), gvb * mask.numel(), mask)
    return leaks
