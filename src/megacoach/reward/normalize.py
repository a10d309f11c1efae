"""Normalisation of the Values Coach: gain and bias so that initial-policy samples score mean 0, std 1.

ORIG does this twice, before and after training the reward model, each time on fresh samples of the
initial policy: it measures the RAW rewards (gain 1, bias 0), then sets
    gain = target_std / std(raw),   bias = target_mean - gain * mean(raw)
so that gain * raw + bias has the target mean and std on those samples. The std is the biased
(population) one, as TensorFlow's moments.
"""

from __future__ import annotations

import torch

from megacoach.errors import DataError
from megacoach.lm.hf import left_pad


def gain_bias(raw: torch.Tensor, target_mean: float = 0.0, target_std: float = 1.0) -> tuple[float, float, dict]:
    """(gain, bias, stats) from raw rewards [N]; stats = {'mean', 'std', 'n'} of the raw rewards."""
    raw = raw.detach().double().flatten()
    if raw.numel() < 2:
        raise DataError(f"normalisation needs at least 2 initial-policy samples (got {raw.numel()})")
    if not torch.isfinite(raw).all():
        raise DataError("normalisation: the Values Coach gave non-finite rewards on initial-policy samples")
    mean = raw.mean()
    std = raw.var(unbiased=False).sqrt()
    if std.item() <= 1e-12:
        raise DataError(f"normalisation: all {raw.numel()} initial-policy samples got the same raw reward "
                        f"({mean.item():.6g}); expected distinct samples")
    gain = target_std / std.item()
    bias = target_mean - gain * mean.item()
    return gain, bias, {"mean": mean.item(), "std": std.item(), "n": int(raw.numel())}


@torch.no_grad()
def raw_rewards(model, sequences, batch_size: int = 64) -> torch.Tensor:
    """[N] raw rewards of query+response sequences: a LongTensor [N, T], a list of token-id lists, or a list of
    (query ids, response ids) pairs in the Apprentice's tokens (`RewardModel.pairs_tensor`) (each chunk
    is scored on the model's device; the rewards come back to the host, where the statistics are made)."""
    if not isinstance(sequences, torch.Tensor):
        if sequences and isinstance(sequences[0], tuple):  # (query ids, response ids) pairs
            sequences = model.pairs_tensor(sequences)
        else:
            sequences = left_pad([list(s) for s in sequences], model.pad_id)
    was_training = model.training
    model.eval()
    out = torch.cat([model.raw(sequences[i:i + batch_size]).cpu() for i in range(0, sequences.shape[0], batch_size)])
    model.train(was_training)
    return out


def normalise(model, sequences, target_mean: float = 0.0, target_std: float = 1.0, batch_size: int = 64,
              dist=None) -> dict:
    """Set the model's gain and bias from its raw rewards on `sequences`; return the raw stats and gain/bias.
    dist (megacoach.distributed.Dist): several processes each score their share of `sequences` (every one
    passes all of them); the statistics are over all of them, the same on every process."""
    if dist is not None and dist.distributed:
        mine = dist.shard(sequences)
        raw = raw_rewards(model, mine, batch_size) if len(mine) else torch.zeros(0, device="cpu")
        raw = torch.cat(dist.gather_object(raw))
    else:
        raw = raw_rewards(model, sequences, batch_size)
    gain, bias, stats = gain_bias(raw, target_mean, target_std)
    model.set_normalisation(gain, bias)
    return {**stats, "gain": gain, "bias": bias}
