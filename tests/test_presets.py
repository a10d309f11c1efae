"""The presets for the real pretrained model (smollm2-sentiment, smollm2-instruct), the prompts and guidelines they
ship with, and `builtin:NAME` query sources."""

from __future__ import annotations

from importlib import resources

import pytest

from megacoach.config import PRESETS, load_config
from megacoach.errors import ConfigError
from megacoach.tasks import load_queries, shipped_prompts_path


@pytest.mark.parametrize("name", ["smollm2-sentiment", "smollm2-instruct"])
def test_the_smollm2_presets_validate_and_name_the_real_model(name):
    cfg = load_config(preset=name)
    assert cfg.model.name_or_path == "smollm2-135m-instruct" and cfg.guards.enabled
    assert cfg.labels.labeler == "vader"
    guideline = resources.files("megacoach") / "guidelines" / {"smollm2-sentiment": "sentiment.md",
                                                               "smollm2-instruct": "warm-replies.md"}[name]
    assert f"guideline version `{cfg.labels.guideline_version}`" in guideline.read_text("utf-8")


def test_the_instruct_preset_stops_at_eos_with_lora_on_both_models():
    cfg = load_config(preset="smollm2-instruct")
    assert cfg.task.chat_template and cfg.task.stop_at_eos and cfg.task.truncate_token is None
    assert cfg.ppo.lora_r > 0 and cfg.reward.lora_r > 0
    assert cfg.task.query_source == "builtin:instructions"


def test_the_sentiment_preset_is_the_papers_task():
    t = load_config(preset="smollm2-sentiment").task
    assert (t.chat_template, t.query_length, t.response_length, t.temperature, t.truncate_token, t.truncate_after) == \
        (False, 64, 24, 0.7, ".", 16)
    assert PRESETS["smollm2-sentiment"]["ppo"].get("lora_r", 0) == 0  # every weight trains, as in the paper


def test_shipped_instructions_are_a_few_hundred_distinct_short_lines(tiny_model_dir):
    from megacoach.config import TaskConfig
    from megacoach.lm.loading import load_tokenizer

    lines = shipped_prompts_path("instructions").read_text("utf-8").splitlines()
    assert len(lines) >= 300 and len(set(lines)) == len(lines) and max(len(x) for x in lines) <= 80
    tok = load_tokenizer(str(tiny_model_dir))
    task = TaskConfig(query_source="builtin:instructions")
    train = {q.text for q in load_queries(task, tok, "train", 50, 0)}
    held_out = {q.text for q in load_queries(task, tok, "eval", 20, 0)}
    assert train <= set(lines) and held_out <= set(lines) and not train & held_out


def test_unknown_shipped_prompts_are_one_line_errors(tiny_model_dir):
    from megacoach.config import TaskConfig
    from megacoach.lm.loading import load_tokenizer

    with pytest.raises(ConfigError, match=r"task.query_source: unknown prompts 'builtin:nope' \(shipped: builtin:instructions\)"):
        load_queries(TaskConfig(query_source="builtin:nope"), load_tokenizer(str(tiny_model_dir)), "train", 2, 0)
