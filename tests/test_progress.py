"""Progress of the long stages (megacoach/progress.py): plain lines when output is piped, with rate and ETA, at most
one every `every_s` seconds and always the last; sampling with progress gives the same continuations."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from megacoach.progress import StageProgress, clock, plain_line


def test_plain_line_has_the_rate_and_time_left():
    assert plain_line("Values Coach: training", 50, 200, 10.0, "comparisons", "loss 1.0") == \
        "Values Coach: training 50/200 comparisons  5 comparisons/s  ETA 0:30  loss 1.0"
    assert plain_line("PPO", 2, 10, 100.0, "iterations") == "PPO 2/10 iterations  50 s/iteration  ETA 6:40"
    assert plain_line("PPO", 0, 10, 0.0, "iterations") == "PPO 0/10 iterations"
    assert plain_line("PPO", 6, 10, 40.0, "iterations", start_done=4) == "PPO 6/10 iterations  20 s/iteration  ETA 1:20"
    assert clock(3725) == "1:02:05" and clock(float("inf")) == "?"


def test_piped_output_gets_throttled_plain_lines_and_always_the_last():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with StageProgress("sampling", 5, console=console, unit="continuations", every_s=3600.0) as p:
        for _ in range(5):
            p.advance(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sampling 5/5 continuations")
    out.truncate(0)
    out.seek(0)
    with StageProgress("PPO", 3, console=console, unit="iterations", every_s=0.0) as p:
        for i in range(3):
            p.advance(1, f"score {i}")
    assert [x.split("  ")[0] for x in out.getvalue().splitlines()] == ["PPO 1/3 iterations", "PPO 2/3 iterations",
                                                                       "PPO 3/3 iterations"]


def test_without_a_console_lines_go_to_log():
    said = []
    p = StageProgress("guards: preflight", 2, log=said.append, unit="checks", every_s=0.0)
    p.advance(1, "ppo_loss passed")
    p.advance(1, "values_coach passed")
    assert len(said) == 2 and said[1].startswith("guards: preflight 2/2 checks") and said[1].endswith("values_coach passed")


def test_sampling_with_progress_gives_the_same_continuations(tiny_model_dir):
    from megacoach.config import TaskConfig
    from megacoach.continuations import TaskSampler
    from megacoach.lm.loading import load_causal_lm
    from megacoach.sampling import HFGenerator
    from megacoach.tasks import load_queries

    lm, tok = load_causal_lm(str(tiny_model_dir))
    task = TaskConfig(query_length=24, response_length=8, truncate_after=2, query_min_tokens=4)
    sampler = TaskSampler(HFGenerator(lm, tok.pad_token_id), tok, task)
    queries = load_queries(task, tok, "train", 10, 0)
    plain = sampler.continuations(queries, 4, torch.Generator().manual_seed(3), batch_size=8)
    said = []
    with StageProgress("sampling", 40, log=said.append, unit="continuations", every_s=0.0) as p:
        shown = sampler.continuations(queries, 4, torch.Generator().manual_seed(3), batch_size=8, progress=p)
    assert [[c.sampled_ids for c in g] for g in shown] == [[c.sampled_ids for c in g] for g in plain]
    assert [x.split("  ")[0] for x in said] == [f"sampling {n}/40 continuations" for n in (8, 16, 24, 32, 40)]
