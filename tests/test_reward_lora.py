"""The Values Coach through a LoRA adapter (reward.lora_r): only the adapter and the scalar head change in
training, the base weights stay the base model's, a saved coach holds the adapter and loads to the same scores,
and a whole `megacoach train` runs with it."""

from __future__ import annotations

import json

import pytest
import torch

from megacoach.config import RewardConfig
from megacoach.reward import RewardModel, retrain_from_scratch

from test_reward_train import synthetic

LORA = {"lora_r": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    cfg = RewardConfig(learning_rate=3e-3, batch_size=12, **LORA)
    norm = torch.randint(2, 300, (32, 10), generator=torch.Generator().manual_seed(5))
    return retrain_from_scratch(str(tiny_model_dir), synthetic(96, seed=1), synthetic(48, seed=2), cfg,
                                normalisation_samples=norm, seed=0, log=None)


def test_only_the_adapter_and_the_head_change(trained, tiny_model_dir):
    model, metrics = trained
    fresh = RewardModel.from_base(str(tiny_model_dir), seed=0)  # the same base and head init, untrained
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    base = dict(fresh.trunk.named_parameters())
    for name, q in model.trunk.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(q, base[plain]), name  # the frozen base is the base model's, exactly
    assert any("lora_B" in n and float(q.detach().abs().sum()) > 0 for n, q in model.named_parameters())
    assert not torch.equal(model.head.weight, fresh.head.weight)
    assert metrics["steps"] == 8 and metrics["valid_accuracy"] is not None


def test_saved_lora_coach_is_the_adapter_and_loads_to_the_same_scores(trained, tiny_model_dir, tmp_path):
    model, _ = trained
    path = model.save_pretrained(tmp_path / "coach")
    assert (path / "adapter_config.json").is_file() and not (path / "model.safetensors").is_file()
    meta = json.loads((path / "reward_config.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["base_model"] == str(tiny_model_dir)
    loaded = RewardModel.from_pretrained(path, policy_tokenizer=model.tokenizer)
    ids = torch.randint(2, 300, (6, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model(ids), atol=1e-6)
    assert loaded.lora == model.lora


def test_lora_coach_of_a_missing_base_is_a_clear_error(trained, tmp_path):
    from megacoach.errors import DataError

    model, _ = trained
    path = model.save_pretrained(tmp_path / "coach")
    meta = json.loads((path / "reward_config.json").read_text())
    meta["base_model"] = str(tmp_path / "gone")
    (path / "reward_config.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="LoRA adapter on the base model"):
        RewardModel.from_pretrained(path)


def test_train_with_a_lora_values_coach(tiny_model_dir, tmp_path):
    from megacoach.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out), "--no-guards",
                 "--set", "reward.lora_r=4", "--set", "run.max_iterations=1"]) == 0
    assert (out / "values_coach" / "adapter_config.json").is_file()
    assert json.loads((out / "values_coach" / "reward_config.json").read_text())["lora"]["r"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
