"""On a CUDA GPU (skipped without one): one PPO iteration in bf16-mixed, the preflight's verdicts against the CPU's,
and a checkpoint and a Values Coach saved on the GPU loaded on the CPU. The tiny model of conftest.py and the
guards' tiny rig (guard_helpers.py); nothing here is timed.
"""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

import guard_helpers as H
from megacoach.errors import ConfigError

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")]

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    db, coach = H.prepare_tiny(tmp_path_factory.mktemp("gpu-prep"), tiny_model_dir)
    return tiny_model_dir, db, coach


def _rig(prepared, tmp_path, device: str, precision: str = "auto"):
    """(cfg, trainer, store, labeler) of the guards' tiny rig with every model on `device`."""
    return H.build_rig(prepared, tmp_path, run={"device": device}, model={"precision": precision})


def test_one_ppo_iteration_on_cuda_in_bf16_mixed(prepared, tmp_path):
    from megacoach.guards.core import Guards
    from megacoach.lm.hf import precision_of

    cfg, trainer, store, labeler = _rig(prepared, tmp_path, "cuda", "bf16-mixed")
    assert trainer.device.type == "cuda" and precision_of(trainer.apprentice.lm) == "bf16-mixed"
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in trainer.apprentice.parameters())
    assert next(trainer.values_coach.parameters()).device.type == "cuda"
    assert next(trainer.ref_lm.parameters()).device.type == "cuda"
    guards = Guards(cfg, trainer, store, labeler, log=QUIET.print)
    batch, metrics = trainer.iteration(before_update=guards.before_update)
    for t in (batch.responses, batch.logprobs, batch.ref_logprobs, batch.values, batch.path.advantages):
        assert t.device.type == "cuda"
    for t in (batch.logprobs, batch.ref_logprobs, batch.values, batch.path.advantages, batch.path.returns):
        assert t.dtype == torch.float32
    assert all(v == v for v in metrics.values() if isinstance(v, float))
    store.close()


def test_preflight_verdicts_on_cuda_match_the_cpu(prepared, tmp_path):
    from megacoach.guards.core import Guards

    reports = {}
    for device in ("cpu", "cuda"):
        cfg, trainer, store, labeler = _rig(prepared, tmp_path / device, device, "fp32")
        reports[device] = Guards(cfg, trainer, store, labeler, log=QUIET.print).preflight()
        store.close()
    cpu, gpu = ({c["name"]: c for c in reports[d]["checks"]} for d in ("cpu", "cuda"))
    assert {n: c["passed"] for n, c in cpu.items()} == {n: c["passed"] for n, c in gpu.items()}
    # the label checks rank the same held-out samples with the same models: the same figures up to float rounding
    for name in ("values_coach",):
        assert gpu[name]["figures"]["agreement"] == pytest.approx(cpu[name]["figures"]["agreement"], abs=0.02)
    assert gpu["ppo_loss"]["figures"] == pytest.approx(cpu["ppo_loss"]["figures"])


def test_a_checkpoint_and_a_values_coach_saved_on_cuda_load_on_the_cpu(prepared, tmp_path):
    from megacoach.reward.model import RewardModel
    from megacoach.runs import RunDir

    _, gpu_trainer, store, _ = _rig(prepared, tmp_path / "gpu", "cuda", "fp32")
    gpu_trainer.iteration()
    run = RunDir(tmp_path / "ckpt")
    run.save_checkpoint({"trainer": gpu_trainer.state_dict()}, gpu_trainer.iteration_no)
    store.close()
    _, cpu_trainer, store, _ = _rig(prepared, tmp_path / "cpu", "cpu", "fp32")
    cpu_trainer.load_state_dict(run.latest_checkpoint()["trainer"])
    for (name, a), b in zip(gpu_trainer.apprentice.state_dict().items(), cpu_trainer.apprentice.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a.cpu(), b), name
    assert cpu_trainer.iteration_no == 1
    cpu_trainer.iteration()  # it trains on from there (its own sampling stream: a CUDA stream has another format)
    coach_dir = tmp_path / "coach"
    gpu_trainer.values_coach.save_pretrained(coach_dir)
    coach = RewardModel.from_pretrained(coach_dir, device="cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9]], device="cpu")
    assert coach(ids).device.type == "cpu"
    assert float(coach(ids)) == pytest.approx(float(gpu_trainer.values_coach(ids.cuda())), abs=1e-4)
    store.close()


def test_the_sampler_wants_its_generator_on_the_models_device(prepared):
    from megacoach.lm.loading import load_causal_lm
    from megacoach.sampling import HFGenerator

    lm, tok = load_causal_lm(str(prepared[0]), device="cuda")
    gen = HFGenerator(lm, tok.pad_token_id)
    q = torch.full((2, 4), 5, dtype=torch.long, device="cpu")  # queries may come from the host
    roll = gen.generate(q, 3, 1.0, torch.Generator(device="cuda").manual_seed(0))
    assert roll.responses.device.type == "cuda"
    with pytest.raises(ConfigError, match="generator lives on cpu"):
        gen.generate(q, 3, 1.0, torch.Generator(device="cpu").manual_seed(0))
