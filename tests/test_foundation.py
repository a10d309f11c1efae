"""Foundation: padding invariance, truncation and validity, queries, config errors."""

from __future__ import annotations

import json

import pytest
import torch

from megacoach.config import TaskConfig, load_config, parse_override
from megacoach.errors import ConfigError, DataError
from megacoach.lm.corpus import HELDOUT_PLAYS, parse_play, split_plays
from megacoach.lm.loading import load_causal_lm, load_tokenizer
from megacoach.lm.hf import left_pad, lm_inputs, position_ids_from_mask
from megacoach.sampling import HFGenerator
from megacoach.ppo.episodes import stop_token_ids, truncate_responses
from megacoach.tasks import load_queries


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padding_never_changes_logits(tiny):
    model, tok = tiny
    ids = tok("Now is the winter of our discontent")["input_ids"]
    alone = model(input_ids=torch.tensor([ids])).logits[0]
    for pad in (1, 7):
        padded = left_pad([ids], tok.pad_token_id, len(ids) + pad)
        logits = model(**lm_inputs(padded, tok.pad_token_id)).logits[0, pad:]
        assert torch.allclose(logits, alone, atol=1e-5), pad
    # and in a batch with a longer neighbour
    other = tok("Made glorious summer by this sun of York, and all the clouds")["input_ids"]
    batch = left_pad([ids, other], tok.pad_token_id)
    logits = model(**lm_inputs(batch, tok.pad_token_id)).logits[0, batch.shape[1] - len(ids):]
    assert torch.allclose(logits, alone, atol=1e-5)


def test_dedicated_pad_token(tiny):
    _, tok = tiny
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_sampling_is_fixed_length_and_never_samples_pad(tiny):
    model, tok = tiny
    q = left_pad([tok("To be or not")["input_ids"]] * 6, tok.pad_token_id, 8)
    # make the pad token overwhelmingly likely: it must still never be sampled
    with torch.no_grad():
        model.lm_head.weight[tok.pad_token_id] = model.transformer.wte.weight[tok.pad_token_id] * 0 + 50.0
    try:
        roll = HFGenerator(model, tok.pad_token_id).generate(q, 12, 0.7, torch.Generator().manual_seed(0))
    finally:
        pass
    assert roll.responses.shape == (6, 12)
    assert (roll.responses != tok.pad_token_id).all()
    assert torch.isfinite(roll.logprobs).all() and (roll.logprobs <= 0).all()


