"""PPO for the Apprentice: the flat loop of the paper's reference code, one iteration at a time.

One iteration (read top to bottom in `PPOTrainer.iteration`):
  1. a batch of queries;  2. the Apprentice samples responses (fixed length, temperature);
  3. truncation and validity;  4. the Values Coach scores the truncated text;
  5. one forward of the Apprentice (old log-probs, values) and of the original model (reference log-probs);
  6. the reward path (ppo/objective.py): score - beta * KL, whitening, GAE;
  7. the guards look at what is about to be optimised;
  8. `ppo_epochs` x minibatches of clipped PPO updates (with gradient accumulation);
  9. the Coherence Coach's beta is updated from the batch KL;  10. metrics, checkpoints.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from megacoach.config import Config
from megacoach.distributed import Dist, check_world, portable
from megacoach.errors import DataError
from megacoach.lm.padding import left_pad
from megacoach.ppo import maths, objective
from megacoach.ppo.kl_control import AdaptiveKLController, FixedKLController
from megacoach.ppo.optim import AdamTFStyle, linear_decay
from megacoach.ppo.policy import Apprentice, reference_logits
from megacoach.sampling import HFGenerator, ResponseGenerator
from megacoach.tasks import Query, stop_token_ids, truncate_responses


@dataclass
class Batch:
    """One rollout batch: everything the update and the guards need (detached tensors)."""

    queries: list[Query]
    query_ids: torch.Tensor  # [B, Q] left-padded
    responses: torch.Tensor  # [B, T] as sampled
    truncated: torch.Tensor  # [B, T] padded after the stop token
    valid: torch.Tensor  # [B] bool
    raw_scores: torch.Tensor  # [B] Values Coach (normalised) on the truncated text
    logprobs: torch.Tensor  # [B, T] old log-probs
    ref_logprobs: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T]
    path: objective.RewardPath | None = None
    texts: list[str] = field(default_factory=list)  # decoded truncated responses

    @property
    def query_responses(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.responses], dim=1)

    @property
    def query_truncated(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.truncated], dim=1)


def make_kl_controller(cfg: Config):
    if cfg.kl.adaptive:
        return AdaptiveKLController(cfg.kl.init_kl_coef, target=cfg.kl.target, horizon=cfg.kl.horizon)
    return FixedKLController(cfg.kl.init_kl_coef)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            **{f"gen_{k}": g.get_state() for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for k, g in generators.items():
        g.set_state(state[f"gen_{k}"])


class PPOTrainer:
    """Holds the models, optimiser and controllers; `iteration()` runs one PPO iteration."""

    def __init__(self, cfg: Config, policy_lm, ref_lm, tokenizer, values_coach,
                 train_queries: list[Query], generator: ResponseGenerator | None = None, dist: Dist | None = None):
        self.cfg, self.tok = cfg, tokenizer
        self.dist = dist or Dist.single()  # several processes: see megacoach/distributed.py
        check_world(cfg, self.dist)
        self.pad_id = tokenizer.pad_token_id
        self.apprentice = Apprentice(policy_lm, cfg.ppo.separate_value_model)
        self.dist.broadcast_module(self.apprentice)  # every replica starts from rank 0's weights
        self.ref_lm = ref_lm
        self.values_coach = values_coach
        if not train_queries:
            raise DataError("no training queries (task.query_source gave none)")
        self.train_queries = train_queries
        self.generator = generator or HFGenerator(policy_lm, self.pad_id)
        self.stop_ids = stop_token_ids(tokenizer, cfg.task.truncate_token)
        self.kl_ctl = make_kl_controller(cfg)
        p = cfg.ppo
        self.n_iterations = max(1, p.total_episodes // p.batch_size)
        if cfg.run.max_iterations:
            self.n_iterations = min(self.n_iterations, cfg.run.max_iterations)
        self.n_minibatches = p.batch_size // p.mini_batch_size
        total_updates = max(1, p.total_episodes // p.batch_size) * p.ppo_epochs * self.n_minibatches
        params = [q for q in self.apprentice.parameters() if q.requires_grad]
        if p.optimizer == "tf_adam":
            self.optimizer = AdamTFStyle(params, lr=p.learning_rate, eps=p.adam_eps)
        else:
            self.optimizer = torch.optim.Adam(params, lr=p.learning_rate, eps=p.adam_eps)
        decay = (lambda step: linear_decay(step, total_updates)) if p.lr_decay else (lambda step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        self.gens = {"sample": torch.Generator().manual_seed(self.dist.seed(cfg.run.seed)),  # seed + rank * 100003
                     "queries": torch.Generator().manual_seed(cfg.run.seed + 1),
                     "minibatch": torch.Generator().manual_seed(cfg.run.seed + 2)}
        self.iteration_no = 0
        self.episodes = 0
        # several processes: what rank 0 has shared with the others, and every rank's sampling RNG state
        self._coach_shared, self._resync, self._sample_rngs = values_coach, False, None

    # ------------------------------------------------------------------ rollout (steps 1-6)
    def next_queries(self) -> list[Query]:
        idx = torch.randint(0, len(self.train_queries), (self.cfg.ppo.batch_size,), generator=self.gens["queries"])
        return [self.train_queries[i] for i in idx.tolist()]

    def _in_chunks(self, fn, *tensors: torch.Tensor):
        """fn over row chunks of `ppo.forward_batch_size` (default: the minibatch size), results concatenated:
        the same rows as one big pass, at a fraction of the peak memory (the [rows, T, vocab] logits dominate)."""
        n = tensors[0].shape[0]
        size = self.cfg.ppo.forward_batch_size or self.cfg.ppo.mini_batch_size
        if n <= size:
            return fn(*tensors)
        parts = [fn(*(t[i:i + size] for t in tensors)) for i in range(0, n, size)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(xs) for xs in zip(*parts))
        return torch.cat(parts)

    @torch.inference_mode()
    def score(self, query_ids: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
        """The Values Coach's normalised score of query + truncated response, read at the last real token."""
        return self._in_chunks(lambda q, r: self.values_coach(torch.cat([q, r], dim=1), self.pad_id).float(),
                               query_ids, truncated)

    @torch.inference_mode()
    def forward_old(self, query_responses: torch.Tensor):
        """Old log-probs and values (Apprentice) and reference log-probs (original model), one forward each."""
        return self._in_chunks(self._forward_old, query_responses)

    def _forward_old(self, query_responses: torch.Tensor):
        T, temp = self.cfg.task.response_length, self.cfg.task.temperature
        responses = query_responses[:, -T:]
        out = self.apprentice(query_responses, self.pad_id, T, temp)
        logprobs = maths.logprobs_from_logits(out.logits, responses)
        entropy = maths.entropy_from_logits(out.logits)
        ref_logprobs = maths.logprobs_from_logits(
            reference_logits(self.ref_lm, query_responses, self.pad_id, T, temp), responses)
        return logprobs, ref_logprobs, out.values, entropy

    @torch.inference_mode()
    def reference_logprobs(self, query_responses: torch.Tensor) -> torch.Tensor:
        T, temp = self.cfg.task.response_length, self.cfg.task.temperature
        return self._in_chunks(lambda qr: maths.logprobs_from_logits(
            reference_logits(self.ref_lm, qr, self.pad_id, T, temp), qr[:, -T:]), query_responses)

    def rollout(self, queries: list[Query]) -> Batch:
        t = self.cfg.task
        all_query_ids = left_pad([q.token_ids for q in queries], self.pad_id, t.query_length)
        query_ids = self.dist.shard(all_query_ids)  # this process samples its share of the global batch
        self.apprentice.eval()
        from_sampling = self.cfg.ppo.rollout_pass == "sampling" and self.apprentice.value_trunk is None
        roll = self.generator.generate(query_ids, t.response_length, t.temperature, self.gens["sample"],
                                       return_hidden=from_sampling)
        from_sampling = from_sampling and roll.hidden is not None  # an engine may not return hidden states
        responses = roll.responses.clone()  # out of inference mode: used by autograd in the update
        truncated, valid = truncate_responses(responses, self.stop_ids, t.truncate_after, self.pad_id)
        raw_scores = self.score(query_ids, truncated).clone()
        qr = torch.cat([query_ids, responses], 1)
        if from_sampling:  # old log-probs and values from the sampling pass itself
            logprobs = roll.logprobs.clone()
            with torch.inference_mode():
                values = self.apprentice.value_head(roll.hidden).squeeze(-1).float()
            values = values.clone()
            ref_logprobs = self.reference_logprobs(qr).clone()
        else:  # the straightforward path: one more full forward of the Apprentice
            logprobs, ref_logprobs, values, _ = (x.clone() for x in self.forward_old(qr))
        # the global batch on every process: the reward path (whitening, KL, advantages) runs on all of it
        responses, truncated, valid, raw_scores, logprobs, ref_logprobs, values = self.dist.gather(
            responses, truncated, valid, raw_scores, logprobs, ref_logprobs, values)
        texts = [self.tok.decode([x for x in row if x != self.pad_id]) for row in truncated.tolist()]
        batch = Batch(queries, all_query_ids, responses, truncated, valid, raw_scores, logprobs, ref_logprobs,
                      values, texts=texts)
        batch.path = self.reward_path(batch)
        return batch

    def reward_path(self, batch: Batch) -> objective.RewardPath:
        c = self.cfg
        return objective.run_reward_path(batch.raw_scores, batch.valid, batch.logprobs, batch.ref_logprobs,
                                         batch.values, self.kl_ctl.value, c.task.penalty_reward,
                                         c.ppo.whiten_rewards, c.ppo.gamma, c.ppo.lam)

    # ------------------------------------------------------------------ update (step 8)
    def update(self, batch: Batch) -> dict[str, float]:
        p, T, temp = self.cfg.ppo, self.cfg.task.response_length, self.cfg.task.temperature
        qr = batch.query_responses
        B = qr.shape[0]
        micro = p.mini_batch_size // p.gradient_accumulation_steps // self.dist.world_size
        self.apprentice.train()
        acc: dict[str, list[float]] = {}
        for _epoch in range(p.ppo_epochs):
            order = torch.randperm(B, generator=self.gens["minibatch"])
            for mb_start in range(0, B, p.mini_batch_size):
                mb = self.dist.shard(order[mb_start:mb_start + p.mini_batch_size])  # this process's share
                self.optimizer.zero_grad(set_to_none=True)
                for mi in range(0, len(mb), micro):
                    idx = mb[mi:mi + micro]
                    out = self.apprentice(qr[idx], self.pad_id, T, temp)
                    new_logp = maths.logprobs_from_logits(out.logits, batch.responses[idx])
                    loss, stats = objective.ppo_loss(new_logp, batch.logprobs[idx], batch.path.advantages[idx],
                                                     out.values, batch.values[idx], batch.path.returns[idx],
                                                     p.cliprange, p.cliprange_value, p.vf_coef)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite PPO loss ({loss.item()}) at iteration {self.iteration_no}")
                    (loss / p.gradient_accumulation_steps).backward()
                    with torch.no_grad():
                        stats["entropy"] = maths.entropy_from_logits(out.logits).mean()
                        stats["total_loss"] = loss.detach()
                    for k, v in stats.items():
                        acc.setdefault(k, []).append(float(v))
                self.dist.reduce_gradients(self.apprentice.parameters())  # mean over processes = whole minibatch
                self.optimizer.step()
                self.scheduler.step()
        self.apprentice.eval()
        return self.dist.mean_metrics({k: float(np.mean(v)) for k, v in acc.items()})

    # ------------------------------------------------------------------ one whole iteration
    def iteration(self, before_update: Callable[[Batch], None] | None = None) -> tuple[Batch, dict]:
        """One PPO iteration. Several processes: rank 0's call runs it on every process (see `follow`)."""
        with self.dist.collective():
            if self.dist.distributed and self.dist.is_main:
                self.dist.broadcast_object(self._lead_message())
            return self._iteration_together(before_update)

    def _iteration_together(self, before_update):
        out = self._iteration(before_update)
        if self.dist.distributed:  # kept for checkpoints, so a resumed run samples as an uninterrupted one
            self._sample_rngs = self.dist.gather_object(self.gens["sample"].get_state())
        return out

    def _iteration(self, before_update: Callable[[Batch], None] | None = None) -> tuple[Batch, dict]:
        t0 = time.time()
        batch = self.rollout(self.next_queries())
        t_roll = time.time() - t0
        path = batch.path
        for name, tensor in (("scores", path.scores), ("kl", path.kl), ("advantages", path.advantages),
                             ("values", batch.values)):
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"non-finite {name} in the rollout of iteration {self.iteration_no + 1}")
        if before_update is not None or self.dist.distributed:
            self.dist.run_on_main(before_update, batch)  # rank 0's guards decide for every process
        kl_coef = self.kl_ctl.value
        stats = self.update(batch)
        mean_kl = float(path.kl.sum(1).mean())
        self.kl_ctl.update(mean_kl, self.cfg.ppo.batch_size)
        self.iteration_no += 1
        self.episodes += self.cfg.ppo.batch_size
        non_score = float(path.non_score.sum(1).mean())
        metrics = {
            "iteration": self.iteration_no,
            "episodes": self.episodes,
            "objective/score": float(path.scores.mean()),
            "objective/score_raw_valid": float(batch.raw_scores[batch.valid].mean()) if batch.valid.any() else 0.0,
            "objective/valid_frac": float(batch.valid.float().mean()),
            "objective/kl": mean_kl,
            "objective/kl_coef": float(kl_coef),
            "objective/non_score_reward": non_score,
            "objective/score_total": float(path.scores.mean()) + non_score,
            "objective/entropy": float(-batch.logprobs.sum(1).mean()),
            "ppo/policy/approxkl": stats["approxkl"],
            "ppo/policy/clipfrac": stats["clipfrac"],
            "ppo/policy/entropy": stats["entropy"],
            "ppo/loss/policy": stats["pg_loss"],
            "ppo/loss/value": stats.get("vf_loss", 0.0),
            "ppo/loss/total": stats["total_loss"],
            "ppo/val/vpred": stats.get("vpred", 0.0),
            "ppo/val/error": stats.get("error", 0.0),
            "ppo/val/clipfrac": stats.get("vf_clipfrac", 0.0),
            "ppo/val/var_explained": float(maths.explained_variance(batch.values, path.returns)),
            "ppo/returns/mean": float(path.returns.mean()),
            "ppo/returns/var": float(path.returns.var(unbiased=False)),
            "ppo/lr": float(self.scheduler.get_last_lr()[0]),
            "time/rollout_s": t_roll,
            "time/iteration_s": time.time() - t0,
        }
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise FloatingPointError(f"non-finite metric {k} at iteration {self.iteration_no}")
        return batch, metrics

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        state = {"apprentice": self.apprentice.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                 "iteration": self.iteration_no, "episodes": self.episodes, "rng": rng_state(self.gens)}
        if self._sample_rngs is not None:
            state["sample_rng_ranks"] = self._sample_rngs
        return state

    def load_state_dict(self, state: dict) -> None:
        self.apprentice.load_state_dict(state["apprentice"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.iteration_no, self.episodes = state["iteration"], state["episodes"]
        own_sampling = self.gens["sample"].get_state()
        set_rng_state(state["rng"], self.gens)
        if self.dist.processes > 1:
            ranks = state.get("sample_rng_ranks")
            if ranks is not None and len(ranks) == self.dist.processes:
                self.gens["sample"].set_state(ranks[self.dist.rank])
                self._sample_rngs = ranks
            elif not self.dist.is_main:  # nothing saved for this rank (another process count): keep its own stream
                self.gens["sample"].set_state(own_sampling)
            self._resync = self.dist.is_main  # the others receive this state with the next iteration

    # ------------------------------------------------------------------ several processes (distributed.py)
    def _lead_message(self) -> dict:
        """What the other processes need before an iteration: a Values Coach rank 0 swapped in, a state it loaded."""
        msg = {"op": "iterate", "coach": None, "state": None,
               # what every process must share, whatever rank 0 did alone in between (a probe, a preflight)
               "shared": {"queries": self.gens["queries"].get_state(), "minibatch": self.gens["minibatch"].get_state(),
                          "iteration": self.iteration_no, "episodes": self.episodes}}
        if self.values_coach is not self._coach_shared:
            msg["coach"] = self._coach_shared = self.values_coach
        if self._resync:
            msg["state"], self._resync = self.state_dict(), False
        return msg

    def follow(self) -> None:
        """Processes other than rank 0: run every iteration that rank 0 runs (with its Values Coach and any state
        it loaded) until rank 0 releases them; a halt of rank 0 is raised here too."""
        while True:
            with self.dist.collective():
                msg = self.dist.broadcast_object(None)
                if msg["op"] == "stop":
                    if msg["error"] is not None:
                        raise msg["error"]
                    return
                if msg["coach"] is not None:
                    self.values_coach = self._coach_shared = msg["coach"]
                if msg["state"] is not None:
                    self.load_state_dict(msg["state"])
                shared = msg["shared"]
                self.gens["queries"].set_state(shared["queries"])
                self.gens["minibatch"].set_state(shared["minibatch"])
                self.iteration_no, self.episodes = shared["iteration"], shared["episodes"]
                try:
                    self._iteration_together(None)
                except Exception as err:  # noqa: BLE001
                    # decided on the global batch (non-finite values) or by rank 0 (a guard): rank 0 met it too
                    # and says what comes next; anything else is this process's own failure
                    if not (isinstance(err, FloatingPointError) or getattr(err, "from_rank0", False)):
                        raise

    def release_followers(self, error: BaseException | None = None) -> None:
        """Rank 0, when its loop ends: the other processes leave `follow` (raising `error`, e.g. a halt)."""
        if self.dist.processes > 1 and self.dist.is_main:
            msg = {"op": "stop", "error": portable(error) if error is not None else None}
            with self.dist.collective():
                if error is None:
                    self.dist.broadcast_object(msg)
                    return
                # after an error the others normally wait for this message; if rank 0 failed alone in the middle
                # of an iteration they wait elsewhere: give up after a while, and the launcher ends them
                import threading

                sender = threading.Thread(target=self.dist.broadcast_object, args=(msg,), daemon=True)
                sender.start()
                sender.join(timeout=120)
