"""Rollouts: responses to a batch of queries, with the paper's sampling settings.

All generation goes through one small interface, `ResponseGenerator.generate(...)`, so that a serving
engine (vLLM on GPUs, say) can produce samples instead of this Hugging Face implementation. An engine
must honour the same contract:
- queries arrive left-padded with the pad token ([B, Q] long);
- exactly `response_length` tokens are sampled per query (no early stop at EOS), from softmax(logits / T)
  with top_k = 0 and top_p = 1, and the pad token is never sampled;
- unless `stop_ids` is given (only then: the paper's fixed-length task never passes it): a row ends at its first
  token in `stop_ids` (kept), every later position of that row is the pad token with log-prob 0, and sampling may
  end as soon as every row has ended (the tensors keep their `response_length` columns);
- it returns the tokens and the log-probability of each under the temperature-scaled distribution
  (PPO's old log-probs), computed in float32;
- with `return_hidden=True` it may also return the final hidden state that predicted each token (the
  trainer then reads values from it); an engine that cannot returns `hidden=None`, and the trainer
  recomputes log-probs and values in a forward pass of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from megacoach.errors import ConfigError
from megacoach.lm.hf import (CACHE_KW, autocast, cache_of, device_of, lm_logits, position_ids_from_mask, same_device,
                             trunk_of)


@dataclass
class Rollout:
    responses: torch.Tensor  # [B, T] sampled token ids
    logprobs: torch.Tensor  # [B, T] log p(token) under softmax(logits / temperature)
    hidden: torch.Tensor | None = None  # [B, T, d] final hidden state that predicted each token (if asked)


class ResponseGenerator(Protocol):
    def generate(self, queries: torch.Tensor, response_length: int, temperature: float,
                 generator: torch.Generator | None = None, return_hidden: bool = False,
                 repeats: int = 1, stop_ids: torch.Tensor | None = None) -> Rollout: ...


def sample_categorical(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax-normalised log-probabilities `logp` [B, V]: [B, 1] long.

    Inverse-CDF sampling: a uniform draw per row located in the row's cumulative distribution (float64, so that
    8192-way sums keep every token's share); the draw is made on `logp`'s device, with `generator` (which must live
    there). Exactly the categorical distribution, like `torch.multinomial`,
    which on CPU draws an exponential variate for every vocabulary entry (a torch profile with the built-in model:
    16 ms per step of 128 rows, 28% of the sampling time); this draws one number per row (benchmarks/sampling.py:
    1.36x more samples/s at batch 128). Tokens of probability 0 (the pad token) are never returned: a zero-width
    interval of the CDF contains no draw."""
    cdf = logp.exp().double().cumsum(dim=-1)
    u = torch.rand(logp.shape[0], 1, generator=generator, dtype=torch.float64, device=logp.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logp.shape[-1] - 1)


