"""Training the Values Coach on best-of-K comparisons, as the paper does it.

- exactly `cfg.epochs` pass(es) over the training comparisons (paper: 1), in a seeded random order;
- Adam (eps `cfg.adam_eps`, paper 1e-5), learning rate `cfg.learning_rate` decayed linearly to 0:
  step i of n uses lr * (1 - i / n); batches of `cfg.batch_size` comparisons (the last may be smaller);
- all K sequences of a batch go through the model in one forward pass (each query computed once and
  shared by its K responses: `RewardModel.best_of_k`); loss = softmax cross-entropy over
  the K normalised rewards (loss.py); no dropout;
- normalisation before and after training on samples of the initial policy (normalize.py);
- held-out accuracy and loss measured at the end, on the normalised model as it is saved.

Several processes (`dist`, megacoach/distributed.py): every process holds the whole model and the same
comparisons in the same order; each batch is split across the processes, each weights its loss by its
share and the gradients are summed, which is exactly the single-process gradient of the batch; the
normalisation statistics and the held-out figures are computed over all processes' shares.

`retrain_from_scratch` is the online variant's one call: a fresh Values Coach (the base LM's weights and
a fresh head) trained on all labels so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from megacoach.config import RewardConfig
from megacoach.distributed import Dist
from megacoach.errors import DataError
from megacoach.progress import StageProgress
from megacoach.reward.data import (Comparison, as_comparisons, comparison_batch, comparison_tensors, labels_from_store,
                                   validate_comparisons)
from megacoach.reward.loss import best_of_k_loss, blind_to_direction, reversed_choices
from megacoach.reward.model import RewardModel
from megacoach.reward.normalize import normalise

Log = Callable[[str], None]
PROGRESS_EVERY_S = 30.0  # the least time between two progress lines of the Values Coach's training


def _vocab_size(model: RewardModel) -> int | None:
    """The vocabulary the comparisons' token ids come from: the Apprentice's when the coach retokenizes them."""
    if model.retokenizer is not None:
        return len(model.retokenizer.source)
    emb = model.trunk.get_input_embeddings() if hasattr(model.trunk, "get_input_embeddings") else None
    return emb.num_embeddings if emb is not None else None


def batch_rewards(model: RewardModel, comparisons: Sequence[Comparison], pad_id: int,
                  share_query: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised rewards [B, K], chosen [B]) of a batch: all B*K sequences in one forward pass; with
    share_query (default) each query is computed once for its K responses (same rewards, ~half the cost). The
    comparisons are in the Apprentice's tokens: a coach with a retokenizer reads them in its own."""
    if model.retokenizer is not None:
        comparisons, pad_id = [model.retokenizer.comparison(c) for c in comparisons], model.pad_id
    if share_query:
        queries, responses, chosen = comparison_tensors(comparisons, pad_id)
        rewards = model.best_of_k(queries, responses, pad_id)
    else:
        ids, chosen = comparison_batch(comparisons, pad_id)
        rewards = model(ids, pad_id).view(len(comparisons), -1)
    return rewards, chosen.to(rewards.device)


