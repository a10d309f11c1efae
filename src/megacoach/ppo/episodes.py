"""Episodes: the ONE builder of what PPO optimises and what the guards look at.

An episode is a query, a response, and everything the reward path needs about them, built in this order:

    1. pad the queries (left, to `task.query_length`);
    2. sample responses through a `ResponseGenerator` (or take given ones: labeled samples, canaries);
    3. truncation and validity (the task's rule, `settle` below: the paper's truncation, or stops), the mask of
       each episode's real tokens (with stops), and the decoded text;
    4. the Values Coach's score of query + truncated response, the reward terms' values of the query and decoded
       response (`reward.terms`), and the episode score (`objective.episode_scores`: the score plus the terms'
       weighted sum, or the invalid-response penalty);
    5. the Apprentice's old log-probs and values, the original model's reference log-probs;
    6. the reward path (`objective.run_reward_path`): score - beta * KL, whitening, GAE.

The trainer's rollout (`rollout`), the guards' probes and checks (`build`, `episode_scores`, `sample`), the
incident's evaluation and the continuations sampler (`sample`) all build episodes here, so the guards' promise
that they run the same code as training is the structure of the code, not a convention. Functions that need the
models take the trainer `tr` (its `cfg`, `tok`, `pad_id`, `stops`, `apprentice`, `ref_lm`, `values_coach`,
`kl_ctl`, `dist`, `ddp`, `device`), read at call time: a Values Coach swapped in, or a probe's scratch config, is what they use.
Links of the reward path are looked up through `objective` at call time (the incident's bug variants patch them).
Every tensor of a batch is made on the trainer's device (`tr.device`); only decoding reads them on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from megacoach.config import TaskConfig
from megacoach.errors import ConfigError
from megacoach.lm.hf import left_pad, precision_of
from megacoach.ppo import objective
from megacoach.ppo.policy import reference_logprobs as reference_logprobs_of
from megacoach.reward import terms as reward_terms
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
    mask: torch.Tensor | None = None  # [B, T] bool, real response tokens; None: all are (fixed-length responses)
    terms: torch.Tensor | None = None  # [B, n] the reward terms' values (reward.terms, unweighted); None: no terms

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
    mask: torch.Tensor | None = None  # [N, T] bool, real response tokens (None: all are)


# ------------------------------------------------------------------------------------------ the task's rules
# As the paper's reference code does them (TaskConfig has the defaults): a response is sampled for exactly
# `response_length` tokens; truncation keeps the first token at response position >= `truncate_after` whose text
# contains `truncate_token` and replaces everything after it by the pad token (the Values Coach scores the
# truncated text); a response with no such token is invalid and gets `penalty_reward` instead of a score. PPO
# trains on all `response_length` sampled tokens (no mask).
#
# With stops (task.stop, task.stop_at_eos: instruct models) a response ends at its first stop — the tokenizer's EOS,
# a token that completes a stop string, or the truncate token from `truncate_after` on — kept in the response; the
# sampler ends a row at EOS or at a token containing a stop string (and the batch once every row has ended); every
# position after the end is the pad token, and the episode's mask (`response_mask`) leaves it out of log-probs,
# values, KL, rewards, advantages and losses. A response that did not stop within `response_length` is invalid.
def stop_token_ids(tokenizer, truncate_token: str | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Ids of every vocabulary token whose text contains the truncate token (BPE may merge '.' with others)."""
    if truncate_token is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    ids = [i for i in range(len(tokenizer)) if truncate_token in tokenizer.decode([i])]
    if not ids:
        raise ConfigError(f"task.truncate_token {truncate_token!r} occurs in no token of the tokenizer")
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


