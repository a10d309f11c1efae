"""Episodes: the ONE builder of what PPO optimises and what the guards look at.

An episode is a query, a response, and everything the reward path needs about them, built in this order:

    1. pad the queries (left, to `task.query_length`);
    2. sample responses through a `ResponseGenerator` (or take given ones: labeled samples, canaries);
    3. truncation and validity (the task's rule, `truncate_responses` below), and the decoded text;
    4. the Values Coach's score of query + truncated response, and the episode score
       (`objective.episode_scores`: the score, or the invalid-response penalty);
    5. the Apprentice's old log-probs and values, the original model's reference log-probs;
    6. the reward path (`objective.run_reward_path`): score - beta * KL, whitening, GAE.

The trainer's rollout (`rollout`), the guards' probes and checks (`build`, `episode_scores`, `sample`), the
incident's evaluation and the continuations sampler (`sample`) all build episodes here, so the guards' promise
that they run the same code as training is the structure of the code, not a convention. Functions that need the
models take the trainer `tr` (its `cfg`, `tok`, `pad_id`, `stop_ids`, `apprentice`, `ref_lm`, `values_coach`,
`kl_ctl`, `dist`, `ddp`, `device`), read at call time: a Values Coach swapped in, or a probe's scratch config, is what they use.
Links of the reward path are looked up through `objective` at call time (the incident's bug variants patch them).
Every tensor of a batch is made on the trainer's device (`tr.device`); only decoding reads them on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megacoach.config import TaskConfig
from megacoach.errors import ConfigError
from megacoach.lm.hf import left_pad
from megacoach.ppo import maths, objective
from megacoach.ppo.policy import reference_logits
from megacoach.sampling import ResponseGenerator, sample_in_batches
from megacoach.tasks import Query


@dataclass
class Batch:
    """One batch of episodes: everything the update and the guards need (detached tensors)."""

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
    entropy: torch.Tensor | None = None  # [B, T] the Apprentice's entropy (built from given responses only)

    @property
    def query_responses(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.responses], dim=1)

    @property
    def query_truncated(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.truncated], dim=1)


@dataclass
class Sampled:
    """Responses to queries under the task's rules (steps 1-3): no Values Coach, no second forward pass."""

    queries: list[Query]
    query_ids: torch.Tensor  # [N, Q] left-padded (one row per response: queries repeated when k > 1)
    responses: torch.Tensor  # [N, T] as sampled
    truncated: torch.Tensor  # [N, T]
    valid: torch.Tensor  # [N] bool
    logprobs: torch.Tensor  # [N, T] the sampler's log-probs
    ids: list[list[int]]  # truncated response tokens without padding
    texts: list[str]


