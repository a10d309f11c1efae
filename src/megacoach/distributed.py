"""Data parallelism across processes: what one process of `accelerate launch` (or torchrun) needs to know.

megacoach runs data-parallel with a full replica of every model in each process. `accelerate launch` (or
`torchrun`, or the tests with plain subprocesses) starts N processes and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `Dist.from_env()` joins them into one `torch.distributed` group
(gloo for CPU tensors, NCCL for CUDA tensors where CUDA is present). Without those variables (a plain
`megacoach train`) it is `Dist.single()`: world size 1, and every method below is a no-op or an identity,
so single-process runs are exactly what they were.

How the training code uses it (the maths stays in pure functions; only the edges talk to other processes):
- seeds: process r samples with `seed + r * 100003` (as the paper's reference code);
- PPO: each process samples its contiguous share of the global batch of queries; the rollout tensors are
  gathered so the reward path (whitening, KL, advantages, the KL controller's batch KL) runs on the GLOBAL
  batch, identically everywhere; each global minibatch is split across the processes and the gradients
  are averaged, which is exactly the single-process gradient of that minibatch;
- the Values Coach: each batch of comparisons is split across the processes, gradients summed with the
  right weights, normalisation statistics computed over all processes' samples;
- only rank 0 (`is_main`) writes files and talks to the label store; the others get what they need by
  `broadcast_object` and follow rank 0's decisions (`run_on_main`). In the PPO loop rank 0 leads
  (`Lockstep`, below): its `trainer.iteration()` tells the others (waiting in `trainer.lockstep.follow(trainer)`)
  to run the same iteration, with any Values Coach or state it loaded; `trainer.lockstep.release()` ends their
  loop (with rank 0's halt).
- sections: rank 0's solitary work (guards, store, reports) runs inside `dist.local()`, where this object
  acts as one process, so nothing called there can wait for the others; `trainer.iteration()` (through
  `Lockstep.lead`) opens a `dist.collective()` section inside it again.
- one process: `PPOTrainer.ddp` is False and the trainer calls none of this (as nanoGPT's `if ddp:` lines).

Sharded engines (FSDP, DeepSpeed ZeRO) are not wired in: under an accelerate config that selects them,
`Dist.from_env()` raises a ConfigError at start (docs/scaling-out.md).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from megacoach import seeds
from megacoach.errors import ConfigError, MegacoachError

T = TypeVar("T")

RANK_SEED_STRIDE = 100003  # the reference code's per-process seed offset


class RemoteError(MegacoachError):
    """An exception raised on rank 0 that could not be sent as itself to the other processes."""


class Dist:
    """World size, rank and the few collectives megacoach uses. `Dist.single()`: one process, no-ops."""

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0, group=None,
                 local_world_size: int | None = None, control=None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"distributed: rank {rank} is outside a world of {world_size} process(es)")
        self._world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.group = group  # the data collectives (gather, gradients): a hang there fails after `timeout_s`
        self.control = control if control is not None else group  # rank 0's messages: the others may wait long
        self._modes: list[bool] = []  # stack of local() / collective() sections (innermost last)
        self.local_world_size = local_world_size or world_size  # processes on this machine

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def single(cls) -> "Dist":
        return cls(1, 0, 0)

    @classmethod
    def from_env(cls, timeout_s: float = 1800.0, wait_s: float | None = None) -> "Dist":
        """Join the process group described by the launcher's environment, or a single process if there is none.

        timeout_s: how long a data collective may wait (a hang fails instead of blocking forever). wait_s: how
        long the other processes wait for rank 0's next message while it works alone — collecting labels from
        people can take hours (default 7 days; MEGACOACH_DIST_WAIT_S)."""
        env = os.environ
        if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            raise ConfigError("accelerate config selects FSDP: megacoach trains data-parallel with full replicas "
                              "(DDP semantics) and does not shard with FSDP yet; launch with "
                              "configs/accelerate/multi_gpu.yaml (or multi_node.yaml) instead")
        if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
            raise ConfigError("accelerate config selects DeepSpeed: megacoach trains data-parallel with full "
                              "replicas (DDP semantics) and does not shard with ZeRO yet; launch with "
                              "configs/accelerate/multi_gpu.yaml (or multi_node.yaml) instead")
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls.single()
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ConfigError(f"distributed: WORLD_SIZE={world} but {', '.join(missing)} not set; start the "
                              "processes with `accelerate launch` or `torchrun`")
        import torch.distributed as td

        if not td.is_initialized():
            backend = "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
                backend = "cpu:gloo,cuda:nccl"  # CPU tensors over gloo, CUDA tensors over NCCL
            td.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        local_world = int(env.get("LOCAL_WORLD_SIZE", "0") or 0) or None
        wait_s = float(env.get("MEGACOACH_DIST_WAIT_S", 7 * 86400)) if wait_s is None else wait_s
        control = td.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))
        return cls(td.get_world_size(), td.get_rank(), local_rank, td.group.WORLD, local_world, control)

    def close(self) -> None:
        if self._world_size > 1:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()

    # ------------------------------------------------------------------------------------ who am I
    @property
    def world_size(self) -> int:
        """The number of processes working together here: 1 inside a `local()` section."""
        return 1 if self._modes and not self._modes[-1] else self._world_size

    @property
    def processes(self) -> int:
        """The number of processes launched (whatever the section)."""
        return self._world_size

    @contextlib.contextmanager
    def local(self):
        """Work that one process does alone (rank 0's guards, store, reports): inside, this object acts as
        a single process (no collectives, no sharding), so code called there cannot wait for the others."""
        self._modes.append(False)
        try:
            yield self
        finally:
            self._modes.pop()

    @contextlib.contextmanager
    def collective(self):
        """Work that all processes do together (a PPO iteration), also when called from a `local()` section."""
        self._modes.append(True)
        try:
            yield self
        finally:
            self._modes.pop()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """The accelerator this process owns (cuda:LOCAL_RANK where CUDA is present), else the CPU: where
        `run.device=auto` puts this process's replica of every model (megacoach/hardware.py)."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @staticmethod
    def launcher_notes() -> list[str]:
        """Settings of the accelerate config that megacoach does not apply (to be said once at start)."""
        notes = []
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if mp not in ("", "no"):
            notes.append(f"accelerate's mixed_precision={mp} is not applied by megacoach: set model.precision "
                         "(e.g. --set model.precision=bf16-mixed; auto picks bf16-mixed on a GPU with bfloat16)")
        dyn = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO")
        if dyn.upper() not in ("", "NO"):
            notes.append(f"accelerate's dynamo_backend={dyn} is not applied by megacoach")
        return notes

    def threads(self, wanted: int) -> int:
        """torch threads for this process: `wanted`, capped so that the processes on one machine do not share
        CPU cores (oversubscribed cores made a 2-process CPU run ~40x slower here)."""
        if self._world_size == 1:
            return wanted
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(wanted, cores // self.local_world_size))

    def seed(self, base: int) -> int:
        """This process's seed: `base + rank * 100003` (rank 0 keeps `base`)."""
        return int(base) + self.rank * RANK_SEED_STRIDE

    def __repr__(self) -> str:
        return f"Dist(rank {self.rank} of {self._world_size})"

    # ------------------------------------------------------------------------------------ splitting work
    def check_divides(self, n: int, field: str, what: str = "") -> None:
        """ConfigError unless the world size divides n (named by its config field)."""
        if n % self.world_size:
            raise ConfigError(f"{field} ({n}) must be a multiple of the number of processes ({self.world_size})"
                              f"{what}; change {field} or launch a process count that divides it")

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this process's contiguous share of n items (the first n % world get one more)."""
        world = self.world_size
        rank = self.rank if world > 1 else 0
        base, extra = divmod(n, world)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def shard(self, items: Sequence[T] | torch.Tensor) -> Sequence[T] | torch.Tensor:
        """This process's contiguous share of a sequence or of a tensor's first dimension (identity for 1)."""
        if self.world_size == 1:
            return items
        start, stop = self.bounds(len(items))
        return items[start:stop]

    # ------------------------------------------------------------------------------------ collectives
    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor concatenated over the processes along dim 0 in rank order (all shards the same shape)."""
        if self.world_size == 1:
            return tensors
        import torch.distributed as td

        out = []
        for t in tensors:
            src = t.detach().contiguous()
            as_bool = src.dtype == torch.bool
            if as_bool:
                src = src.to(torch.uint8)
            parts = [torch.empty_like(src) for _ in range(self.world_size)]
            td.all_gather(parts, src, group=self.group)
            whole = torch.cat(parts, dim=0)
            out.append(whole.bool() if as_bool else whole)
        return tuple(out)

    def gather_object(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order, on every process."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td

        out: list = [None] * self.world_size
        td.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: T = None, src: int = 0) -> T:
        """Rank `src`'s `obj` on every process (others pass anything, e.g. None)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as td

        box = [obj if self.rank == src else None]
        td.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the processes (float64 on the wire for exact-enough sums of statistics)."""
        if self.world_size == 1:
            return values
        import torch.distributed as td

        t = values.detach().to(torch.float64).clone()
        td.all_reduce(t, op=td.ReduceOp.SUM, group=self.group)
        return t.to(values.dtype)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each float metric averaged over the processes (every process must pass the same keys)."""
        if self.world_size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        if self.gather_object(keys) != [keys] * self.world_size:
            raise RuntimeError("distributed: processes reported different metric names")
        vals = self.all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                         device="cpu")) / self.world_size
        return {k: float(v) for k, v in zip(keys, vals.tolist())}

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter], op: str = "mean") -> None:
        """All-reduce the gradients of `params` in place: 'mean' (each process's loss is a mean over its equal
        share) or 'sum' (each process already weighted its loss by its share). A parameter without a gradient
        on this process (e.g. one with no comparisons to process) counts as a zero gradient there; one without
        a gradient on every process keeps none (so the optimiser skips it, as in a single process)."""
        if self.world_size == 1:
            return
        import torch.distributed as td

        params = [p for p in params if p.requires_grad]
        has = self.all_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device="cpu"))
        grads = []
        for p, n in zip(params, has.tolist()):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        # one flat buffer per dtype/device: few large messages instead of one per parameter
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            buckets.setdefault((g.dtype, g.device), []).append(g)
        for group in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            td.all_reduce(flat, op=td.ReduceOp.SUM, group=self.group)
            if op == "mean":
                flat /= self.world_size
            offset = 0
            for g in group:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy rank `src`'s parameters and buffers into every process's module (replicas start identical)."""
        if self.world_size == 1:
            return
        import torch.distributed as td

        for t in list(module.parameters()) + list(module.buffers()):
            td.broadcast(t.data, src=src, group=self.group)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier(group=self.group)

    # ------------------------------------------------------------------------------------ rank 0 decides
    def run_on_main(self, fn: Callable[..., T] | None, *args, **kwargs) -> T:
        """Run `fn` on rank 0 only and hand its result to every process; an exception raised there is raised
        on every process (as itself where it can be pickled, else as RemoteError with its message).
        `fn` may be None on the other ranks (it is only called on rank 0); it runs in a `local()` section."""
        if self.world_size == 1:
            return fn(*args, **kwargs) if fn is not None else None
        outcome: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                with self.local():
                    outcome = ("ok", fn(*args, **kwargs) if fn is not None else None)
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
                outcome = ("error", portable(err))
        outcome = self.broadcast_object(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            err = outcome[1]
            err.from_rank0 = True  # the other processes know that rank 0 raised it too
            raise err
        return outcome[1]


def portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling, else a RemoteError carrying its type and message."""
    try:
        back = pickle.loads(pickle.dumps(err))
        if type(back) is type(err) and str(back) == str(err):
            return back
    except Exception:  # noqa: BLE001
        pass
    return RemoteError(f"{type(err).__name__} on rank 0: {err}")