@dataclass(frozen=True)
class StopRule:
    """Where a response ends, for one tokenizer and task (`stop_rule`)."""

    truncate_ids: torch.Tensor  # ids whose text contains task.truncate_token (empty: none)
    truncate_after: int
    end_ids: torch.Tensor | None = None  # with stops: EOS and ids whose text contains a stop string; None: none
    strings: tuple[str, ...] = ()  # the stop strings (one may be completed by several tokens)
    tokenizer: object = None  # decodes responses to find stop strings spread over several tokens
    hidden_ids: tuple[int, ...] = ()  # tokens left out of the decoded text (the EOS a response stops at)

    @property
    def early(self) -> bool:
        """Whether responses end at stops (else: exactly response_length tokens, the paper's)."""
        return self.end_ids is not None

    def to(self, device: torch.device | str) -> "StopRule":
        end = None if self.end_ids is None else self.end_ids.to(device)
        return replace(self, truncate_ids=self.truncate_ids.to(device), end_ids=end)


def stop_rule(tokenizer, task: TaskConfig, device: torch.device | str = "cpu") -> StopRule:
    """The task's stop rule for `tokenizer` (ConfigError naming the field for a stop the tokenizer cannot make)."""
    truncate_ids = stop_token_ids(tokenizer, task.truncate_token, device=device)
    if not task.early_stop:
        return StopRule(truncate_ids, task.truncate_after)
    end: set[int] = set()
    hidden: tuple[int, ...] = ()
    if task.stop_at_eos:
        if tokenizer.eos_token_id is None:
            raise ConfigError("task.stop_at_eos: the model's tokenizer has no end-of-sequence token (eos_token)")
        end.add(int(tokenizer.eos_token_id))
        hidden = (int(tokenizer.eos_token_id),)
    strings = tuple(task.stop or ())
    if strings:
        vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        end.update(i for i, text in enumerate(vocab) if any(st in text for st in strings))
    end.discard(int(tokenizer.pad_token_id))  # the pad token is never sampled
    return StopRule(truncate_ids, task.truncate_after, torch.tensor(sorted(end), dtype=torch.long, device=device),
                    strings, tokenizer, hidden)


def _string_ends(responses: torch.Tensor, rule: StopRule, pad_id: int) -> torch.Tensor:
    """[B, T] bool: the token at which the decoded response first contains a stop string (read on the host)."""
    B, T = responses.shape
    out = torch.zeros(B, T, dtype=torch.bool, device="cpu")
    for b, row in enumerate(responses.cpu().tolist()):
        ids = [x for x in row if x != pad_id]  # the pad token is never sampled: these are the sampled tokens
        has = lambda n: any(st in rule.tokenizer.decode(ids[:n]) for st in rule.strings)  # noqa: E731
        if not ids or not has(len(ids)):
            continue
        lo, hi = 1, len(ids)  # the shortest prefix that contains a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has(mid) else (mid + 1, hi)
        out[b, lo - 1] = True
    return out.to(responses.device)


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


