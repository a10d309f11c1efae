"""The Values Coach's model: head init, reward read at the last real token, padding invariance,
normalised output, and Hugging Face-style save/load with the tokenizer check."""

import json
import math

import pytest
import torch

from megacoach.errors import ConfigError, DataError
from megacoach.lm.loading import load_tokenizer
from megacoach.reward.model import CONFIG_FILE, HEAD_FILE, RewardModel, last_real_index
from megacoach.reward.normalize import normalise


@pytest.fixture(scope="module")
def rm(tiny_model_dir):
    return RewardModel.from_base(str(tiny_model_dir), seed=3)


def test_head_init_and_buffers(rm):
    d = rm.d_model
    assert d == 32
    gen = torch.Generator().manual_seed(3)
    expected = torch.randn((1, d), generator=gen) / math.sqrt(d + 1)
    assert torch.allclose(rm.head.weight.detach(), expected, atol=1e-7)
    assert torch.all(rm.head.bias == 0)
    assert rm.gain.item() == 1.0 and rm.bias.item() == 0.0
    names = {n for n, _ in rm.named_parameters()}
    assert "gain" not in names and "bias" not in names  # buffers: never trained
    assert {"gain", "bias"} <= {n for n, _ in rm.named_buffers()}
    assert not any(n.startswith("lm_head") for n in names)


def test_head_init_std_statistically(tiny_model_dir):
    # over many seeds, the weights' std is 1/sqrt(d+1)
    m = RewardModel.from_base(str(tiny_model_dir))
    ws = []
    for s in range(200):
        m.reset_head(s)
        ws.append(m.head.weight.detach().flatten().clone())
    assert torch.cat(ws).std().item() == pytest.approx(1 / math.sqrt(33), rel=0.03)


def test_no_dropout(rm):
    for mod in rm.modules():
        if isinstance(mod, torch.nn.Dropout):
            assert mod.p == 0.0


def test_last_real_index():
    p = 0
    ids = torch.tensor([[p, p, 5, 6, p], [1, 2, 3, 4, 5], [p, p, p, p, p], [p, 7, p, p, p]])
    assert last_real_index(ids, p).tolist() == [3, 4, 0, 1]


def test_padding_does_not_change_reward(rm):
    pad = rm.pad_id
    q, r = [40, 41, 42, 43, 44], [50, 51, 52]
    variants = [
        q + r,
        [pad] * 3 + q + r,                      # left padding (query)
        q + r + [pad] * 3,                      # right padding (after truncation)
        [pad] * 3 + q + r + [pad] * 3,          # both
    ]
    width = max(len(v) for v in variants)
    batch = torch.full((len(variants), width), pad)
    for i, v in enumerate(variants):
        batch[i, :len(v)] = torch.tensor(v)  # trailing pads to the width
    with torch.no_grad():
        together = rm.raw(batch)
        alone = torch.stack([rm.raw(torch.tensor([v]))[0] for v in variants])
    assert torch.allclose(together, together[0].expand(4), atol=1e-5)
    assert torch.allclose(alone, together, atol=1e-5)


def test_reward_read_at_last_real_token(rm):
    pad = rm.pad_id
    seq = [40, 41, 42, 43, 44, 50, 51]
    with torch.no_grad():
        hidden = rm.trunk(input_ids=torch.tensor([seq])).last_hidden_state[0]
        per_position = rm.head(hidden).squeeze(-1)  # the head at every position
        got = rm.raw(torch.tensor([[pad, pad] + seq + [pad, pad]]))[0]
    assert got.item() == pytest.approx(per_position[-1].item(), abs=1e-5)
    assert got.item() != pytest.approx(per_position[-2].item(), abs=1e-5)
    # a real token appended changes the reward: the reward follows the last real token
    with torch.no_grad():
        longer = rm.raw(torch.tensor([seq + [60]]))[0]
    assert longer.item() != pytest.approx(got.item(), abs=1e-6)


