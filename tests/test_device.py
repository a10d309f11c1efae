"""Devices: every tensor is made where the models are.

The models sit on the CPU while `torch.set_default_device("meta")` is active: a tensor made without an explicit
device (`torch.zeros(n)`, `torch.tensor(list)`, `torch.randn(..., generator=cpu_generator)`, a module built
without `device=`) is then a meta tensor, and the first operation that mixes it with the models' CPU tensors, or
reads it (`.item()`, `.tolist()`, `.numpy()`), fails at once. One PPO iteration with the guards' batch check and
live monitors, the guards' preflight and a Values Coach training step run that way: on a GPU the same lines would
silently compute on the CPU, or fail far from the line that made the tensor.

`torch.set_default_device` does not reach `torch.Generator()` (it stays on the CPU, tested below): generators are
made with an explicit device anyway. A whole guarded run, its end (`PPOLoop.finish`) included, is checked for
sampling generators that `seeds.generator` made on the CPU by default, and its checkpoint, made to look like a GPU
run's (CUDA generator states), resumes here with the guards on.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import guard_helpers as H
import megacoach
from megacoach import hardware, seeds
from megacoach.config import RewardConfig, load_config
from megacoach.errors import ConfigError

QUIET = Console(quiet=True)


@contextmanager
def default_device(device: str):
    before = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(before)


SRC = Path(megacoach.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
FACTORIES = _device_constructors()


def _caller() -> str | None:
    """'file:line' of the megacoach line that called into torch here (None: torch's or a library's own call)."""
    frame = sys._getframe(2)
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH):
        frame = frame.f_back
    if frame is None:
        return None
    path = Path(frame.f_code.co_filename).resolve()
    return f"{path.relative_to(SRC.parent)}:{frame.f_lineno}" if path.is_relative_to(SRC) else None


class _ExplicitDevices(TorchFunctionMode):
    """Records every tensor factory that a megacoach line calls without `device=` (and makes it on the CPU, so that
    one run finds them all); the library's own calls go on to the default device."""

    def __init__(self, found: set):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            where = _caller()
            if where is not None:
                self.found.add(where)
                kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextmanager
def explicit_devices():
    """`torch.set_default_device("meta")` plus a record of the megacoach lines that make a tensor or a random
    generator without saying where: yields the set of 'file:line' found."""
    found: set[str] = set()
    real = torch.Generator

    class Generator(real):  # torch.Generator() ignores the default device: catch it by its caller
        def __new__(cls, device=None):
            if device is None and (where := _caller()) is not None:
                found.add(where)
            return super().__new__(cls, device if device is not None else "cpu")

    with default_device("meta"):
        torch.Generator = Generator
        try:
            with _ExplicitDevices(found):
                yield found
        finally:
            torch.Generator = real


@pytest.fixture(scope="module")
def rig(tiny_model_dir, tmp_path_factory):
    """What the guards' tiny rig is made of (models on the CPU, the label store, the labeler): the trainer and the
    guards are built from it inside the test."""
    from megacoach.labels.labelers import load_labeler
    from megacoach.labels.store import LabelStore
    from megacoach.lm.loading import load_causal_lm
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    db, coach_dir = H.prepare_tiny(tmp_path_factory.mktemp("device-prep"), tiny_model_dir)
    run = H.new_run(tmp_path_factory.mktemp("device"), db)
    cfg = H.tiny_config(run, tiny_model_dir, coach_dir)
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(tiny_model_dir))
    coach = RewardModel.from_pretrained(coach_dir, policy_tokenizer=tok)
    store = LabelStore(f"sqlite:///{run / 'labels.db'}")
    yield cfg, lm, tok, coach, load_queries(cfg.task, tok, "train", 64, 31), store, load_labeler(cfg.labels.labeler)
    store.close()


def test_the_default_device_does_not_reach_generators():
    with default_device("meta"):
        assert torch.Generator().device == torch.device("cpu")
        assert torch.zeros(1).device == torch.device("meta")  # ... but every factory without device= is caught
        assert seeds.generator(1, seeds.Stream.PPO_QUERIES).device == torch.device("cpu")
    assert torch.zeros(1).device == torch.device("cpu")


