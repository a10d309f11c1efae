"""The guards on a LoRA Apprentice (ppo.lora_r): the preflight passes on a healthy LoRA run, still names the
component of a flipped KL sign and of a flipped score sign, restores the trainer without copying the frozen base,
and a guarded LoRA run trains to its end.

The Coherence Coach check moves copies of the Apprentice away from the original model with noise on what trains
(with LoRA: the adapter). The frozen base — its final norm and LM head included — bounds how far an adapter can
take the model: on the random tiny model of conftest, whose next-token distributions are nearly uniform, a rank-4
adapter reaches about 0.2 nats whatever the noise, and the check refuses (saying so). These tests use the same
tiny GPT-2 with its token embeddings scaled by 5, whose distributions are peaked like a trained model's (on the
built-in model a rank-4 adapter on c_attn moves it 11 nats at noise 1x the weights' RMS)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

import guard_helpers as H
from conftest import build_tiny_model
from megacoach.guards import bugs as B
from megacoach.guards.alarms import GuardFailure

QUIET = Console(quiet=True)
LORA = {"lora_r": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("peaked_model"), embedding_scale=5.0)


@pytest.fixture(scope="module")
def lora_prepared(tmp_path_factory, peaked_model_dir):
    db, coach = H.prepare_tiny(tmp_path_factory.mktemp("lora_guards"), peaked_model_dir)
    return peaked_model_dir, db, coach


@pytest.fixture(scope="module")
def lora_rig(lora_prepared, tmp_path_factory):
    return H.build_rig(lora_prepared, tmp_path_factory.mktemp("lora_rig"), ppo=LORA)


def _guards(rig):
    from megacoach.guards.core import Guards

    cfg, trainer, store, labeler = rig
    return Guards(cfg, trainer, store, labeler, log=QUIET.print)


def test_lora_preflight_passes_and_restores_the_trainer(lora_rig):
    from megacoach.guards import probe as P
    from megacoach.lm.adapters import has_adapter

    cfg, trainer, _, _ = lora_rig
    assert has_adapter(trainer.apprentice.lm)
    before = {k: v.clone() for k, v in trainer.apprentice.state_dict().items()}
    report = _guards(lora_rig).preflight()
    assert report["passed"], report
    coach = next(c for c in report["checks"] if c["name"] == "coherence_coach")
    assert coach["figures"]["levels"][2]["exact_kl"] > 2.0  # the adapter moved it well away
    after = trainer.apprentice.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.iteration_no == 0
    # what a probe's scratch copies: the adapter, the value head and buffers, never the frozen base
    snap = P.mutable_state(trainer.apprentice)
    trained = {n for n, q in trainer.apprentice.named_parameters() if q.requires_grad}
    assert trained <= set(snap) and not any("base_layer" in k for k in snap)


@pytest.mark.parametrize("bug, component", [("kl-sign", "Coherence Coach"), ("score-sign", "Megacoach reward"),
                                            ("incident", "Megacoach reward")])
def test_lora_preflight_catches_flipped_signs(lora_rig, bug, component):
    with B.inject(bug), pytest.raises(GuardFailure) as err:
        _guards(lora_rig).preflight()
    assert component in err.value.component, str(err.value)


def test_lora_on_a_near_uniform_model_is_refused_saying_why(tiny_model_dir):
    """The random tiny model: no adapter can move it far, and the Coherence Coach check says that it is the
    adapter's reach (not a sign) that it cannot check."""
    from megacoach.config import load_config
    from megacoach.guards.preflight import check_coherence_coach
    from megacoach.lm.loading import load_causal_lm
    from megacoach.pipeline import build_trainer
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(tiny_model_dir)}, "ppo": LORA}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(tiny_model_dir))
    coach = RewardModel.from_base(str(tiny_model_dir), tokenizer=tok, seed=0).eval()
    queries = load_queries(cfg.task, tok, "train", 32, 31)
    tr = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries)
    check = check_coherence_coach(tr, queries[:16], 0.01, 3, True)
    assert not check.passed
    assert "could not move" in check.message and "LoRA adapter" in check.message


@pytest.mark.slow
def test_guarded_lora_run_trains_and_its_checkpoint_loads(lora_prepared, tmp_path):
    from megacoach.incident import _latest_policy
    from megacoach.lm.adapters import has_adapter
    from megacoach.pipeline import train

    md, db, coach = lora_prepared
    run = H.new_run(tmp_path, db)
    cfg = H.tiny_config(run, md, coach, ppo=LORA)
    summary = train(cfg, console=QUIET)
    assert summary["iterations"] == 2
    assert (run / "apprentice" / "adapter_config.json").is_file()
    lm, _ = _latest_policy(run, cfg)  # the incident's evaluation of a LoRA run: the base with the checkpoint's adapter
    assert has_adapter(lm)
    assert any(float(q.detach().abs().sum()) > 0 for n, q in lm.named_parameters() if "lora_B" in n)