def test_normalised_output_and_score(rm):
    ids = torch.tensor([[rm.pad_id, 40, 41, 42, 50], [43, 44, 45, 46, 51]])
    with torch.no_grad():
        raw = rm.raw(ids)
        rm.set_normalisation(2.0, -0.5)
        try:
            assert torch.allclose(rm(ids), 2.0 * raw - 0.5, atol=1e-6)
            queries, responses = ids[:, :3], ids[:, 3:]
            assert torch.allclose(rm.score(queries, responses), rm(ids), atol=1e-6)
        finally:
            rm.set_normalisation(1.0, 0.0)


def test_normalise_gives_mean0_std1(tiny_model_dir):
    m = RewardModel.from_base(str(tiny_model_dir), seed=0)
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(2, 300, (40, 12), generator=gen)
    stats = normalise(m, seqs)
    with torch.no_grad():
        out = m(seqs)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert out.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert stats["gain"] == pytest.approx(m.gain.item()) and stats["n"] == 40


def test_save_load_round_trip(rm, tiny_model_dir, tmp_path):
    ids = torch.tensor([[rm.pad_id, 40, 41, 42, 50, rm.pad_id], [43, 44, 45, 46, 51, 52]])
    rm.set_normalisation(1.7, 0.25)
    try:
        with torch.no_grad():
            before = rm(ids)
        out = rm.save_pretrained(tmp_path / "vc")
    finally:
        rm.set_normalisation(1.0, 0.0)
    for f in ("config.json", "model.safetensors", "tokenizer.json", HEAD_FILE, CONFIG_FILE):
        assert (out / f).is_file(), f
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["d_model"] == 32 and meta["base_model"] == str(tiny_model_dir)
    assert meta["gain"] == pytest.approx(1.7) and meta["bias"] == pytest.approx(0.25)
    assert meta["pad_token_id"] == rm.pad_id

    policy_tok = load_tokenizer(str(tiny_model_dir))
    loaded = RewardModel.from_pretrained(out, policy_tokenizer=policy_tok)
    with torch.no_grad():
        after = loaded(ids)
    assert torch.allclose(before, after, atol=1e-6)
    assert loaded.gain.item() == pytest.approx(1.7) and loaded.bias.item() == pytest.approx(0.25)
    assert loaded.pad_id == rm.pad_id and loaded.base_model == str(tiny_model_dir)


def test_load_rejects_other_tokenizer(rm, tiny_model_dir, tmp_path):
    out = rm.save_pretrained(tmp_path / "vc")
    other = load_tokenizer(str(tiny_model_dir))
    other.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    with pytest.raises(ConfigError, match="the Values Coach's tokenizer differs from the Apprentice's"):
        RewardModel.from_pretrained(out, policy_tokenizer=other)


def test_load_bad_folder(tmp_path):
    with pytest.raises(DataError, match="not a saved Values Coach"):
        RewardModel.from_pretrained(tmp_path)


def test_shared_query_equals_full_sequences(rm):
    """best_of_k computes each query once for its K responses: same rewards and gradients as the full pass."""
    import random

    from megacoach.reward.data import Comparison, comparison_batch, comparison_tensors

    rng = random.Random(0)
    comps = [Comparison([rng.randrange(2, 300) for _ in range(rng.randint(3, 9))],
                        [[rng.randrange(2, 300) for _ in range(rng.randint(1, 6))] for _ in range(4)], 0)
             for _ in range(5)]
    comps.append(Comparison([5, 6, 7], [[8], [], [9, 10], [11]], 0))  # an empty response: read at the query's end
    ids, _ = comparison_batch(comps, rm.pad_id)
    queries, responses, _ = comparison_tensors(comps, rm.pad_id)
    assert responses.shape[:2] == (6, 4)
    w = rm.trunk.h[0].attn.c_attn.weight
    full = rm.raw(ids).view(6, 4)
    shared = rm.raw_best_of_k(queries, responses)
    assert torch.allclose(full, shared, atol=1e-5)
    g_full = torch.autograd.grad(full.sum(), w)[0]
    g_shared = torch.autograd.grad(rm.raw_best_of_k(queries, responses).sum(), w)[0]
    assert torch.allclose(g_full, g_shared, atol=1e-4)
    with torch.no_grad():
        rm.set_normalisation(2.0, 1.0)
        try:
            assert torch.allclose(rm.best_of_k(queries, responses), 2.0 * shared.detach() + 1.0, atol=1e-5)
        finally:
            rm.set_normalisation(1.0, 0.0)
