"""The Values Coach reading another tokenizer's tokens, through the text (`reward.model` with its own tokenizer).

An episode's query and truncated response are decoded by the Apprentice's tokenizer (without its padding, BOS and
EOS tokens) and each is tokenized again by the Values Coach's: the query with the coach's own special tokens (its
BOS, where its tokenizer adds one), the response without. The coach then reads [left-padded query | right-padded
response] in its own tokens and scores the last real one, as it does when the two tokenizers are one. Its
training (the labels' comparisons, stored in the Apprentice's tokens), its normalisation and its scores in PPO all
go through `query` and `response` here, so the coach always sees the same tokens for the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megacoach.reward.data import Comparison, sequences_tensor


class Retokenizer:
    """Token ids of `source` (the Apprentice's tokenizer) -> token ids of `target` (the Values Coach's)."""

    def __init__(self, source, target):
        self.source, self.target = source, target
        self.pad_id = int(target.pad_token_id)
        self._drop = {int(i) for i in (source.pad_token_id, source.bos_token_id, source.eos_token_id) if i is not None}

    def text(self, ids: Sequence[int]) -> str:
        """The text of source tokens, without padding, BOS and EOS."""
        return self.source.decode([int(i) for i in ids if int(i) not in self._drop])

    def query(self, ids: Sequence[int]) -> list[int]:
        return list(self.target(self.text(ids))["input_ids"])

    def response(self, ids: Sequence[int]) -> list[int]:
        text = self.text(ids)
        return list(self.target(text, add_special_tokens=False)["input_ids"]) if text else []

    def comparison(self, c: Comparison) -> Comparison:
        return Comparison(self.query(c.query_ids), [self.response(s) for s in c.sample_ids], c.chosen)

    def sequences(self, queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N, L] target tokens on the host: each query left-padded, each response right-padded (the target's pad)."""
        return sequences_tensor([self.query(q) for q in queries], [self.response(r) for r in responses], self.pad_id)
