"""Rollouts: responses to a batch of queries, with the paper's sampling settings.

All generation goes through one small interface, `ResponseGenerator.generate(...)`, so that a serving
engine (vLLM on GPUs, say) can produce samples instead of this Hugging Face implementation. An engine
must honour the same contract:
- queries arrive left-padded with the pad token ([B, Q] long);
- exactly `response_length` tokens are sampled per query (no early stop at EOS), from softmax(logits / T)
  with top_k = 0 and top_p = 1, and the pad token is never sampled;
- it returns the tokens and the log-probability of each under the temperature-scaled distribution
  (PPO's old log-probs), computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megacoach.lm.padding import position_ids_from_mask


_CACHE_KW = "cache"  # transformers >= 5.2x names the KV cache `cache` (formerly `past_key_values`)


def _cache(out):
    return out.get("cache", out.get("past_key_values"))


@dataclass
class Rollout:
    responses: torch.Tensor  # [B, T] sampled token ids
    logprobs: torch.Tensor  # [B, T] log p(token) under softmax(logits / temperature)


class ResponseGenerator(Protocol):
    def generate(self, queries: torch.Tensor, response_length: int, temperature: float,
                 generator: torch.Generator | None = None) -> Rollout: ...


class HFGenerator:
    """KV-cached fixed-length sampling with any Hugging Face causal LM."""

    def __init__(self, model, pad_id: int):
        self.model = model
        self.pad_id = pad_id

    @torch.inference_mode()
    def generate(self, queries: torch.Tensor, response_length: int, temperature: float,
                 generator: torch.Generator | None = None) -> Rollout:
        B = queries.shape[0]
        mask = (queries != self.pad_id).long()
        pos = position_ids_from_mask(mask)
        out = self.model(input_ids=queries, attention_mask=mask, position_ids=pos, use_cache=True)
        past, logits = _cache(out), out.logits[:, -1, :]
        next_pos = pos[:, -1:] + 1
        responses = torch.empty(B, response_length, dtype=torch.long)
        logprobs = torch.empty(B, response_length, dtype=torch.float32)
        for t in range(response_length):
            scaled = logits.float() / temperature
            scaled[:, self.pad_id] = float("-inf")  # the pad token is never sampled
            logp = torch.log_softmax(scaled, dim=-1)
            tok = torch.multinomial(logp.exp(), 1, generator=generator)
            responses[:, t] = tok[:, 0]
            logprobs[:, t] = logp.gather(1, tok)[:, 0]
            if t == response_length - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            out = self.model(input_ids=tok, attention_mask=mask, position_ids=next_pos, use_cache=True,
                             **{_CACHE_KW: past})
            past, logits = _cache(out), out.logits[:, -1, :]
            next_pos = next_pos + 1
        return Rollout(responses, logprobs)


def sample_in_batches(gen: ResponseGenerator, queries: torch.Tensor, response_length: int, temperature: float,
                      generator: torch.Generator | None, batch_size: int = 64) -> Rollout:
    parts = [gen.generate(queries[i:i + batch_size], response_length, temperature, generator)
             for i in range(0, queries.shape[0], batch_size)]
    return Rollout(torch.cat([p.responses for p in parts]), torch.cat([p.logprobs for p in parts]))