# ------------------------------------------------------------------------------------------ the task's rules
# As the paper's reference code does them (TaskConfig has the defaults): a response is sampled for exactly
# `response_length` tokens; truncation keeps the first token at response position >= `truncate_after` whose text
# contains `truncate_token` and replaces everything after it by the pad token (the Values Coach scores the
# truncated text); a response with no such token is invalid and gets `penalty_reward` instead of a score.
def stop_token_ids(tokenizer, truncate_token: str | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Ids of every vocabulary token whose text contains the truncate token (BPE may merge '.' with others)."""
    if truncate_token is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    ids = [i for i in range(len(tokenizer)) if truncate_token in tokenizer.decode([i])]
    if not ids:
        raise ConfigError(f"task.truncate_token {truncate_token!r} occurs in no token of the tokenizer")
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


def truncate_responses(responses: torch.Tensor, stop_ids: torch.Tensor, truncate_after: int,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(truncated [B,T], valid [B] bool). Keeps the first stop token at position >= truncate_after, pads after it.

    With no truncate token (empty stop_ids) every response is valid and kept whole. Computed on the responses'
    device."""
    B, T = responses.shape
    device = responses.device
    if stop_ids.numel() == 0:
        return responses.clone(), torch.ones(B, dtype=torch.bool, device=device)
    is_stop = torch.isin(responses, stop_ids.to(device))
    is_stop[:, :truncate_after] = False
    valid = is_stop.any(dim=1)
    first = torch.where(valid, is_stop.float().argmax(dim=1), torch.full((B,), T - 1, device=device))
    keep = torch.arange(T, device=device).unsqueeze(0) <= first.unsqueeze(1)
    return torch.where(keep, responses, torch.full_like(responses, pad_id)), valid


# ------------------------------------------------------------------------------------------ steps 1-3
def pad_queries(queries: list[Query], pad_id: int, query_length: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    return left_pad([q.token_ids for q in queries], pad_id, query_length, device=device)


def pad_responses(responses: list[list[int]], pad_id: int, response_length: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Given responses cut or right-padded to exactly `response_length` tokens (built on the host, put on `device`)."""
    out = torch.full((len(responses), response_length), pad_id, dtype=torch.long, device="cpu")
    for i, r in enumerate(responses):
        r = list(r)[:response_length]
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
    return out.to(device)


def settle(responses: torch.Tensor, stop_ids: torch.Tensor, task: TaskConfig,
           pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(truncated, valid): the task's truncation and validity rule, the one place it is applied to episodes."""
    return truncate_responses(responses, stop_ids, task.truncate_after, pad_id)


def decode(tok, truncated: torch.Tensor, pad_id: int) -> tuple[list[list[int]], list[str]]:
    """(token ids without padding, decoded text) of each truncated response (read on the host)."""
    ids = [[x for x in row if x != pad_id] for row in truncated.cpu().tolist()]
    return ids, [tok.decode(x) for x in ids]


def sample(generator: ResponseGenerator, tok, task: TaskConfig, stop_ids: torch.Tensor, queries: list[Query],
           rng: torch.Generator | None, batch_size: int = 64, repeats: int = 1) -> Sampled:
    """`repeats` responses per query (rows query-major), about `batch_size` sequences per generate call; the
    tensors are on the generator's device (the queries are padded on it)."""
    pad = tok.pad_token_id
    device = getattr(generator, "device", torch.device("cpu"))
    q_ids = pad_queries(queries, pad, task.query_length, device=device)
    roll = sample_in_batches(generator, q_ids, task.response_length, task.temperature, rng, batch_size,
                             repeats=repeats)
    q_ids = q_ids.to(roll.responses.device)
    truncated, valid = settle(roll.responses, stop_ids, task, pad)
    ids, texts = decode(tok, truncated, pad)
    rows = [q for q in queries for _ in range(repeats)]
    return Sampled(rows, q_ids.repeat_interleave(repeats, dim=0) if repeats > 1 else q_ids, roll.responses,
                   truncated, valid, roll.logprobs, ids, texts)


# ------------------------------------------------------------------------------------------ steps 4-5
def in_chunks(fn, size: int, *tensors: torch.Tensor):
    """fn over row chunks of `size`, results concatenated: the same rows as one big pass, at a fraction of the
    peak memory (the [rows, T, vocab] logits dominate)."""
    n = tensors[0].shape[0]
    if n <= size:
        return fn(*tensors)
    parts = [fn(*(t[i:i + size] for t in tensors)) for i in range(0, n, size)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(xs) for xs in zip(*parts))
    return torch.cat(parts)


def chunk_rows(tr) -> int:
    """Rows per forward pass: `ppo.forward_batch_size` (default: the minibatch size)."""
    return tr.cfg.ppo.forward_batch_size or tr.cfg.ppo.mini_batch_size


@torch.inference_mode()
def values_coach_scores(tr, query_ids: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """[B] the Values Coach's normalised score of query + truncated response, read at the last real token
    (on the trainer's device); a Values Coach with its own tokenizer reads them as text (`RewardModel.score`)."""
    return in_chunks(lambda q, r: tr.values_coach.score(q, r, tr.pad_id).float().to(tr.device),
                     chunk_rows(tr), query_ids.to(tr.device), truncated.to(tr.device))


def episode_scores(tr, query_ids: torch.Tensor, truncated: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] the episode score PPO sees: the Values Coach's score, or the task's penalty where invalid."""
    return objective.episode_scores(values_coach_scores(tr, query_ids, truncated), valid.to(torch.bool),
                                    tr.cfg.task.penalty_reward)


def _forward_old(tr, query_responses: torch.Tensor):
    t = tr.cfg.task
    responses = query_responses[:, -t.response_length:]
    out = tr.apprentice(query_responses, tr.pad_id, t.response_length, t.temperature, responses=responses)
    logprobs, entropy = out.logprobs, out.entropy
    ref_logprobs = maths.logprobs_from_logits(
        reference_logits(tr.ref_lm, query_responses, tr.pad_id, t.response_length, t.temperature), responses)
    return logprobs, ref_logprobs, out.values, entropy


@torch.inference_mode()
def forward_old(tr, query_responses: torch.Tensor):
    """(old log-probs, reference log-probs, values, entropy): one forward of the Apprentice and of the original."""
    return in_chunks(lambda qr: _forward_old(tr, qr), chunk_rows(tr), query_responses)


@torch.inference_mode()
def reference_logprobs(tr, query_responses: torch.Tensor) -> torch.Tensor:
    t = tr.cfg.task
    return in_chunks(lambda qr: maths.logprobs_from_logits(
        reference_logits(tr.ref_lm, qr, tr.pad_id, t.response_length, t.temperature), qr[:, -t.response_length:]),
        chunk_rows(tr), query_responses)


# ------------------------------------------------------------------------------------------ step 6
def reward_path(tr, batch: Batch) -> objective.RewardPath:
    c = tr.cfg
    return objective.run_reward_path(batch.raw_scores, batch.valid, batch.logprobs, batch.ref_logprobs,
                                     batch.values, tr.kl_ctl.value, c.task.penalty_reward,
                                     c.ppo.whiten_rewards, c.ppo.gamma, c.ppo.lam)


# ------------------------------------------------------------------------------------------ whole batches
def rollout(tr, queries: list[Query], rng: torch.Generator) -> Batch:
    """PPO's batch: each process samples its share of the global batch with the Apprentice; the reward path runs
    on the whole (gathered) batch on every process."""
    t = tr.cfg.task
    all_query_ids = pad_queries(queries, tr.pad_id, t.query_length, device=tr.device)
    query_ids = tr.dist.shard(all_query_ids) if tr.ddp else all_query_ids  # this process's share
    tr.apprentice.eval()
    from_sampling = tr.cfg.ppo.rollout_pass == "sampling" and tr.apprentice.value_trunk is None
    roll = tr.generator.generate(query_ids, t.response_length, t.temperature, rng, return_hidden=from_sampling)
    from_sampling = from_sampling and roll.hidden is not None  # an engine may not return hidden states
    responses = roll.responses.clone()  # out of inference mode: used by autograd in the update
    truncated, valid = settle(responses, tr.stop_ids, t, tr.pad_id)
    raw_scores = values_coach_scores(tr, query_ids, truncated).clone()
    qr = torch.cat([query_ids, responses], 1)
    if from_sampling:  # old log-probs and values from the sampling pass itself
        logprobs = roll.logprobs.clone()
        with torch.inference_mode():
            values = tr.apprentice.values_from(roll.hidden)
        values = values.clone()
        ref_logprobs = reference_logprobs(tr, qr).clone()
    else:  # the straightforward path: one more full forward of the Apprentice
        logprobs, ref_logprobs, values, _ = (x.clone() for x in forward_old(tr, qr))
    if tr.ddp:  # the whole batch on every process: the reward path runs on all of it
        responses, truncated, valid, raw_scores, logprobs, ref_logprobs, values = tr.dist.gather(
            responses, truncated, valid, raw_scores, logprobs, ref_logprobs, values)
    _, texts = decode(tr.tok, truncated, tr.pad_id)
    batch = Batch(queries, all_query_ids, responses, truncated, valid, raw_scores, logprobs, ref_logprobs, values,
                  texts=texts)
    batch.path = reward_path(tr, batch)
    return batch


def build(tr, queries: list[Query], responses: list[list[int]]) -> Batch:
    """A batch of GIVEN responses (each cut or padded to the response length), built as `rollout` builds PPO's:
    same truncation and validity, Values Coach score, forward passes (with the entropy), reward path."""
    t = tr.cfg.task
    query_ids = pad_queries(queries, tr.pad_id, t.query_length, device=tr.device)
    resp = pad_responses(responses, tr.pad_id, t.response_length, device=tr.device)
    truncated, valid = settle(resp, tr.stop_ids, t, tr.pad_id)
    raw = values_coach_scores(tr, query_ids, truncated)
    lp, ref, val, ent = forward_old(tr, torch.cat([query_ids, resp], 1))
    _, texts = decode(tr.tok, truncated, tr.pad_id)
    batch = Batch(list(queries), query_ids, resp, truncated, valid, raw, lp, ref, val, texts=texts, entropy=ent)
    batch.path = reward_path(tr, batch)
    return batch