def settle(responses: torch.Tensor, rule: StopRule, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(truncated, valid): the task's truncation and validity rule, the one place it is applied to episodes.
    Without stops, the paper's (`truncate_responses`); with stops, the first stop ends the response (pad after it)
    and a response without one is invalid."""
    if not rule.early:
        return truncate_responses(responses, rule.truncate_ids, rule.truncate_after, pad_id)
    B, T = responses.shape
    device = responses.device
    is_stop = torch.isin(responses, rule.end_ids.to(device))
    if rule.truncate_ids.numel():
        truncating = torch.isin(responses, rule.truncate_ids.to(device))
        truncating[:, :rule.truncate_after] = False
        is_stop |= truncating
    if rule.strings:
        is_stop |= _string_ends(responses, rule, pad_id)
    valid = is_stop.any(dim=1)
    first = torch.where(valid, is_stop.int().argmax(dim=1), torch.full((B,), T - 1, device=device))
    keep = torch.arange(T, device=device).unsqueeze(0) <= first.unsqueeze(1)
    return torch.where(keep, responses, torch.full_like(responses, pad_id)), valid


def response_mask(rule: StopRule, truncated: torch.Tensor, pad_id: int) -> torch.Tensor | None:
    """[B, T] bool, the real tokens of each episode (up to and including its stop); None without stops (every
    sampled token counts, as in the paper)."""
    return (truncated != pad_id) if rule.early else None


def real(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` [B, T] with 0 after each episode's end (`mask`); `x` itself when there is no mask."""
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def decode(tok, truncated: torch.Tensor, pad_id: int, hidden: tuple[int, ...] = ()) -> tuple[list[list[int]], list[str]]:
    """(token ids without padding, decoded text) of each truncated response (read on the host); the `hidden` tokens
    (the EOS a response stopped at) are in the ids, not in the text."""
    ids = [[x for x in row if x != pad_id] for row in truncated.cpu().tolist()]
    if not hidden:
        return ids, [tok.decode(x) for x in ids]
    return ids, [tok.decode([t for t in x if t not in hidden]) for x in ids]


def sample(generator: ResponseGenerator, tok, task: TaskConfig, rule: StopRule, queries: list[Query],
           rng: torch.Generator | None, batch_size: int = 64, repeats: int = 1) -> Sampled:
    """`repeats` responses per query (rows query-major), about `batch_size` sequences per generate call; the
    tensors are on the generator's device (the queries are padded on it)."""
    pad = tok.pad_token_id
    device = getattr(generator, "device", torch.device("cpu"))
    q_ids = pad_queries(queries, pad, task.query_length, device=device)
    roll = sample_in_batches(generator, q_ids, task.response_length, task.temperature, rng, batch_size,
                             repeats=repeats, stop_ids=rule.end_ids)
    q_ids = q_ids.to(roll.responses.device)
    truncated, valid = settle(roll.responses, rule, pad)
    mask = response_mask(rule, truncated, pad)
    ids, texts = decode(tok, truncated, pad, rule.hidden_ids)
    rows = [q for q in queries for _ in range(repeats)]
    return Sampled(rows, q_ids.repeat_interleave(repeats, dim=0) if repeats > 1 else q_ids,
                   roll.responses if mask is None else truncated, truncated, valid, real(roll.logprobs, mask), ids,
                   texts, mask)


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
    ref_logprobs = reference_logprobs_of(tr.ref_lm, query_responses, tr.pad_id, t.response_length, t.temperature,
                                         tr.cfg.ppo.fused_head)
    return logprobs, ref_logprobs, out.values, entropy


@torch.inference_mode()
def forward_old(tr, query_responses: torch.Tensor):
    """(old log-probs, reference log-probs, values, entropy): one forward of the Apprentice and of the original."""
    return in_chunks(lambda qr: _forward_old(tr, qr), chunk_rows(tr), query_responses)


@torch.inference_mode()
def reference_logprobs(tr, query_responses: torch.Tensor) -> torch.Tensor:
    t = tr.cfg.task
    return in_chunks(lambda qr: reference_logprobs_of(tr.ref_lm, qr, tr.pad_id, t.response_length, t.temperature,
                                                      tr.cfg.ppo.fused_head),
                     chunk_rows(tr), query_responses)


# ------------------------------------------------------------------------------------------ step 6
def term_values(tr, queries: list[Query], texts: list[str]) -> torch.Tensor | None:
    """[B, n] the reward terms' values (`reward.terms`, unweighted) of each episode's query and decoded response;
    None without terms."""
    terms = getattr(tr, "terms", None)
    return reward_terms.term_values(terms, [q.text for q in queries], texts, tr.device) if terms else None


def reward_path(tr, batch: Batch) -> objective.RewardPath:
    c = tr.cfg
    terms = getattr(tr, "terms", None)
    weights = reward_terms.weights_of(terms, tr.device) if terms and batch.terms is not None else None
    return objective.run_reward_path(batch.raw_scores, batch.valid, batch.logprobs, batch.ref_logprobs,
                                     batch.values, tr.kl_ctl.value, c.task.penalty_reward,
                                     c.ppo.whiten_rewards, c.ppo.gamma, c.ppo.lam, mask=batch.mask,
                                     terms=batch.terms if weights is not None else None, weights=weights)


# ------------------------------------------------------------------------------------------ whole batches
def old_logprobs_from_sampling(rollout_pass: str, apprentice) -> bool:
    """Whether PPO's old log-probs and values are kept from the sampling pass (ppo.rollout_pass) rather than
    recomputed by the update's own forward. 'auto': only for an fp32 Apprentice. In bf16 (bf16-mixed, or a bf16 base)
    the KV-cached decode and the full forward round differently (docs/hardware.md: 1e-3 nats on the CPU), so the
    ratio would not start at 1 and the clip window would sit off-centre; the forward pass makes both sides one
    computation. A separate value trunk always needs the forward pass (the sampler reads the policy's trunk only)."""
    if apprentice.value_trunk is not None:
        return False
    if rollout_pass == "auto":
        return precision_of(apprentice.lm) == "fp32"
    return rollout_pass == "sampling"



def rollout(tr, queries: list[Query], rng: torch.Generator) -> Batch:
    """PPO's batch: each process samples its share of the global batch with the Apprentice; the reward path runs
    on the whole (gathered) batch on every process."""
    t = tr.cfg.task
    all_query_ids = pad_queries(queries, tr.pad_id, t.query_length, device=tr.device)
    query_ids = tr.dist.shard(all_query_ids) if tr.ddp else all_query_ids  # this process's share
    tr.apprentice.eval()
    from_sampling = old_logprobs_from_sampling(tr.cfg.ppo.rollout_pass, tr.apprentice)
    stops = {"stop_ids": tr.stops.end_ids} if tr.stops.early else {}  # with stops, the sampler ends rows early
    roll = tr.generator.generate(query_ids, t.response_length, t.temperature, rng, return_hidden=from_sampling,
                                 **stops)
    from_sampling = from_sampling and roll.hidden is not None  # an engine may not return hidden states
    responses = roll.responses.clone()  # out of inference mode: used by autograd in the update
    truncated, valid = settle(responses, tr.stops, tr.pad_id)
    if tr.stops.early:  # after its stop an episode is padding: nothing there is sampled or trained on
        responses = truncated
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
    _, texts = decode(tr.tok, truncated, tr.pad_id, tr.stops.hidden_ids)
    mask = response_mask(tr.stops, truncated, tr.pad_id)
    batch = Batch(queries, all_query_ids, responses, truncated, valid, raw_scores, real(logprobs, mask),
                  real(ref_logprobs, mask), real(values, mask), texts=texts, mask=mask,
                  terms=term_values(tr, queries, texts))
    batch.path = reward_path(tr, batch)
    return batch


def build(tr, queries: list[Query], responses: list[list[int]]) -> Batch:
    """A batch of GIVEN responses (each cut or padded to the response length), built as `rollout` builds PPO's:
    same truncation and validity, Values Coach score, forward passes (with the entropy), reward path."""
    t = tr.cfg.task
    query_ids = pad_queries(queries, tr.pad_id, t.query_length, device=tr.device)
    resp = pad_responses(responses, tr.pad_id, t.response_length, device=tr.device)
    truncated, valid = settle(resp, tr.stops, tr.pad_id)
    mask = response_mask(tr.stops, truncated, tr.pad_id)
    if mask is not None:
        resp = truncated
    raw = values_coach_scores(tr, query_ids, truncated)
    lp, ref, val, ent = forward_old(tr, torch.cat([query_ids, resp], 1))
    _, texts = decode(tr.tok, truncated, tr.pad_id, tr.stops.hidden_ids)
    batch = Batch(list(queries), query_ids, resp, truncated, valid, raw, real(lp, mask), real(ref, mask),
                  real(val, mask), texts=texts, entropy=real(ent, mask), mask=mask,
                  terms=term_values(tr, list(queries), texts))
    batch.path = reward_path(tr, batch)
    return batch