@torch.no_grad()
def evaluate(model: RewardModel, comparisons, batch_size: int = 64, pad_id: int | None = None,
             dist: Dist | None = None) -> dict:
    """{'accuracy', 'reversed_accuracy', 'chance', 'loss', 'n'} of the (normalised) Values Coach on comparisons;
    None values if there are none. `reversed_accuracy`: the same accuracy with each comparison's choice reversed
    (loss.reversed_choices), below chance wherever the accuracy is above it; a figure blind to the labelers'
    choice (both above chance) raises DataError instead of being reported as agreement.
    dist: several processes each evaluate their share; the figures are over all comparisons."""
    comps = as_comparisons(comparisons)
    if not comps:
        return {"accuracy": None, "reversed_accuracy": None, "chance": None, "loss": None, "n": 0}
    validate_comparisons(comps, _vocab_size(model), "valid comparisons")
    pad = model.pad_id if pad_id is None else pad_id
    was_training = model.training
    model.eval()
    loss_sum, acc_sum, rev_sum = 0.0, 0.0, 0.0
    mine = comps if dist is None else dist.shard(comps)
    for i in range(0, len(mine), batch_size):
        part = mine[i:i + batch_size]
        rewards, chosen = batch_rewards(model, part, pad)
        loss, acc = best_of_k_loss(rewards, chosen)
        loss_sum += loss.item() * len(part)
        acc_sum += acc.item() * len(part)
        # the same figure, computed the same way, with every choice reversed (loss.reversed_choices)
        rev = [best_of_k_loss(rewards, alt)[1] for alt in reversed_choices(chosen, rewards.shape[1])]
        rev_sum += torch.stack(rev).mean().item() * len(part)
    if dist is not None and dist.distributed:
        loss_sum, acc_sum, rev_sum = dist.all_sum(torch.tensor([loss_sum, acc_sum, rev_sum], dtype=torch.float64,
                                                               device="cpu")).tolist()
    model.train(was_training)
    n = len(comps)
    chance = 1.0 / comps[0].k
    out = {"accuracy": acc_sum / n, "reversed_accuracy": rev_sum / n, "chance": chance, "loss": loss_sum / n, "n": n}
    if blind_to_direction(out["accuracy"], out["reversed_accuracy"], chance):
        raise DataError(f"Values Coach evaluation: accuracy {out['accuracy']:.3f} read as stored and "
                        f"{out['reversed_accuracy']:.3f} with every choice reversed (chance {chance:.3f}): the figure "
                        "does not depend on which sample the labelers chose, so it is not agreement with them")
    return out