def local_attention(config) -> bool:
    """Whether any layer of the model attends to a window only (its own mask logic: the static cache is not used)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(config, "layer_types", None) or []) | set(getattr(config, "attention_layers", None) or [])
    return bool(kinds - {"full_attention", "global"}) or any(
        getattr(config, name, None) for name in ("sliding_window", "window_size", "attention_window", "local_window"))


def static_cache(model, prefill, repeats: int, max_len: int):
    """A preallocated KV cache (transformers' StaticCache) of `max_len` positions per row, holding the prefill's
    keys and values (a DynamicCache of the distinct queries) repeated `repeats` times, row-major as the responses
    are; None where the model's cache is not plain full attention (sliding windows, hybrid or recurrent layers:
    those keep the dynamic cache).

    Why: a DynamicCache grows by concatenation, so every decode step copies every layer's whole cache (with the
    built-in model, 41% of label collection's sampling time went to that copy); a static cache writes each new
    position in place."""
    layers = getattr(prefill, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers) or local_attention(model.config):
        return None
    try:
        with torch.device(layers[0].keys.device):  # its position counters are made at construction
            cache = StaticCache(config=model.config, max_cache_len=max_len)
    except (ValueError, TypeError, AttributeError):
        return None
    if len(cache.layers) != len(layers) or any(type(layer) is not StaticLayer for layer in cache.layers):
        return None
    for own, filled in zip(cache.layers, layers):
        keys, values = filled.keys, filled.values
        if repeats > 1:
            keys, values = keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0)
        own.lazy_initialization(keys, values)
        n = keys.shape[-2]
        own.keys[:, :, :n].copy_(keys)
        own.values[:, :, :n].copy_(values)
        own.cumulative_length.fill_(n)
    return cache


class HFGenerator:
    """KV-cached fixed-length sampling with any Hugging Face causal LM.

    Runs the model's trunk and applies the LM head only at the positions that are sampled from (the
    query's other positions never need logits). With `return_hidden`, it also returns the final hidden
    state that predicted each response token, so a value head on the same trunk needs no second pass.
    Everything is computed on the model's device (queries are moved there; `generator` must live there too); the
    trunk runs in the model's precision (lm.hf.autocast), the LM head outside autocast (float32 unless the model's
    weights are bf16) and the log-softmax in float32. `use_static_cache` (model.static_cache): decode into a
    preallocated cache (`static_cache`) where the model allows it; the same numbers up to float rounding."""

    def __init__(self, model, pad_id: int, use_static_cache: bool = True):
        self.model = model
        self.trunk = trunk_of(model)
        self.pad_id = pad_id
        self.use_static_cache = use_static_cache

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    def _step(self, **kwargs):
        with autocast(self.model):
            out = self.trunk(use_cache=True, **kwargs)
        return cache_of(out), out.last_hidden_state[:, -1, :]

    @torch.inference_mode()
    def generate(self, queries: torch.Tensor, response_length: int, temperature: float,
                 generator: torch.Generator | None = None, return_hidden: bool = False,
                 repeats: int = 1, stop_ids: torch.Tensor | None = None) -> Rollout:
        """`repeats` continuations of each query (rows query-major: q0, q0, ..., q1, ...); the query is read once.
        `stop_ids`: a row ends at its first token among them, padding follows, and the loop ends once all have."""
        T = response_length
        device = self.device
        if generator is not None and not same_device(generator.device, device):
            raise ConfigError(f"the sampling generator lives on {generator.device} but the model on {device}: make "
                              f"it with torch.Generator(device=...) (seeds.generator(..., device=...))")
        queries = queries.to(device)
        mask = (queries != self.pad_id).long()
        pos = position_ids_from_mask(mask)
        past, h = self._step(input_ids=queries, attention_mask=mask, position_ids=pos)
        Q = mask.shape[1]
        # one prefill per distinct query, then its KV cache serves all its continuations
        static = static_cache(self.model, past, repeats, Q + T) if self.use_static_cache and T > 1 else None
        if static is not None:
            past = static
        elif repeats > 1:
            past.batch_repeat_interleave(repeats)
        if repeats > 1:
            h, mask, pos = (x.repeat_interleave(repeats, dim=0) for x in (h, mask, pos))
        B = h.shape[0]
        next_pos = pos[:, -1:] + 1
        responses = torch.empty(B, T, dtype=torch.long, device=device)
        logprobs = torch.empty(B, T, dtype=torch.float32, device=device)
        hidden = torch.empty(B, T, h.shape[-1], dtype=h.dtype, device=device) if return_hidden else None
        done = None  # with stop_ids: [B] rows that have ended; after its end a row is padding with log-prob 0
        if stop_ids is not None:
            done, stop_ids = torch.zeros(B, dtype=torch.bool, device=device), stop_ids.to(device)
            responses.fill_(self.pad_id)
            logprobs.zero_()
            if hidden is not None:
                hidden.zero_()
        # a static cache attends over all Q + T slots, so the mask says which are filled (ones as they fill)
        full_mask = torch.cat([mask, torch.full((B, T), int(static is None), dtype=mask.dtype, device=device)], dim=1)
        for t in range(T):
            if hidden is not None:
                hidden[:, t] = h
            scaled = lm_logits(self.model, h).float() / temperature
            scaled[:, self.pad_id] = float("-inf")  # the pad token is never sampled
            logp = torch.log_softmax(scaled, dim=-1)
            tok = sample_categorical(logp, generator)
            if done is not None:
                tok = tok.masked_fill(done[:, None], self.pad_id)
            responses[:, t] = tok[:, 0]
            logprobs[:, t] = logp.gather(1, tok)[:, 0]
            if done is not None:
                logprobs[:, t].masked_fill_(done, 0.0)
                done |= torch.isin(tok[:, 0], stop_ids)
                if bool(done.all()):  # every row has ended: the rest stays padding
                    break
            if t == T - 1:
                break
            before = past
            if static is not None:
                full_mask[:, Q + t] = 1
                step_mask = full_mask
            else:
                step_mask = full_mask[:, :Q + t + 1]
            past, h = self._step(input_ids=tok, attention_mask=step_mask, position_ids=next_pos, **{CACHE_KW: before})
            if t == 0 and past is not before:
                raise ConfigError(f"{type(self.trunk).__name__} ignored the KV cache passed as `{CACHE_KW}` "
                                  "(an older transformers?): sampled log-probs would be wrong")
            next_pos = next_pos + 1
        return Rollout(responses, logprobs, hidden)


def sample_in_batches(gen: ResponseGenerator, queries: torch.Tensor, response_length: int, temperature: float,
                      generator: torch.Generator | None, batch_size: int = 64, repeats: int = 1,
                      stop_ids: torch.Tensor | None = None) -> Rollout:
    """`repeats` continuations of each query, about `batch_size` sequences per generate call (`stop_ids`: as
    `generate`'s, passed only when given)."""
    step = max(1, batch_size // repeats)
    stops = {} if stop_ids is None else {"stop_ids": stop_ids}
    parts = [gen.generate(queries[i:i + step], response_length, temperature, generator, repeats=repeats, **stops)
             for i in range(0, queries.shape[0], step)]
    return Rollout(torch.cat([p.responses for p in parts]), torch.cat([p.logprobs for p in parts]))
