"""The run's random streams, each named once.

Every random draw of a run comes from `run.seed` plus a fixed offset per stream, so that one stream (say, the
held-out queries) is the same whatever else changes (say, the number of labels). Code asks for a stream by its
name here instead of writing `seed + 23`; two places that must agree (the held-out queries and the samples of
them before and after training, drawn by the pipeline, the loop and the incident scenario) then agree by
construction. Changing an offset changes every figure measured with it: add streams, do not renumber them.
"""

from __future__ import annotations

import random
from enum import IntEnum

import torch


class Stream(IntEnum):
    ONLINE_SAMPLING = 0  # online items of iteration i: their continuations from seed + i
    PPO_QUERIES = 1  # which training queries each PPO batch draws
    PPO_MINIBATCHES = 2  # the order of the rollout rows in PPO's minibatches
    NORMALISATION_QUERIES = 5  # `megacoach reward train`: queries of the initial-policy samples that normalise it
    ONLINE_RETRAIN = 7  # stride: retrain r of the online loop trains its Values Coach with seed + 7 * r
    LABEL_QUERIES = 11  # the queries of the offline best-of-K items
    LABEL_SAMPLING = 13  # their continuations (+ the number of items already in the store, when resumed)
    LABEL_SPLITS = 17  # train/valid split of those items, and the mock labelers' ties (+ items already there)
    EVAL_QUERIES = 23  # the held-out queries of the before/after report
    EVAL_SAMPLING = 29  # the samples of them, before and after training
    TRAIN_QUERIES = 31  # the pool of PPO's training queries
    ONLINE_QUERIES = 1000  # online items of iteration i: their queries from seed + 1000 + i
    PREFLIGHT = 4441  # the guards' preflight probes
    GUARD_SAMPLING = 7717  # the guards' fresh samples (baseline, fresh labels)
    GUARD_CHOICES = 7719  # the guards' other choices (probe queries, shown order of fresh items)


def seed_of(base: int, stream: Stream, offset: int = 0) -> int:
    """The seed of `stream` for a run seeded `base` (plus `offset`, e.g. the iteration)."""
    return int(base) + int(stream) + int(offset)


def generator(base: int, stream: Stream, offset: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for `stream` on `device` (default the CPU; a stream that samples from a model lives on the
    model's device). The same seed gives another sequence on another kind of device."""
    return torch.Generator(device=device).manual_seed(seed_of(base, stream, offset))


def restore(generator: torch.Generator, state: torch.Tensor, saved_on: str | None = None) -> bool:
    """Set `generator`'s state from a checkpoint's `state` when it fits: saved on the same kind of device
    (`saved_on`, 'cpu' or 'cuda', where the checkpoint says it) and of this generator's state format. A CPU
    generator's state is 5,056 bytes (Mersenne Twister), a CUDA one's 16 (seed and offset): a checkpoint of a GPU run
    resumed on the CPU (or back) leaves the generator on its own stream, seeded as the run is, and returns False (the
    weights and every other state load either way)."""
    if saved_on is not None and saved_on != torch.device(generator.device).type:
        return False
    if state.numel() != generator.get_state().numel():
        return False
    generator.set_state(state)
    return True


def rng(base: int, stream: Stream, offset: int = 0) -> random.Random:
    """A Python `random.Random` for `stream`."""
    return random.Random(seed_of(base, stream, offset))