def train_reward_model(model: RewardModel, train_comparisons, valid_comparisons, cfg: RewardConfig,
                       pad_id: int | None = None, normalisation_samples=None, seed: int = 1,
                       log: Log | None = print, eval_batch_size: int = 64, dist: Dist | None = None) -> dict:
    """Train `model` in place; return metrics.

    normalisation_samples: query + (sampled, truncated) response token sequences of the INITIAL policy,
    a LongTensor [N, T] (queries left-padded, pad after truncation), a list of token-id lists, or a list of
    (query ids, response ids) pairs (what a coach with a retokenizer needs: it reads each part as text); used to set
    gain and bias before and after training. None: keep the current gain and bias (not the paper's method).

    Metrics: train_loss / train_accuracy (mean over the epoch's batches), valid_loss / valid_accuracy,
    num_train, num_valid, k, steps, train_examples_per_s (training comparisons per second of optimisation,
    each = K sequences), seconds, normalisation {'before', 'after'} (raw mean/std, gain, bias).
    dist: the processes that train together (every one calls this with the same arguments); None: one.
    """
    log = log or (lambda _msg: None)
    pad = model.pad_id if pad_id is None else int(pad_id)
    train = as_comparisons(train_comparisons)
    valid = as_comparisons(valid_comparisons or [])
    k = validate_comparisons(train, _vocab_size(model), "train comparisons")
    t_start = time.perf_counter()
    metrics: dict = {"num_train": len(train), "num_valid": len(valid), "k": k, "normalisation": {}}

    if normalisation_samples is not None:
        metrics["normalisation"]["before"] = normalise(model, normalisation_samples, batch_size=eval_batch_size, dist=dist)
        n = metrics["normalisation"]["before"]
        log(f"Values Coach: normalised before training on {n['n']} initial-policy samples "
            f"(raw mean {n['mean']:+.4f}, std {n['std']:.4f} -> gain {n['gain']:.4f}, bias {n['bias']:+.4f})")

    gen = torch.Generator(device="cpu").manual_seed(seed)  # the order of the comparisons: a host-side choice
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_eps)
    model.train()
    step, loss_sum, acc_sum, seen = 0, 0.0, 0.0, 0
    t_train = time.perf_counter()
    progress = StageProgress("Values Coach: training", cfg.epochs * len(train), log=log, unit="comparisons",
                             every_s=PROGRESS_EVERY_S)  # plain lines through `log`: nothing to enter
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=gen, device="cpu").tolist()
        for b in range(steps_per_epoch):
            part = [train[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            lr = cfg.learning_rate * (1.0 - step / total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            if dist is None or not dist.distributed:
                rewards, chosen = batch_rewards(model, part, pad)
                loss, acc = best_of_k_loss(rewards, chosen)
                step_loss, step_acc = loss.item(), acc.item()
            else:  # this process's share, its loss weighted by its share; the gradients are summed below
                mine = dist.shard(part)
                loss = None
                if mine:  # the last, short batch may leave a process nothing
                    rewards, chosen = batch_rewards(model, mine, pad)
                    loss, acc = best_of_k_loss(rewards, chosen)
                    sums = torch.tensor([loss.item() * len(mine), acc.item() * len(mine)], dtype=torch.float64,
                                        device="cpu")
                    loss = loss * (len(mine) / len(part))
                else:
                    sums = torch.zeros(2, dtype=torch.float64, device="cpu")
                step_loss, step_acc = (dist.all_sum(sums) / len(part)).tolist()
            if not math.isfinite(step_loss):
                raise DataError(f"Values Coach training diverged: loss {step_loss} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            if dist is not None:
                dist.reduce_gradients(params, op="sum")
            opt.step()
            step += 1
            seen += len(part)
            loss_sum += step_loss * len(part)
            acc_sum += step_acc * len(part)
            progress.advance(len(part), f"step {step}/{total_steps} epoch {epoch + 1} loss {step_loss:.4f} "
                                        f"acc {step_acc:.3f} lr {lr:.2e}")
    train_seconds = time.perf_counter() - t_train
    model.eval()

    if normalisation_samples is not None:
        metrics["normalisation"]["after"] = normalise(model, normalisation_samples, batch_size=eval_batch_size, dist=dist)
        n = metrics["normalisation"]["after"]
        log(f"Values Coach: normalised after training (raw mean {n['mean']:+.4f}, std {n['std']:.4f} -> "
            f"gain {n['gain']:.4f}, bias {n['bias']:+.4f})")
    model.normalisation = metrics["normalisation"]

    ev = evaluate(model, valid, eval_batch_size, pad, dist=dist)
    metrics.update({
        "train_loss": loss_sum / max(seen, 1), "train_accuracy": acc_sum / max(seen, 1),
        "valid_loss": ev["loss"], "valid_accuracy": ev["accuracy"], "valid_reversed_accuracy": ev["reversed_accuracy"],
        "steps": step,
        "train_examples_per_s": seen / train_seconds if train_seconds > 0 else float("nan"),
        "train_seconds": train_seconds, "seconds": time.perf_counter() - t_start,
    })
    if ev["n"]:
        log(f"Values Coach: held-out accuracy {ev['accuracy']:.3f} (chance {1 / k:.3f}; with every choice reversed "
            f"{ev['reversed_accuracy']:.3f}), loss {ev['loss']:.4f} on {ev['n']} comparisons")
    return metrics


def retrain_from_scratch(base_model: str, train_comparisons, valid_comparisons=None, cfg: RewardConfig | None = None,
                         normalisation_samples=None, seed: int = 1, log: Log | None = print,
                         dtype: str = "float32", tokenizer=None, device: torch.device | str | None = None,
                         dist: Dist | None = None, precision: str | None = None) -> tuple[RewardModel, dict]:
    """A fresh Values Coach (the base LM's weights + a fresh head, seeded; with `cfg.lora_r`, a LoRA adapter on the
    trunk) trained on all labels so far.

    base_model: what the Apprentice started from ('builtin', a folder or a hub name); pass the Apprentice's
    tokenizer as `tokenizer` so both share it. train_comparisons: comparisons, or a `LabelStore` (then its
    'train' split, and its 'valid' split unless valid_comparisons is given). device: e.g. 'cuda' (default: CPU).
    precision: what it trains in ('fp32', 'bf16-mixed', ...: megacoach/hardware.py; default: its weights' dtype).
    dist: several processes train one model together (each passes the same comparisons). Returns (model, metrics)."""
    if hasattr(train_comparisons, "comparisons"):
        store_train, store_valid = labels_from_store(train_comparisons)
        train_comparisons = store_train
        valid_comparisons = store_valid if valid_comparisons is None else valid_comparisons
    cfg = cfg or RewardConfig()
    torch.manual_seed(seed)
    model = RewardModel.for_run(cfg, base_model, tokenizer=tokenizer, dtype=dtype, seed=seed)
    if device is not None:
        model.to(device)
    if precision is not None:
        model.set_precision(precision)
    if dist is not None:
        dist.broadcast_module(model)  # every replica starts from rank 0's weights
    metrics = train_reward_model(model, train_comparisons, valid_comparisons, cfg, model.pad_id,
                                 normalisation_samples, seed, log, dist=dist)
    return model, metrics
