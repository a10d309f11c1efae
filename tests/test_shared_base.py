"""One copy of the base weights: with LoRA on the Apprentice (ppo.lora_r) and on the Values Coach (reward.lora_r) over
the same base, the Apprentice, the original model (all adapters off) and the Values Coach (its own adapter on) share
one frozen base, and compute exactly what separate copies compute."""

from __future__ import annotations

import copy
import json

import pytest
import torch

LORA = {"lora_r": 4, "lora_alpha": 8.0, "rollout_pass": "forward"}


def _nonzero_(module, seed: int, adapter: str = "default") -> None:
    """LoRA B matrices start at zero (the adapter is the identity): make them something, so that a test can tell
    an adapter that computes from one that does not."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for n, q in module.named_parameters():
            if f"lora_B.{adapter}." in n:
                q.copy_(torch.randn(q.shape, generator=g, device="cpu") * 0.1)


def _parts(model_dir, coach_lora: bool):
    from megacoach.config import load_config
    from megacoach.lm.loading import load_causal_lm
    from megacoach.reward.model import RewardModel
    from megacoach.tasks import load_queries

    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(model_dir)}, "ppo": LORA,
                                                 "run": {"max_iterations": 2}}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(model_dir))
    coach = RewardModel.from_base(str(model_dir), tokenizer=tok, seed=0).eval()
    if coach_lora:
        coach.add_lora(4, 8.0)
        _nonzero_(coach, 1)
    return cfg, lm, tok, coach, load_queries(cfg.task, tok, "train", 32, 31)


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """(shared trainer, the Values Coach as a separate copy, a trainer whose Values Coach has no adapter)."""
    from megacoach.pipeline import build_trainer

    cfg, lm, tok, coach, queries = _parts(tiny_model_dir, coach_lora=True)
    with torch.no_grad():  # a pad token added at load gets a random row each time: it never reaches a score
        coach.trunk.get_input_embeddings().weight[tok.pad_token_id] += 1.0
    separate = copy.deepcopy(coach)
    shared = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries)
    _nonzero_(shared.apprentice.lm, 2)
    cfg, lm, tok, plain_coach, queries = _parts(tiny_model_dir, coach_lora=False)
    apart = build_trainer(cfg, lm=lm, tok=tok, values_coach=plain_coach, queries=queries)
    mine = dict(shared.apprentice.named_parameters())
    with torch.no_grad():  # the same Apprentice adapter in both (its random A matrices drew after the coach's here)
        for n, q in apart.apprentice.named_parameters():
            if "lora_" in n:
                q.copy_(mine[n])
    return shared, separate, apart


def _ids(tr, n: int = 6) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(5)
    T = tr.cfg.task.query_length + tr.cfg.task.response_length
    ids = torch.randint(3, 200, (n, T), generator=g, device="cpu")
    ids[:2, :5] = tr.pad_id  # some left padding
    return ids


def test_the_three_roles_hold_one_copy_of_the_base(pair):
    from megacoach.lm.adapters import SharedTrunk

    shared, _, _ = pair
    coach = shared.values_coach
    assert isinstance(coach.trunk, SharedTrunk)
    assert [n for n, _ in coach.named_parameters()] == ["head.weight", "head.bias"]  # no weights of its own
    ptrs = lambda m: {q.data_ptr() for q in m.parameters()}  # noqa: E731
    base = {q.data_ptr() for n, q in shared.apprentice.lm.named_parameters() if "lora_" not in n}
    assert base <= ptrs(shared.ref_lm.model)  # the original model is the same storage


def test_shared_scores_and_log_probs_equal_separate_copies(pair):
    from megacoach.ppo.policy import reference_logprobs

    shared, separate, apart = pair
    ids = _ids(shared)
    with torch.no_grad():
        assert torch.equal(shared.values_coach(ids), separate(ids))
        q, r = ids[:, :24], ids[:, 24:].reshape(3, 2, -1)
        assert torch.equal(shared.values_coach.best_of_k(q[::2], r), separate.best_of_k(q[::2], r))
    t = shared.cfg.task
    a = shared.apprentice(ids, shared.pad_id, t.response_length, t.temperature, responses=ids[:, -t.response_length:])
    b = apart.apprentice(ids, apart.pad_id, t.response_length, t.temperature, responses=ids[:, -t.response_length:])
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.values, b.values)
    args = (shared.pad_id, t.response_length, t.temperature)
    assert torch.equal(reference_logprobs(shared.ref_lm, ids, *args), reference_logprobs(apart.ref_lm, ids, *args))


def test_only_the_apprentice_trains_and_only_its_state_is_saved(pair):
    from megacoach.guards.probe import mutable_state
    from megacoach.lm.adapters import COACH_ADAPTER

    shared, separate, _ = pair
    trained = {n for n, q in shared.apprentice.named_parameters() if q.requires_grad}
    assert trained and not any(COACH_ADAPTER in n for n in trained)
    optimised = {id(q) for group in shared.optimizer.param_groups for q in group["params"]}
    assert optimised == {id(q) for q in shared.apprentice.parameters() if q.requires_grad}
    snap = mutable_state(shared.apprentice)  # what the guards' preflight copies: only what trains (and buffers)
    assert not any(COACH_ADAPTER in k for k in snap) and not any(k.endswith("base_layer.weight") for k in snap)
    assert not any(COACH_ADAPTER in k for k in shared.apprentice_state())
    ids = _ids(shared)
    shared.iteration()
    with torch.no_grad():
        assert torch.equal(shared.values_coach(ids), separate(ids))  # the Values Coach did not move


def test_another_base_is_not_shared(tiny_model_dir, tmp_path):
    """A Values Coach whose base weights differ (another model, or another precision) keeps its own trunk."""
    from megacoach import hardware
    from megacoach.pipeline import build_trainer

    cfg, lm, tok, coach, queries = _parts(tiny_model_dir, coach_lora=True)
    with torch.no_grad():
        next(p for n, p in coach.trunk.named_parameters() if "lora_" not in n).add_(1e-3)
    tr = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries)
    assert type(tr.values_coach.trunk).__name__ != "SharedTrunk"
    cfg, lm, tok, coach, queries = _parts(tiny_model_dir, coach_lora=True)
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"precision": "bf16"})})
    tr = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=queries, hw=hardware.resolve(cfg))
    assert type(tr.values_coach.trunk).__name__ != "SharedTrunk"


@pytest.fixture(scope="module")
def saved_coach(tiny_model_dir, tmp_path_factory):
    """A LoRA Values Coach saved on the Apprentice's base, its adapter and head something other than their start."""
    _, _, _, coach, _ = _parts(tiny_model_dir, coach_lora=True)
    with torch.no_grad():
        coach.head.bias.fill_(0.25)
        coach.set_normalisation(1.5, -0.5)
    return coach.save_pretrained(tmp_path_factory.mktemp("coach") / "values_coach")


