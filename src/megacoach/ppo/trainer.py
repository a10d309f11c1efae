"""PPO for the Apprentice: the flat loop of the paper's reference code, one iteration at a time.

One iteration (`PPOTrainer.step`, ORIG's `PPOTrainer.step()`), read top to bottom:
  1-6. the rollout (ppo/episodes.py): a batch of queries; the Apprentice samples responses (fixed length, or up
       to a stop; temperature); truncation and validity (with stops: the mask of each episode's real tokens); the Values Coach scores the truncated text; the old and reference
       log-probs; the reward path (ppo/objective.py): score - beta * KL, whitening, GAE;
  7.   the guards look at what is about to be optimised;
  8.   `ppo_epochs` x minibatches of clipped PPO updates (with gradient accumulation); before the first optimiser
       step, the trainer's log-probs of the first minibatch's tokens against the rollout's own (ratio 1 by
       construction: ppo/consistency.py), handed to `before_first_step`;
  9.   the Coherence Coach's beta is updated from the batch KL;
  10.  the iteration's metrics (objective.iteration_metrics).
Several processes: each samples its share of the batch and the gradients are averaged (the data collectives of
megacoach/distributed.py); rank 0 leads every iteration and the others follow (`distributed.Lockstep`).
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import numpy as np
import torch

from megacoach.config import Config
from megacoach.distributed import Dist, Lockstep, check_world
from megacoach.errors import DataError
from megacoach.ppo import consistency, episodes, objective
from megacoach.ppo.episodes import Batch
from megacoach.ppo.kl_control import make_kl_controller
from megacoach.ppo.optim import AdamTFStyle, linear_decay
from megacoach.lm.hf import device_of
from megacoach.ppo.policy import Apprentice, load_apprentice_state
from megacoach.reward.terms import load_terms
from megacoach.sampling import HFGenerator, ResponseGenerator
from megacoach import seeds
from megacoach.tasks import Query

__all__ = ["Batch", "PPOTrainer"]


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            **{f"gen_{k}": g.get_state() for k, g in generators.items()},
            **{f"gen_{k}_device": torch.device(g.device).type for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Restore the random streams. A generator saved on another kind of device (a checkpoint of a GPU run resumed on
    the CPU, say) has another state format: it keeps its own stream (the weights load either way)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for k, g in generators.items():
        seeds.restore(g, state[f"gen_{k}"], state.get(f"gen_{k}_device"))


def check_finite(batch: Batch, iteration: int) -> None:
    for name, tensor in (("scores", batch.path.scores), ("kl", batch.path.kl), ("advantages", batch.path.advantages),
                         ("values", batch.values)):
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"non-finite {name} in the rollout of iteration {iteration}")


class PPOTrainer:
    """Holds the models, optimiser and controllers; `iteration()` runs one PPO iteration."""

    def __init__(self, cfg: Config, policy_lm, ref_lm, tokenizer, values_coach,
                 train_queries: list[Query], generator: ResponseGenerator | None = None, dist: Dist | None = None):
        self.cfg, self.tok = cfg, tokenizer
        self.device = device_of(policy_lm)  # every model of the run is here (pipeline.build_trainer puts them)
        self.dist = dist or Dist.single()  # several processes: see megacoach/distributed.py
        self.ddp = self.dist.processes > 1  # as nanoGPT's `if ddp:` — one process never talks to the others
        check_world(cfg, self.dist)
        self.pad_id = tokenizer.pad_token_id
        self.apprentice = Apprentice(policy_lm, cfg.ppo.separate_value_model, cfg.ppo.fused_head)
        if self.ddp:
            self.dist.broadcast_module(self.apprentice)  # every replica starts from rank 0's weights
        self.ref_lm = ref_lm
        self.values_coach = values_coach
        if not train_queries:
            raise DataError("no training queries (task.query_source gave none)")
        self.train_queries = train_queries
        self.terms = load_terms(cfg.reward.terms)  # reward terms beside the Values Coach's score (reward/terms.py)
        self.generator = generator or HFGenerator(policy_lm, self.pad_id, cfg.model.static_cache)
        self.stops = episodes.stop_rule(tokenizer, cfg.task, device=self.device)  # where a response ends
        self.kl_ctl = make_kl_controller(cfg.kl)
        p = cfg.ppo
        self.n_iterations = max(1, p.total_episodes // p.batch_size)
        if cfg.run.max_iterations:
            self.n_iterations = min(self.n_iterations, cfg.run.max_iterations)
        self.n_minibatches = p.batch_size // p.mini_batch_size
        total_updates = max(1, p.total_episodes // p.batch_size) * p.ppo_epochs * self.n_minibatches
        params = [q for q in self.apprentice.parameters() if q.requires_grad]
        if p.optimizer == "tf_adam":
            self.optimizer = AdamTFStyle(params, lr=p.learning_rate, eps=p.adam_eps, foreach=p.fused_optimizer)
        else:
            self.optimizer = torch.optim.Adam(params, lr=p.learning_rate, eps=p.adam_eps, fused=p.fused_optimizer or None)
        decay = (lambda step: linear_decay(step, total_updates)) if p.lr_decay else (lambda step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        seed = cfg.run.seed
        # sampling draws on the models' device; which queries and which minibatch rows are host-side choices
        self.gens = {"sample": torch.Generator(device=self.device).manual_seed(self.dist.seed(seed)),  # + rank * 100003
                     "queries": seeds.generator(seed, seeds.Stream.PPO_QUERIES),
                     "minibatch": seeds.generator(seed, seeds.Stream.PPO_MINIBATCHES)}
        self.iteration_no = 0
        self.episodes = 0
        self.lockstep = Lockstep(self.dist, values_coach) if self.ddp else None
        # the sampler against the trainer on the first minibatch of each update (consistency.rollout_agreement),
        # handed before the first optimiser step to `before_first_step` (the guards' check: it may raise)
        self.rollout_agreement: dict[str, float] = {}
        self.before_first_step: Callable[[dict], None] | None = None

    # ------------------------------------------------------------------ one whole iteration
    def iteration(self, before_update: Callable[[Batch], None] | None = None) -> tuple[Batch, dict]:
        """One PPO iteration. Several processes: rank 0's call runs it on every process (distributed.Lockstep)."""
        if self.lockstep is not None:
            return self.lockstep.lead(self, before_update)
        return self.step(before_update)

    def step(self, before_update: Callable[[Batch], None] | None = None) -> tuple[Batch, dict]:
        """One PPO iteration on this process: rollout -> guards -> update -> beta -> metrics."""
        t0 = time.time()
        batch = self.rollout(self.next_queries())  # 1-6. sample, score, log-probs, reward path
        t_roll = time.time() - t0
        check_finite(batch, self.iteration_no + 1)
        if self.ddp:
            self.dist.run_on_main(before_update, batch)  # 7. rank 0's guards decide for every process
        elif before_update is not None:
            before_update(batch)  # 7. the guards look at what is about to be optimised
        kl_coef = self.kl_ctl.value
        stats = self.update(batch)  # 8. PPO epochs x minibatches
        self.kl_ctl.update(float(objective.mean_sequence_kl(batch.path.kl)), self.cfg.ppo.batch_size)  # 9. Coherence Coach
        self.iteration_no += 1
        self.episodes += self.cfg.ppo.batch_size
        metrics = objective.iteration_metrics(batch, stats, kl_coef, self.scheduler.get_last_lr()[0],  # 10.
                                              self.iteration_no, self.episodes)
        metrics.update({"ppo/policy/rollout_approxkl": self.rollout_agreement.get("approxkl", 0.0),
                        "ppo/policy/rollout_max_logratio": self.rollout_agreement.get("max_logratio", 0.0),
                        "time/rollout_s": t_roll, "time/iteration_s": time.time() - t0})
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise FloatingPointError(f"non-finite metric {k} at iteration {self.iteration_no}")
        return batch, metrics

    # ------------------------------------------------------------------ rollout (steps 1-6)
    def next_queries(self) -> list[Query]:
        idx = torch.randint(0, len(self.train_queries), (self.cfg.ppo.batch_size,), generator=self.gens["queries"],
                            device="cpu")
        return [self.train_queries[i] for i in idx.tolist()]

    def rollout(self, queries: list[Query]) -> Batch:
        return episodes.rollout(self, queries, self.gens["sample"])

    # ------------------------------------------------------------------ update (step 8)
    def update(self, batch: Batch) -> dict[str, float]:
        p, T, temp = self.cfg.ppo, self.cfg.task.response_length, self.cfg.task.temperature
        qr = batch.query_responses
        B = qr.shape[0]
        micro = p.mini_batch_size // p.gradient_accumulation_steps // (self.dist.world_size if self.ddp else 1)
        self.apprentice.train()
        acc: dict[str, list[float]] = {}
        first: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = []  # the first minibatch's
        for _epoch in range(p.ppo_epochs):
            order = torch.randperm(B, generator=self.gens["minibatch"], device="cpu").to(self.device)
            for mb_start in range(0, B, p.mini_batch_size):
                mb = order[mb_start:mb_start + p.mini_batch_size]
                if self.ddp:
                    mb = self.dist.shard(mb)  # this process's share
                self.optimizer.zero_grad(set_to_none=True)
                for mi in range(0, len(mb), micro):
                    idx = mb[mi:mi + micro]
                    mask = None if batch.mask is None else batch.mask[idx]  # with stops: the episodes' real tokens
                    out = self.apprentice(qr[idx], self.pad_id, T, temp, responses=batch.responses[idx])
                    if first is not None:  # the trainer's log-probs of the rollout's tokens, before any step
                        first.append((out.logprobs.detach(), batch.logprobs[idx], mask))
                    loss, stats = objective.ppo_loss(out.logprobs, batch.logprobs[idx], batch.path.advantages[idx],
                                                     out.values, batch.values[idx], batch.path.returns[idx],
                                                     p.cliprange, p.cliprange_value, p.vf_coef, mask)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite PPO loss ({loss.item()}) at iteration {self.iteration_no}")
                    (loss / p.gradient_accumulation_steps).backward()
                    stats["entropy"] = out.entropy.mean() if mask is None else objective.masked_mean(out.entropy, mask)
                    stats["total_loss"] = loss.detach()
                    for k, v in stats.items():
                        acc.setdefault(k, []).append(float(v))
                if self.ddp:
                    self.dist.reduce_gradients(self.apprentice.parameters())  # mean over processes = whole minibatch
                if first is not None:
                    self._check_rollout_agreement(first)
                    first = None
                self.optimizer.step()
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # no gradient is read again: not held through the rollout
        self.apprentice.eval()
        stats = {k: float(np.mean(v)) for k, v in acc.items()}
        return self.dist.mean_metrics(stats) if self.ddp else stats

    def _check_rollout_agreement(self, parts) -> None:
        """The first minibatch's figures (`consistency.rollout_agreement`), kept for the iteration's metrics and
        handed to `before_first_step` before the optimiser's first step (several processes: averaged, checked on
        rank 0 for all)."""
        new = torch.cat([x[0] for x in parts])
        old = torch.cat([x[1] for x in parts])
        mask = None if parts[0][2] is None else torch.cat([x[2] for x in parts])
        figs = consistency.rollout_agreement(new, old, mask)
        if self.ddp:
            figs = self.dist.mean_metrics(figs)
        self.rollout_agreement = figs
        if self.ddp:  # every process takes part; rank 0's hook (the guards live there) decides for all
            self.dist.run_on_main(lambda f: None if self.before_first_step is None else self.before_first_step(f), figs)
        elif self.before_first_step is not None:
            self.before_first_step(figs)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        state = {"apprentice": self.apprentice_state(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                 "iteration": self.iteration_no, "episodes": self.episodes, "rng": rng_state(self.gens)}
        if self.lockstep is not None:
            state.update(self.lockstep.state_dict())
        return state

    def apprentice_state(self) -> dict:
        """The Apprentice's weights for a checkpoint; with a LoRA adapter (ppo.lora_r) only what trains (the adapter
        and the value head): the frozen base is the model the run loads at start."""
        state = self.apprentice.state_dict()
        if not self.cfg.ppo.lora_r:
            return state
        trained = {name for name, q in self.apprentice.named_parameters() if q.requires_grad}
        return {k: v for k, v in state.items() if k in trained}

    def load_apprentice_state(self, state: dict) -> None:
        load_apprentice_state(self.apprentice, state, bool(self.cfg.ppo.lora_r))

    def load_state_dict(self, state: dict) -> None:
        self.load_apprentice_state(state["apprentice"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.iteration_no, self.episodes = state["iteration"], state["episodes"]
        own_sampling = self.gens["sample"].get_state()
        set_rng_state(state["rng"], self.gens)
        if self.lockstep is not None:  # each process's own sampling stream
            self.lockstep.load_state_dict(self, state, own_sampling)
