"""One PPO iteration and one Values Coach training on the tiny model, run by 1 process or by several.

Used by tests/test_distributed.py: the test starts this file as N processes (gloo, 127.0.0.1), exactly as
`accelerate launch` / `torchrun` start megacoach (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
and runs `run_case` itself in one process to compare.

Samples differ per process (each samples with seed + rank * 100003), so the comparison is made on a fixed
rollout: in the N-process run each process samples its share of the global batch with the real sampler and
records what it returned (`Recording`); the recordings are gathered in rank order, and the single process
replays that concatenation (`Replay`: the same tokens, log-probs and hidden states, for the same global
batch of queries). Everything after sampling — Values Coach scores, reference log-probs, values, the
reward path, whitening, advantages, the PPO updates and the KL controller — is computed independently by
each run, so both must agree up to floating-point rounding.

    python tests/distributed_case.py MODEL_DIR OUT.pt   (with the launcher's environment variables set)
"""

from __future__ import annotations

import random
import sys

import torch

from megacoach.config import RewardConfig, build_config
from megacoach.distributed import Dist
from megacoach.errors import HaltError, MegacoachError
from megacoach.sampling import HFGenerator, Rollout

PPO_SETTINGS = {
    "task": {"query_length": 16, "response_length": 8, "truncate_after": 2, "query_min_tokens": 4},
    # 2 minibatches of 8, 2 micro-batches each (one process: 2 x 4; two processes: 2 x 2 each), 2 epochs;
    # a large learning rate so one iteration moves the weights far beyond the comparison's tolerance
    "ppo": {"batch_size": 16, "mini_batch_size": 8, "gradient_accumulation_steps": 2, "ppo_epochs": 2,
            "learning_rate": 1e-3, "lr_decay": False},
    "kl": {"adaptive": True, "horizon": 100},
    "run": {"seed": 7},
}
REWARD_SETTINGS = {"batch_size": 4, "learning_rate": 1e-3}  # 9 comparisons: batches 4, 4, 1 (one process gets none)


class Recording:
    """The real sampler, keeping what it returned (this process's share of the batch)."""

    def __init__(self, inner):
        self.inner, self.rollouts = inner, []

    def generate(self, queries, response_length, temperature, generator=None, return_hidden=False) -> Rollout:
        roll = self.inner.generate(queries, response_length, temperature, generator, return_hidden)
        self.rollouts.append(roll)
        return roll


class Replay:
    """Returns a recorded rollout (the whole global batch, for the single-process run)."""

    def __init__(self, rollout: Rollout):
        self.rollout = rollout

    def generate(self, queries, response_length, temperature, generator=None, return_hidden=False) -> Rollout:
        r = self.rollout
        assert r.responses.shape == (queries.shape[0], response_length), "replayed rollout does not fit the batch"
        return Rollout(r.responses.clone(), r.logprobs.clone(), r.hidden.clone() if return_hidden else None)


class GuardSaysNo(MegacoachError):
    pass


def guard_halts(batch) -> None:
    raise GuardSaysNo(f"no update on a batch of {len(batch.texts)}")


def comparisons(n: int, seed: int, pad: int, vocab: int = 300, k: int = 4):
    from megacoach.reward import Comparison

    rng = random.Random(seed)
    ids = [t for t in range(2, vocab) if t != pad]
    out = []
    for _ in range(n):
        q = [rng.choice(ids) for _ in range(rng.randint(3, 8))]
        samples = [[rng.choice(ids) for _ in range(rng.randint(2, 6))] for _ in range(k)]
        out.append(Comparison(q, samples, rng.randrange(k)))
    return out


def run_case(model_dir: str, dist: Dist, replay: Rollout | None = None) -> dict:
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer
    from megacoach.reward import RewardModel, retrain_from_scratch
    from megacoach.tasks import load_queries

    torch.manual_seed(dist.seed(0))
    cfg = build_config(PPO_SETTINGS)
    lm, tok = load_causal_lm(model_dir)
    coach = RewardModel.from_base(model_dir, tokenizer=tok, seed=3).eval()
    queries = load_queries(cfg.task, tok, "train", 64, cfg.run.seed + 31)
    gen = Replay(replay) if replay is not None else Recording(HFGenerator(lm, tok.pad_token_id))
    trainer = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries, generator=gen, dist=dist)
    out = {}
    halted = None
    if dist.is_main:  # as in megacoach train: rank 0 runs the loop, the others follow its iterations
        batch, metrics = trainer.iteration()
        out = {"metrics": metrics, "advantages": batch.path.advantages.clone(), "returns": batch.path.returns.clone(),
               "values": batch.values.clone(), "raw_scores": batch.raw_scores.clone()}
        if replay is None:  # a guard on rank 0 halts the second iteration before its update, as loop.py does
            try:
                trainer.iteration(before_update=guard_halts)
            except GuardSaysNo as err:
                trainer.lockstep.release(HaltError(f"halted: {err}"))
                halted = str(err)
        elif trainer.lockstep is not None:  # several processes: release the followers
            trainer.lockstep.release()
    else:
        try:
            trainer.lockstep.follow(trainer)
        except HaltError as err:  # rank 0's halt, raised here too
            halted = str(err)
    out["halted"] = dist.gather_object(halted)
    # the replicas stay identical: every process's parameters, bit for bit
    out["replicas"] = dist.gather_object(
        [float(p.detach().double().sum()) for p in trainer.apprentice.parameters()])
    out.update({"kl_coef_after": trainer.kl_ctl.value, "iteration": trainer.iteration_no,
                "apprentice": {k: v.detach().clone() for k, v in trainer.apprentice.state_dict().items()}})
    if replay is None:  # the global batch's rollout, in rank order: what a single process must replay
        parts = dist.gather_object(gen.rollouts[0])
        out["rollout"] = Rollout(torch.cat([p.responses for p in parts]), torch.cat([p.logprobs for p in parts]),
                                 torch.cat([p.hidden for p in parts]))

    pad = tok.pad_token_id
    norm = torch.tensor([c.query_ids + c.sample_ids[0] + [pad] * (20 - len(c.query_ids) - len(c.sample_ids[0]))
                         for c in comparisons(12, 11, pad)])
    model, rm = retrain_from_scratch(model_dir, comparisons(9, 5, pad), comparisons(5, 6, pad),
                                     RewardConfig(**REWARD_SETTINGS), normalisation_samples=norm, seed=5, log=None,
                                     tokenizer=tok, dist=dist)
    out["coach"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["coach_metrics"] = rm
    return out


def main(model_dir: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist = Dist.from_env()
    try:
        res = run_case(model_dir, dist)
        if dist.is_main:
            res["world_size"] = dist.world_size
            torch.save(res, out_path)
        dist.barrier()
    finally:
        dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
