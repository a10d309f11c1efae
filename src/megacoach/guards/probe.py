"""Probing the reward path with the trainer's own code: batches of given responses, PPO's push, scratch runs.

Nothing here re-implements the reward path. A probe batch is built by the episode builder that builds
PPO's (`episodes.build`: the same padding, truncation rule, Values Coach score, forward passes and reward
path as `episodes.rollout`), only with responses we choose (labeled samples, canaries) instead of sampled
ones. PPO's *push* on a response is read off `objective.ppo_loss` itself: minus the gradient of the
loss with respect to each token's log-probability, at the rollout's log-probabilities (ratio 1),
summed over the response. It is the first-order change in that response's log-probability that one
gradient step makes, so its sign is "PPO will make this response more (or less) likely", whatever
sits between the Values Coach and the loss.

`scratch(trainer)` lets a probe perturb the Apprentice or take real optimiser steps and then puts
everything back exactly (the weights that train, optimiser and schedule state, beta, random generators,
gradients).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from megacoach.ppo import episodes, objective
from megacoach.ppo.policy import reference_logits


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def with_scores(trainer, batch, raw_scores: torch.Tensor, valid: torch.Tensor | None = None):
    """The same batch with other Values Coach scores (e.g. all equal, to look at the KL term alone),
    and its reward path recomputed as the trainer's is."""
    b = replace(batch, raw_scores=raw_scores, valid=batch.valid if valid is None else valid)
    b.path = episodes.reward_path(trainer, b)
    return b


def ppo_push(trainer, batch, advantages: torch.Tensor | None = None) -> torch.Tensor:
    """[B] PPO's push on each response of the batch (`objective.loss_push`, with the trainer's PPO settings)."""
    p = trainer.cfg.ppo
    adv = batch.path.advantages if advantages is None else advantages
    return objective.loss_push(batch.logprobs, adv, batch.values, batch.path.returns, p.cliprange,
                               p.cliprange_value, p.vf_coef, batch.mask)


def stages(trainer, batch) -> dict[str, np.ndarray]:
    """Per-episode values along the reward path, in order (see `STAGES`)."""
    path = batch.path
    return {
        "values_coach": batch.raw_scores.detach().float().cpu().numpy(),
        "episode_score": path.scores.detach().float().cpu().numpy(),
        "megacoach_reward": path.rewards.detach().float().sum(1).cpu().numpy(),
        "advantages": path.advantages.detach().float().sum(1).cpu().numpy(),
        "ppo_push": ppo_push(trainer, batch).float().cpu().numpy(),
    }


STAGES = {
    "values_coach": "the Values Coach's score (episodes.values_coach_scores: reward-model head, normalisation gain and bias, "
                    "what it learned from the labels)",
    "episode_score": "the episode score (objective.episode_scores: the score, or the invalid-response penalty)",
    "megacoach_reward": "the Megacoach reward (objective.megacoach_rewards: score − β·KL, where the score is "
                        "added, reward scaling)",
    "advantages": "the advantages (objective.advantages_and_returns: GAE, whitening)",
    "ppo_push": "the PPO loss (objective.ppo_loss: the direction in which the loss moves log-probabilities)",
}