def test_sample_categorical_matches_the_distribution_and_skips_zero_probability():
    from megacoach.sampling import sample_categorical

    logits = torch.tensor([[2.0, 0.5, float("-inf"), -1.0, 1.0, float("-inf")]])
    logp = torch.log_softmax(logits, dim=-1)
    n = 200_000
    draws = sample_categorical(logp.expand(n, -1), torch.Generator().manual_seed(3))[:, 0]
    freq = torch.bincount(draws, minlength=6).double() / n
    p = logp.exp()[0].double()
    assert freq[2] == 0 and freq[5] == 0  # probability 0: never drawn (the pad token's case)
    # every share within 4 standard errors of its probability
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)
    # seeded: the same generator state gives the same tokens
    a = sample_categorical(logp.expand(50, -1), torch.Generator().manual_seed(7))
    b = sample_categorical(logp.expand(50, -1), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_truncation_keeps_stop_token_and_pads_after():
    pad, stop = 0, torch.tensor([9])
    r = torch.tensor([[5, 9, 6, 9, 7, 8],    # stop at 1 (too early) and at 3: cut after 3
                      [5, 6, 7, 8, 6, 5],    # no stop: invalid, kept whole
                      [9, 5, 5, 5, 5, 9]])   # stop only at the last position: valid
    out, valid = truncate_responses(r, stop, truncate_after=2, pad_id=pad)
    assert valid.tolist() == [True, False, True]
    assert out.tolist() == [[5, 9, 6, 9, 0, 0], [5, 6, 7, 8, 6, 5], [9, 5, 5, 5, 5, 9]]


def test_truncate_after_counts_positions_from_zero():
    out, valid = truncate_responses(torch.tensor([[9, 1, 1]]), torch.tensor([9]), truncate_after=0, pad_id=0)
    assert valid.tolist() == [True] and out.tolist() == [[9, 0, 0]]
    out, valid = truncate_responses(torch.tensor([[9, 1, 1]]), torch.tensor([9]), truncate_after=1, pad_id=0)
    assert valid.tolist() == [False]


def test_no_truncate_token_means_all_valid(tiny):
    _, tok = tiny
    stop = stop_token_ids(tok, None)
    out, valid = truncate_responses(torch.tensor([[3, 4]]), stop, 0, tok.pad_token_id)
    assert valid.all() and out.tolist() == [[3, 4]]


def test_stop_ids_contain_the_truncate_text(tiny):
    _, tok = tiny
    ids = stop_token_ids(tok, ".")
    assert len(ids) > 0 and all("." in tok.decode([i]) for i in ids.tolist())
    with pytest.raises(ConfigError, match="truncate_token"):
        stop_token_ids(tok, "\u2603")


def test_corpus_drops_markup_and_holds_out_plays():
    md = "# Play\n\n## ACT I\n\n_Enter KING and\nQUEEN_\n\n**KING**  \nGood \\[morrow\\], _Aside_ wife.  \nHow now?\n\n_Exit_\n"
    assert parse_play(md) == ["Good [morrow], wife.\nHow now?"]
    train, held = split_plays()
    assert {p.name for p in held} == set(HELDOUT_PLAYS)
    assert not {p.name for p in train} & set(HELDOUT_PLAYS)
    text = train[0].text
    assert "**" not in text and "#" not in text


def test_builtin_queries_start_and_end_at_sentences(tiny):
    _, tok = tiny
    qs = load_queries(TaskConfig(query_length=48, query_min_tokens=8), tok, "train", 5, seed=3)
    assert len(qs) == 5
    for q in qs:
        assert q.text[0].isupper() or not q.text[0].isalpha()
        assert q.text.rstrip()[-1] in ".!?"
        assert 8 <= len(q.token_ids) <= 48
    again = load_queries(TaskConfig(query_length=48, query_min_tokens=8), tok, "train", 5, seed=3)
    assert [q.text for q in again] == [q.text for q in qs]


def test_queries_from_files(tmp_path, tiny):
    _, tok = tiny
    txt = tmp_path / "q.txt"
    txt.write_text("First query here.\nSecond one.\n\nThird.\n")
    qs = load_queries(TaskConfig(query_source=str(txt)), tok, "train", 2, 0)
    assert len(qs) == 2
    jl = tmp_path / "q.jsonl"
    jl.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"nope": 1}) + "\n")
    with pytest.raises(DataError, match="q.jsonl:2"):
        load_queries(TaskConfig(query_source=str(jl)), tok, "train", 1, 0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no queries"):
        load_queries(TaskConfig(query_source=str(empty)), tok, "train", 1, 0)
    with pytest.raises(ConfigError, match="no such file"):
        load_queries(TaskConfig(query_source=str(tmp_path / "missing.txt")), tok, "train", 1, 0)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo\.foo: unknown field"):
        load_config(overrides=[parse_override("ppo.foo=1")])
    with pytest.raises(ConfigError, match=r"task\.temperature"):
        load_config(overrides=[parse_override("task.temperature=hot")])
    with pytest.raises(ConfigError, match="multiple of ppo.mini_batch_size"):
        load_config(overrides=[{"ppo": {"batch_size": 10, "mini_batch_size": 4}}])
    with pytest.raises(ConfigError, match="kl.target must be > 0"):
        load_config(overrides=[{"kl": {"target": 0}}])
    bad = tmp_path / "c.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(bad)
    toml = tmp_path / "c.toml"
    toml.write_text("[ppo]\nlearning_rate = 2e-5\n")
    assert load_config(toml).ppo.learning_rate == 2e-5
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="nope")


def test_model_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="no model folder"):
        load_causal_lm(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer"):
        load_tokenizer(str(broken))