def test_a_saved_lora_coach_loads_onto_the_shared_base_without_a_second_copy(tiny_model_dir, saved_coach,
                                                                            monkeypatch):
    from megacoach.lm.adapters import SharedTrunk
    from megacoach.pipeline import build_trainer
    from megacoach.reward import model as reward_model
    from megacoach.reward.model import RewardModel

    separate = RewardModel.from_pretrained(saved_coach).eval()  # on its own copy of the base, as before
    cfg, lm, tok, _, queries = _parts(tiny_model_dir, coach_lora=False)
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"path": str(saved_coach)})})

    def no_base(*args, **kwargs):
        raise AssertionError("a second copy of the base was loaded")

    monkeypatch.setattr(reward_model, "load_causal_lm", no_base)
    shared = build_trainer(cfg, lm=lm, tok=tok, queries=queries)
    coach = shared.values_coach
    assert isinstance(coach.trunk, SharedTrunk)
    assert [n for n, _ in coach.named_parameters()] == ["head.weight", "head.bias"]
    assert coach.lora == separate.lora and coach.normalisation == separate.normalisation
    ids = _ids(shared)
    with torch.no_grad():
        assert torch.equal(coach(ids), separate(ids))
        q, r = ids[:, :24], ids[:, 24:].reshape(3, 2, -1)
        assert torch.equal(coach.best_of_k(q[::2], r), separate.best_of_k(q[::2], r))
    trained = {n for n, q in shared.apprentice.named_parameters() if q.requires_grad}
    assert trained and not any("values_coach" in n for n in trained)