def exact_kl(trainer, query_responses: torch.Tensor, chunk: int = 64, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B] KL(Apprentice || original model) summed over the response positions (`mask`'s real ones; None: all),
    computed from the full next-token distributions (not the sampled tokens): an independent measure of how far
    the policy is."""
    t = trainer.cfg.task
    out = []
    with torch.inference_mode():
        for s in _chunks(query_responses.shape[0], chunk):
            qr = query_responses[s]
            logits = trainer.apprentice(qr, trainer.pad_id, t.response_length, t.temperature, with_values=False).logits
            ref = reference_logits(trainer.ref_lm, qr, trainer.pad_id, t.response_length, t.temperature)
            lp = torch.log_softmax(logits.float(), -1)
            lq = torch.log_softmax(ref.float(), -1)
            kl = episodes.real((lp.exp() * (lp - lq)).sum(-1), None if mask is None else mask[s].to(lp.device))
            out.append(kl.sum(-1).cpu())
    return torch.cat(out)


def perturb_(module: torch.nn.Module, sigma: float, seed: int) -> None:
    """Add Gaussian noise of `sigma` times each tensor's RMS to every parameter, in place (drawn on the CPU: the
    same noise for a seed on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lora_b = _lora_b_scales(module, sigma)
    with torch.no_grad():
        for p in module.parameters():
            if not p.requires_grad:  # frozen: a LoRA Apprentice's base, shared with the original model
                continue
            if id(p) in lora_b:  # an adapter's B (zero at the start): noise that moves B @ A like noise on W
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu") * lora_b[id(p)]
                p.add_(noise.to(p.dtype).to(p.device))
                continue
            rms = p.detach().float().pow(2).mean().sqrt()
            if rms > 0:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu") * (sigma * rms.cpu())
                p.add_(noise.to(p.dtype).to(p.device))


def _lora_b_scales(module: torch.nn.Module, sigma: float) -> dict[int, float]:
    """For each LoRA layer's B matrix (PEFT): the noise scale s with which scaling * B @ A moves about as much as
    noise of `sigma` x RMS on the frozen weight W would (each entry of B @ A then has RMS s * sqrt(r) * rms(A))."""
    out = {}
    with torch.no_grad():
        for m in module.modules():
            if not (hasattr(m, "lora_B") and hasattr(m, "base_layer")):
                continue
            w_rms = float(m.base_layer.weight.detach().float().pow(2).mean().sqrt())
            for name, b in m.lora_B.items():
                a = m.lora_A[name].weight.detach().float()
                a_rms = float(a.pow(2).mean().sqrt())
                if a_rms > 0:
                    out[id(b.weight)] = sigma * w_rms / (float(m.scaling[name]) * a.shape[0] ** 0.5 * a_rms)
    return out


def params_checksum(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def mutable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what a probe may change: the parameters that train and the buffers. Frozen parameters (a LoRA
    Apprentice's base, shared with the original model) are neither perturbed nor stepped, so they are not copied:
    the preflight of a LoRA run holds one copy of the base, as training does."""
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k not in frozen}


@contextmanager
def scratch(trainer):
    """Run a probe on the trainer itself, then restore it exactly: Apprentice weights, optimiser and
    schedule state, KL controller, random generators, gradients, counters and config."""
    params = list(trainer.apprentice.parameters())
    snap = {
        "apprentice": mutable_state(trainer.apprentice),
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "kl_ctl": copy.deepcopy(trainer.kl_ctl.state_dict()),
        "gens": {k: g.get_state() for k, g in trainer.gens.items()},
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "counters": (trainer.iteration_no, trainer.episodes),
        "cfg": trainer.cfg,
        "torch_rng": torch.get_rng_state(),
        "training": trainer.apprentice.training,
        "hook": (getattr(trainer, "before_first_step", None), getattr(trainer, "rollout_agreement", {})),
    }
    trainer.before_first_step = None  # a probe's update is no iteration: the live check stays out of it
    try:
        yield trainer
    finally:
        trainer.before_first_step, trainer.rollout_agreement = snap["hook"]
        trainer.cfg = snap["cfg"]
        trainer.apprentice.load_state_dict(snap["apprentice"], strict=False)
        trainer.optimizer.load_state_dict(snap["optimizer"])
        trainer.scheduler.load_state_dict(snap["scheduler"])
        trainer.kl_ctl.load_state_dict(snap["kl_ctl"])
        for k, g in trainer.gens.items():
            g.set_state(snap["gens"][k])
        for p, g in zip(params, snap["grads"]):
            p.grad = g
        trainer.iteration_no, trainer.episodes = snap["counters"]
        torch.set_rng_state(snap["torch_rng"])
        trainer.apprentice.train(snap["training"])
