"""The shape of the house, pinned: small classes, and one PPO iteration through few files.

(The import contract — no cycles, the method below the edges — is `.importlinter`, run by `make test`.
`benchmarks/structure.py` reports the same figures in full, with the guards on and for the whole loop.)"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

import megacoach
from megacoach.config import load_config
from megacoach.lm.loading import load_causal_lm
from megacoach.pipeline import build_trainer
from megacoach.ppo.trainer import PPOTrainer
from megacoach.reward.model import RewardModel
from megacoach.tasks import load_queries

SRC = Path(megacoach.__file__).parent


def _units(kind):
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                yield node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC)}:{node.name}"


def test_no_class_is_over_400_lines():
    too_big = sorted(u for u in _units(ast.ClassDef) if u[0] > 400)
    assert not too_big, too_big


def test_the_trainers_iteration_fits_on_one_screen():
    src = ast.parse((SRC / "ppo" / "trainer.py").read_text())
    step = next(n for n in ast.walk(src) if isinstance(n, ast.FunctionDef) and n.name == "step")
    assert step.end_lineno - step.lineno + 1 <= 30


def test_one_ppo_iteration_passes_through_at_most_ten_files(tiny_model_dir):
    cfg = load_config(preset="tiny", overrides=[{"model": {"name_or_path": str(tiny_model_dir)}}])
    torch.manual_seed(0)
    lm, tok = load_causal_lm(str(tiny_model_dir))
    coach = RewardModel.from_base(str(tiny_model_dir), tokenizer=tok, seed=0).eval()
    trainer = build_trainer(cfg, lm=lm, tok=tok, values_coach=coach, queries=load_queries(cfg.task, tok, "train", 32, 31))
    trainer.iteration()  # the first builds caches
    files: set[str] = set()
    root = str(SRC)

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            files.add(frame.f_code.co_filename[len(root) + 1:])

    sys.setprofile(prof)
    try:
        trainer.iteration()
    finally:
        sys.setprofile(None)
    assert isinstance(trainer, PPOTrainer)
    assert "ppo/episodes.py" in files and "distributed.py" not in files  # one process never calls the collectives
    assert len(files) <= 10, sorted(files)
