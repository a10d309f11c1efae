"""Reward terms beyond the Values Coach (`reward.terms`): named scorers of (query text, response text), each with a
weight, summed into each valid response's episode score by the reward path (ppo/objective.py `episode_scores`).

    length              the response's length in characters
    words               the response's number of words
    regex:<pattern>     1.0 where the pattern matches the response (re.search), else 0.0
    module:function     any callable (query: str, response: str) -> float, imported by name

Every term carries examples of what it should prefer; the guards' preflight refuses a term whose weighted score
does not rank each example's `better` above its `worse`, alone and through PPO's push, and names it. A term with
its sign the wrong way round (a penalty configured positive, a scorer that counts what it should penalise) is the
field's most shipped reward bug.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megacoach.errors import ConfigError

Scorer = Callable[[str, str], float]


def _length(query: str, response: str) -> float:
    return float(len(response))


def _words(query: str, response: str) -> float:
    return float(len(response.split()))


def _regex(pattern: str) -> Scorer:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"reward.terms: scorer 'regex:{pattern}': not a regular expression ({e})") from None
    return lambda query, response: 1.0 if rx.search(response) else 0.0


def load_scorer(spec: str) -> Scorer:
    """The scorer a `reward.terms[].scorer` names (ConfigError naming the field when it cannot be loaded)."""
    if spec == "length":
        return _length
    if spec == "words":
        return _words
    if spec.startswith("regex:"):
        return _regex(spec[len("regex:"):])
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"reward.terms: scorer {spec!r}: expected 'length', 'words', 'regex:<pattern>' or "
                          "'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.terms: scorer {spec!r}: cannot load it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"reward.terms: scorer {spec!r} is not callable")
    return fn


@dataclass(frozen=True)
class Term:
    """One loaded term: its name, scorer, weight and examples ((query, better, worse) texts)."""

    name: str
    scorer: Scorer
    weight: float
    examples: tuple[tuple[str, str, str], ...]


def load_terms(configs: Sequence) -> list[Term]:
    """`reward.terms` (config objects with name, scorer, weight, examples) loaded."""
    return [Term(c.name, load_scorer(c.scorer), float(c.weight),
                 tuple((e.query, e.better, e.worse) for e in c.examples)) for c in configs]


def term_values(terms: Sequence[Term], queries: Sequence[str], responses: Sequence[str],
                device: torch.device | str = "cpu") -> torch.Tensor | None:
    """[B, n_terms] each term's (unweighted) value of each (query, response); None without terms."""
    if not terms:
        return None
    rows = [[float(t.scorer(q, r)) for t in terms] for q, r in zip(queries, responses)]
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(len(rows), len(terms))


def weights_of(terms: Sequence[Term], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([t.weight for t in terms], dtype=torch.float32, device=device)