def test_no_tensor_is_made_off_the_models_device(rig):
    """Preflight, one PPO iteration (batch check before the update, monitors after it) and a Values Coach training
    step, with every tensor made without a device landing on 'meta'."""
    from megacoach.guards.canaries import load_canaries
    from megacoach.guards.core import Guards
    from megacoach.pipeline import build_trainer
    from megacoach.reward.data import as_comparisons
    from megacoach.reward.model import RewardModel
    from megacoach.reward.train import evaluate, train_reward_model

    cfg, lm, tok, coach, queries, store, labeler = rig
    trunk = copy.deepcopy(coach.trunk)
    comps = as_comparisons(store.comparisons(split="train"))[:8]
    norm = [c.query_ids + c.sample_ids[0] for c in comps]
    with explicit_devices() as found:
        trainer = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries)
        guards = Guards(cfg, trainer, store, labeler, log=QUIET.print)
        report = guards.preflight()
        assert report["passed"]
        batch, metrics = trainer.iteration(before_update=guards.before_update)
        gm, alarms = guards.after_iteration(batch, metrics, [0.0] * len(batch.queries))
        long_task = cfg.task.model_copy(update={"response_length": 64, "truncate_after": 0})
        assert load_canaries("builtin", tok, long_task)  # the guards' canaries through the truncation rule
        fresh = RewardModel(trunk, tok.pad_token_id, tokenizer=tok, seed=3)  # a fresh head, seeded
        m = train_reward_model(fresh, comps, comps[:4], RewardConfig(batch_size=4, epochs=1), log=None,
                               normalisation_samples=norm)
        ev = evaluate(fresh, comps[:4])
    assert not found, "tensors or generators made without a device at:\n" + "\n".join(sorted(found))
    assert batch.responses.device.type == "cpu" and batch.path.advantages.device.type == "cpu"
    assert metrics["objective/kl"] == metrics["objective/kl"] and "guard/score_gap" in gm
    assert m["steps"] == 2 and ev["n"] == 4
    assert torch.get_default_device() == torch.device("cpu") and torch.Generator().device.type == "cpu"


# ------------------------------------------------------------------------------------------ resolving devices
def test_devices_resolve_and_refuse_what_is_not_there(monkeypatch):
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        hardware.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        hardware.resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="run.device"):
        load_config(overrides=[{"run": {"device": "tpu"}}])


def test_cpu_defaults_are_fp32_and_say_so(tiny_model_dir):
    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(tiny_model_dir)}}])
    hw = hardware.resolve(cfg)
    assert (hw.device, hw.apprentice, hw.reference, hw.values_coach, hw.tf32) == (torch.device("cpu"), "fp32",
                                                                                   "fp32", "fp32", False)
    assert "Apprentice fp32" in hw.line() and hw.describe()["value_head"] == "fp32"


# ------------------------------------------------------------------------------------------ a whole run
CUDA_STATE_BYTES = 16  # a CUDA generator's state (seed and offset); a CPU one's is 5,056 bytes


@contextmanager
def sampling_generators_named():
    """Records the megacoach lines whose random generator reaches a sampler (`HFGenerator.generate`) although it was
    made by `seeds.generator` without `device=`: its CPU default, which a model on a GPU refuses. Yields the set."""
    from megacoach.sampling import HFGenerator

    found: set[str] = set()
    defaulted: dict[int, str] = {}
    keep: list = []  # the recorded generators stay alive, so their ids stay theirs
    real_generator, real_generate = seeds.generator, HFGenerator.generate

    def generator(base, stream, offset=0, device=None):
        if device is None:
            g = real_generator(base, stream, offset)
            defaulted[id(g)] = _caller() or "?"
            keep.append(g)
            return g
        return real_generator(base, stream, offset, device=device)

    def generate(self, queries, response_length, temperature, generator=None, *args, **kwargs):
        if generator is not None and id(generator) in defaulted:
            found.add(defaulted[id(generator)])
        return real_generate(self, queries, response_length, temperature, generator, *args, **kwargs)

    seeds.generator, HFGenerator.generate = generator, generate
    try:
        yield found
    finally:
        seeds.generator, HFGenerator.generate = real_generator, real_generate


def _as_if_saved_on_cuda(state: dict) -> dict:
    """A CPU run's checkpoint with its device-side random streams as a CUDA run saves them (16-byte states)."""
    cuda = torch.arange(CUDA_STATE_BYTES, dtype=torch.uint8, device="cpu")
    state["trainer"]["rng"].update({"gen_sample": cuda.clone(), "gen_sample_device": "cuda"})
    state["guards"].update({"gen": cuda.clone(), "gen_device": "cuda"})
    return state


def test_a_whole_guarded_run_ends_and_resumes_from_another_kind_of_device(tiny_model_dir, tmp_path):
    """`megacoach train` with the guards, to its end (`PPOLoop.finish`: before/after samples, summary, report, the
    Apprentice saved) with every sampling generator made on the models' device; then its checkpoint, made to look
    like a GPU run's (16-byte CUDA generator states), resumed here for one more iteration with the guards on."""
    from megacoach.pipeline import train
    from megacoach.runs import RunDir

    db, coach_dir = H.prepare_tiny(tmp_path / "prep", tiny_model_dir)
    run = H.new_run(tmp_path / "run", db)
    cfg = H.tiny_config(run, tiny_model_dir, coach_dir, run={"out": str(run), "max_iterations": 1})
    with sampling_generators_named() as found:
        summary = train(cfg, console=QUIET)
    assert not found, "sampling generators made on the CPU by default at:\n" + "\n".join(sorted(found))
    assert summary["iterations"] == 1
    for name in ("before_after.jsonl", "summary.json", "report.html", "apprentice/config.json"):
        assert (run / name).is_file(), name

    rundir = RunDir(run)
    rundir.save_checkpoint(_as_if_saved_on_cuda(rundir.latest_checkpoint()), 1)
    more = H.tiny_config(run, tiny_model_dir, coach_dir, run={"out": str(run), "max_iterations": 2})
    assert train(more, resume=True, console=QUIET)["iterations"] == 2
    assert not (run / "HALTED.json").exists()
    resumed = rundir.latest_checkpoint()  # the streams of this run's own kind, said so
    assert resumed["guards"]["gen"].numel() == torch.Generator(device="cpu").get_state().numel()
    assert resumed["guards"]["gen_device"] == "cpu" and resumed["trainer"]["rng"]["gen_sample_device"] == "cpu"


