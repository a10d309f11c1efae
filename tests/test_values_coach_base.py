"""reward.model: a Values Coach on another base model than the Apprentice's, with its own tokenizer (another vocabulary
size, another family). It reads the Apprentice's tokens as text — query and truncated response decoded by the
Apprentice's tokenizer, each tokenized again with its own — in its training on the labels, its normalisation, its
scores in an episode, and a PPO step."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from conftest import tiny_corpus_texts
from families import build_family_model

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def coach_base(tmp_path_factory):
    """A tiny Llama-family model with a tokenizer of its own (a 420-token BPE: other ids, other vocabulary size)."""
    from megacoach.lm.pretrain import train_tokenizer

    tok_dir = tmp_path_factory.mktemp("coach_tok")
    train_tokenizer(tiny_corpus_texts(), 420).save_pretrained(tok_dir)
    return build_family_model("llama", tmp_path_factory.mktemp("coach_base"), tok_dir, seed=1)


def _config(run, apprentice, coach, **reward):
    from megacoach.config import load_config

    return load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(apprentice)},
                                                  "reward": {"model": str(coach), **reward},
                                                  "labels": {"num_comparisons": 24, "labeler": "vader"},
                                                  "run": {"out": str(run), "max_iterations": 1}}])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, coach_base):
    """(cfg, Apprentice lm, its tokenizer, store, Values Coach, metrics): labels of the Apprentice, and the Values
    Coach trained on them as the pipeline trains it."""
    from megacoach import pipeline
    from megacoach.continuations import TaskSampler
    from megacoach.labels.labelers import load_labeler
    from megacoach.labels.store import LabelStore
    from megacoach.lm.loading import load_causal_lm
    from megacoach.runs import RunDir
    from megacoach.sampling import HFGenerator

    run = tmp_path_factory.mktemp("coach_run")
    cfg = _config(run, tiny_model_dir, coach_base)
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(tiny_model_dir))
    store = LabelStore(f"sqlite:///{run / 'labels.db'}")
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
    pipeline.collect_labels(cfg, store, sampler, load_labeler("vader"), "r", "r/offline", "initial", QUIET.print)
    coach, metrics = pipeline.values_coach(cfg, RunDir(run), store, tok, "r", QUIET.print)
    return cfg, lm, tok, store, coach, metrics


def _own_score(coach, tok, query_ids, response_ids):
    """The coach's score of one episode, re-tokenized by hand: no padding anywhere."""
    drop = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    q = coach.tokenizer(tok.decode([i for i in query_ids if i not in drop]))["input_ids"]
    text = tok.decode([i for i in response_ids if i not in drop])
    r = coach.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    with torch.no_grad():
        return float(coach(torch.tensor([q + r], dtype=torch.long, device="cpu")))


def test_values_coach_of_another_base_trains_on_the_text(trained, coach_base, tiny_model_dir):
    cfg, _, tok, store, coach, metrics = trained
    assert coach.base_model == str(coach_base) and coach.retokenizer is not None
    assert len(coach.tokenizer) != len(tok) and coach.trunk.config.model_type == "llama"
    assert metrics["steps"] >= 1 and metrics["num_train"] + metrics["num_valid"] == 24
    # normalised on the initial policy's samples, read as text: mean 0, std 1 there
    from megacoach.pipeline import normalisation_samples
    from megacoach.reward.normalize import raw_rewards

    pairs = normalisation_samples(cfg, store, "r", tok.pad_token_id)
    assert isinstance(pairs[0], tuple) and len(pairs) == min(cfg.reward.normalize_samples, 24 * cfg.labels.k)
    scores = coach.gain * raw_rewards(coach, pairs) + coach.bias
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    # a comparison as training reads it equals the coach's score of its text
    from megacoach.reward.data import as_comparisons
    from megacoach.reward.train import batch_rewards

    c = as_comparisons(store.comparisons(split="train"))[0]
    with torch.no_grad():
        rewards, _ = batch_rewards(coach, [c], tok.pad_token_id)
    want = [_own_score(coach, tok, c.query_ids, s) for s in c.sample_ids]
    assert torch.allclose(rewards[0], torch.tensor(want), atol=1e-5)


def test_episode_scores_and_a_ppo_step_with_another_tokenizer(trained):
    from megacoach.pipeline import build_trainer

    cfg, lm, tok, _, coach, _ = trained
    tr = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach)
    batch, metrics = tr.step()
    for i in range(0, batch.query_ids.shape[0], 3):
        q = batch.query_ids[i].tolist()
        r = batch.truncated[i].tolist()
        assert float(batch.raw_scores[i]) == pytest.approx(_own_score(coach, tok, q, r), abs=1e-5)
    assert all(v == v for v in metrics.values())  # finite numbers, no NaN
    assert metrics["iteration"] == 1


def test_saved_coach_of_another_tokenizer_loads_only_when_asked(trained, tmp_path):
    from megacoach.errors import ConfigError
    from megacoach.reward.model import RewardModel

    _, _, tok, _, coach, _ = trained
    path = coach.save_pretrained(tmp_path / "coach")
    with pytest.raises(ConfigError, match="reward.model"):
        RewardModel.from_pretrained(path, policy_tokenizer=tok)
    loaded = RewardModel.from_pretrained(path, policy_tokenizer=tok, read_text=True)
    q = torch.tensor([[tok.pad_token_id, 5, 17, 42]], dtype=torch.long)
    r = torch.tensor([[9, 77, tok.pad_token_id]], dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(loaded.score(q, r, tok.pad_token_id), coach.score(q, r, tok.pad_token_id), atol=1e-6)


def test_same_tokenizer_reads_tokens_straight(tiny_model_dir, tmp_path):
    """reward.model naming a base with the Apprentice's tokenizer: no text round trip, the tokens go straight in."""
    import shutil

    from megacoach.config import RewardConfig
    from megacoach.lm.loading import load_tokenizer
    from megacoach.reward.model import RewardModel

    other = tmp_path / "same_tok"
    shutil.copytree(tiny_model_dir, other)
    coach = RewardModel.for_run(RewardConfig(model=str(other)), str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)))
    assert coach.retokenizer is None and coach.base_model == str(other)


def test_missing_reward_model_is_named(tiny_model_dir, tmp_path):
    from megacoach.errors import ConfigError
    from megacoach.pipeline import train

    cfg = _config(tmp_path / "run", tiny_model_dir, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="^reward.model: no model folder"):
        train(cfg, console=QUIET)
    assert not (tmp_path / "run" / "labels.db").exists()  # refused before anything was labeled


def test_reading_the_text_makes_no_tensor_off_the_models_device(trained):
    """Scoring through the retokenizer, and a PPO step, under the meta default device of test_device."""
    from test_device import explicit_devices

    from megacoach.pipeline import build_trainer

    cfg, lm, tok, _, coach, _ = trained
    tr = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach)
    with explicit_devices() as found:
        batch, _ = tr.step()
    assert not found, "tensors or generators made without a device at:\n" + "\n".join(sorted(found))