def check_world(cfg, dist: Dist) -> None:
    """ConfigError at start (before anything is written) when the process count cannot split the batches."""
    if dist.world_size == 1:
        return
    p = cfg.ppo
    dist.check_divides(p.batch_size, "ppo.batch_size", " (each process samples an equal share of the batch)")
    step = p.gradient_accumulation_steps * dist.world_size
    if p.mini_batch_size % step:
        raise ConfigError(f"ppo.mini_batch_size ({p.mini_batch_size}) must be a multiple of "
                          f"ppo.gradient_accumulation_steps x processes ({p.gradient_accumulation_steps} x "
                          f"{dist.world_size} = {step}): each process takes an equal share of every minibatch; "
                          "change ppo.mini_batch_size or ppo.gradient_accumulation_steps, or the process count")


class Lockstep:
    """Several processes, one PPO run: rank 0 leads every iteration and the other processes follow it.

    Rank 0's loop calls `trainer.iteration()`, which comes here (`lead`): rank 0 first tells the others what they
    need (a Values Coach it swapped in, a state it loaded on resume, the shared random streams), then every
    process runs `trainer.step()` together. The others wait in `follow(trainer)` until rank 0 calls `release()`
    (with its halt, if it halted). The trainer is read duck-typed: `step`, `gens`, `values_coach`,
    `iteration_no`, `episodes`, `state_dict`, `load_state_dict`."""

    def __init__(self, dist: Dist, values_coach):
        self.dist = dist
        self._coach_shared = values_coach  # the Values Coach the other processes hold
        self._resync = False  # rank 0 loaded a state the others must receive with the next iteration
        self._sample_rngs = None  # every rank's sampling RNG state, for checkpoints
        self._sample_device = None  # the kind of device those states are of ('cpu', 'cuda')

    def lead(self, trainer, before_update):
        with self.dist.collective():
            if self.dist.distributed and self.dist.is_main:
                self.dist.broadcast_object(self._lead_message(trainer))
            return self._step(trainer, before_update)

    def _step(self, trainer, before_update):
        out = trainer.step(before_update)
        if self.dist.distributed:  # kept for checkpoints, so a resumed run samples as an uninterrupted one
            self._sample_rngs = self.dist.gather_object(trainer.gens["sample"].get_state())
            self._sample_device = torch.device(trainer.gens["sample"].device).type
        return out

    def _lead_message(self, trainer) -> dict:
        """What the other processes need before an iteration: a Values Coach rank 0 swapped in, a state it loaded."""
        msg = {"op": "iterate", "coach": None, "state": None,
               # what every process must share, whatever rank 0 did alone in between (a probe, a preflight)
               "shared": {"queries": trainer.gens["queries"].get_state(),
                          "minibatch": trainer.gens["minibatch"].get_state(),
                          "iteration": trainer.iteration_no, "episodes": trainer.episodes}}
        if trainer.values_coach is not self._coach_shared:
            msg["coach"] = self._coach_shared = trainer.values_coach
        if self._resync:
            msg["state"], self._resync = trainer.state_dict(), False
        return msg

    def follow(self, trainer) -> None:
        """Processes other than rank 0: run every iteration that rank 0 runs (with its Values Coach and any state
        it loaded) until rank 0 releases them; a halt of rank 0 is raised here too."""
        while True:
            with self.dist.collective():
                msg = self.dist.broadcast_object(None)
                if msg["op"] == "stop":
                    if msg["error"] is not None:
                        raise msg["error"]
                    return
                if msg["coach"] is not None:  # unpickled where rank 0 held it: onto this process's device
                    trainer.values_coach = self._coach_shared = msg["coach"].to(trainer.device)
                if msg["state"] is not None:
                    trainer.load_state_dict(msg["state"])
                shared = msg["shared"]
                trainer.gens["queries"].set_state(shared["queries"])
                trainer.gens["minibatch"].set_state(shared["minibatch"])
                trainer.iteration_no, trainer.episodes = shared["iteration"], shared["episodes"]
                try:
                    self._step(trainer, None)
                except Exception as err:  # noqa: BLE001
                    # decided on the global batch (non-finite values) or by rank 0 (a guard): rank 0 met it too
                    # and says what comes next; anything else is this process's own failure
                    if not (isinstance(err, FloatingPointError) or getattr(err, "from_rank0", False)):
                        raise

    def release(self, error: BaseException | None = None) -> None:
        """Rank 0, when its loop ends: the other processes leave `follow` (raising `error`, e.g. a halt)."""
        if not self.dist.is_main:
            return
        msg = {"op": "stop", "error": portable(error) if error is not None else None}
        with self.dist.collective():
            if error is None:
                self.dist.broadcast_object(msg)
                return
            # after an error the others normally wait for this message; if rank 0 failed alone in the middle
            # of an iteration they wait elsewhere: give up after a while, and the launcher ends them
            sender = threading.Thread(target=self.dist.broadcast_object, args=(msg,), daemon=True)
            sender.start()
            sender.join(timeout=120)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {} if self._sample_rngs is None else {"sample_rng_ranks": self._sample_rngs,
                                                     "sample_rng_device": self._sample_device}

    def load_state_dict(self, trainer, state: dict, own_sampling) -> None:
        """After the trainer restored `state`: each rank's own sampling stream, and the others told on rank 0."""
        ranks = state.get("sample_rng_ranks")
        gen = trainer.gens["sample"]
        if (ranks is not None and len(ranks) == self.dist.processes
                and seeds.restore(gen, ranks[self.dist.rank], state.get("sample_rng_device"))):
            self._sample_rngs, self._sample_device = ranks, torch.device(gen.device).type
        elif not self.dist.is_main:  # nothing for this rank (another process count, or device kind): its own stream
            gen.set_state(own_sampling)
        self._resync = self.dist.is_main  # the others receive this state with the next iteration