def test_a_saved_coach_of_another_precision_still_loads_on_its_own(tiny_model_dir, saved_coach):
    """Where the base's weights would differ (a bf16 Values Coach over a float32 Apprentice) the coach is loaded as
    before, on its own base."""
    from megacoach import hardware
    from megacoach.pipeline import build_trainer

    cfg, lm, tok, _, queries = _parts(tiny_model_dir, coach_lora=False)
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"path": str(saved_coach),
                                                                         "precision": "bf16"})})
    tr = build_trainer(cfg, lm=lm, tok=tok, queries=queries, hw=hardware.resolve(cfg))
    assert type(tr.values_coach.trunk).__name__ != "SharedTrunk"


def test_a_run_with_lora_on_both_frees_its_coach_and_reads_it_onto_the_shared_base(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """`megacoach train` with LoRA on both: the Values Coach trained in the run is saved and read back onto the
    Apprentice's base for PPO (no second base loaded from its files), with the guards' preflight and checkpoints;
    the resumed run reads it the same way."""
    from megacoach.cli import main
    from megacoach.reward import model as reward_model

    def no_base(*args, **kwargs):
        raise AssertionError("the saved Values Coach was loaded on a second copy of the base")

    monkeypatch.setattr(reward_model, "_adapter_trunk", no_base)
    out = tmp_path / "run"
    args = ["--set", "reward.lora_r=4", "--set", "ppo.lora_r=4", "--set", "ppo.lora_alpha=8.0"]
    assert main(["train", "--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out),
                 "--set", "run.max_iterations=1", *args]) == 0
    assert (out / "values_coach" / "adapter_config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["train", "--resume", str(out), "--set", "run.max_iterations=2", *args]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _with_embeddings(saved, out, row: int):
    """A copy of the saved coach whose adapter file also carries the input embeddings (as PEFT saves them when a pad
    token was added to the vocabulary), row `row` of them changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megacoach.lm.loading import load_causal_lm

    shutil.copytree(saved, out)
    base, _ = load_causal_lm(json.loads((saved / "reward_config.json").read_text())["base_model"])
    trunk = base.base_model
    emb = trunk.get_input_embeddings()
    name = next(n for n, m in trunk.named_modules() if m is emb)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    weight = emb.weight.detach().clone()
    weight[row] += 1.0
    tensors[f"base_model.model.{name}.weight"] = weight
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_an_adapter_file_with_the_embeddings_shares_only_when_they_are_the_apprentices(tiny_model_dir, saved_coach,
                                                                                      tmp_path, monkeypatch):
    """The embeddings an adapter file carries are checked against the Apprentice's: a different pad row (a pad token
    added at each load) shares with exactly the scores of a separate load; any other row keeps the coach apart."""
    from megacoach.pipeline import build_trainer
    from megacoach.reward import model as reward_model
    from megacoach.reward.model import RewardModel

    def run(path):
        cfg, lm, tok, _, queries = _parts(tiny_model_dir, coach_lora=False)
        cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"path": str(path)})})
        return build_trainer(cfg, lm=lm, tok=tok, queries=queries)

    tok = _parts(tiny_model_dir, coach_lora=False)[2]
    pad_row = _with_embeddings(saved_coach, tmp_path / "pad_row", tok.pad_token_id)
    other_row = _with_embeddings(saved_coach, tmp_path / "other_row", tok.pad_token_id - 1)
    apart = run(other_row)
    assert type(apart.values_coach.trunk).__name__ != "SharedTrunk"
    separate = RewardModel.from_pretrained(pad_row).eval()
    with monkeypatch.context() as m:
        m.setattr(reward_model, "_adapter_trunk", lambda *a, **k: pytest.fail("a second base was loaded"))
        shared = run(pad_row)
    assert type(shared.values_coach.trunk).__name__ == "SharedTrunk"
    ids = _ids(shared)
    with torch.no_grad():
        assert torch.equal(shared.values_coach(ids), separate(ids))