def test_a_generator_state_of_another_kind_of_device_leaves_the_stream_alone():
    cpu = seeds.generator(1, seeds.Stream.GUARD_SAMPLING, device="cpu")
    before = cpu.get_state()
    cuda_state = torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8, device="cpu")
    assert not seeds.restore(cpu, cuda_state, "cuda") and torch.equal(cpu.get_state(), before)
    assert not seeds.restore(cpu, cuda_state)  # an older checkpoint that does not say: told by the state's size
    assert torch.equal(cpu.get_state(), before)
    other = seeds.generator(2, seeds.Stream.GUARD_SAMPLING, device="cpu").get_state()
    assert seeds.restore(cpu, other, "cpu") and torch.equal(cpu.get_state(), other)

    class CudaLike:  # a CUDA generator as restore sees it: its device and its 16-byte state
        device = torch.device("cuda", 0)

        def __init__(self):
            self.state = torch.ones(CUDA_STATE_BYTES, dtype=torch.uint8, device="cpu")

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.state = state

    g = CudaLike()
    assert not seeds.restore(g, other, "cpu") and not seeds.restore(g, other)
    assert seeds.restore(g, cuda_state, "cuda") and torch.equal(g.state, cuda_state)


def test_guards_and_lockstep_restore_only_a_stream_of_their_own_kind(rig):
    from megacoach.distributed import Dist, Lockstep
    from megacoach.guards.core import Guards
    from megacoach.pipeline import build_trainer

    cfg, lm, tok, coach, queries, store, labeler = rig
    trainer = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries)
    guards = Guards(cfg, trainer, store, labeler, log=QUIET.print)
    state = guards.state_dict()
    own = guards.gen.get_state()
    guards.load_state_dict({**state, "gen": torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8), "gen_device": "cuda"})
    assert torch.equal(guards.gen.get_state(), own)
    legacy = {k: v for k, v in state.items() if k != "gen_device"}  # saved before states said their device
    guards.load_state_dict({**legacy, "gen": torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8)})
    assert torch.equal(guards.gen.get_state(), own)

    lock = Lockstep(Dist.single(), coach)
    sample = trainer.gens["sample"]
    mine = sample.get_state()
    lock.load_state_dict(trainer, {"sample_rng_ranks": [torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8)],
                                   "sample_rng_device": "cuda"}, mine)
    assert torch.equal(sample.get_state(), mine) and lock.state_dict() == {}
    saved = seeds.generator(9, seeds.Stream.PPO_QUERIES, device="cpu").get_state()
    lock.load_state_dict(trainer, {"sample_rng_ranks": [saved], "sample_rng_device": "cpu"}, mine)
    assert torch.equal(sample.get_state(), saved) and lock.state_dict()["sample_rng_device"] == "cpu"


def test_generators_and_models_compare_by_device_type_and_index():
    from megacoach.lm.hf import same_device

    assert same_device("cuda", "cuda:0") and same_device(torch.device("cuda", 0), "cuda")
    assert not same_device("cuda:1", "cuda:0") and not same_device("cpu", "cuda:0")
    assert same_device("cpu", torch.device("cpu", 0))


def test_the_sampler_takes_a_generator_that_names_its_device_with_an_index(tiny_model_dir):
    """torch matches `cpu` with `cpu:0` (and `cuda` with `cuda:0`): so does the sampler's check."""
    from megacoach.lm.loading import load_causal_lm
    from megacoach.sampling import HFGenerator

    class Indexed(torch.Generator):  # a generator that reports its device with an index, as torch.device('cpu', 0)
        @property
        def device(self):
            return torch.device("cpu", 0)

    lm, tok = load_causal_lm(str(tiny_model_dir))
    gen = HFGenerator(lm, tok.pad_token_id)
    q = torch.full((2, 4), 5, dtype=torch.long, device="cpu")
    a = gen.generate(q, 3, 1.0, Indexed(device="cpu").manual_seed(0))
    b = gen.generate(q, 3, 1.0, torch.Generator(device="cpu").manual_seed(0))
    assert torch.equal(a.responses, b.responses)
