"""Data parallelism: 2 CPU processes (gloo on 127.0.0.1) give what one process gives for the same global batch.

The 2 processes are started like `accelerate launch` / `torchrun` start megacoach (environment variables
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and run tests/distributed_case.py: one PPO iteration
(sampling, reward path on the gathered batch, 2 epochs x 2 minibatches x 2 micro-batches, KL controller) and
one Values Coach training (normalisation, 3 batches of which the last leaves one process nothing, held-out
evaluation). The single-process run replays the 2 processes' concatenated samples (see distributed_case.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from megacoach.distributed import Dist, check_world
from megacoach.errors import ConfigError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import distributed_case  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], timeout: float = 120) -> None:
    """Start `world` processes of tests/distributed_case.py as a launcher would; fail with their output."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        logs.append(tempfile.TemporaryFile("w+"))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "distributed_case.py"), *args], env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = []
    for p, log in zip(procs, logs):
        p.wait()
        log.seek(0)
        outs.append(log.read())
        log.close()
    bad = [(r, p.returncode, o) for r, (p, o) in enumerate(zip(procs, outs)) if p.returncode]
    assert not bad, "\n".join(f"rank {r} exit {c}:\n{o[-3000:]}" for r, c, o in bad)


@pytest.fixture(scope="module")
def two_and_one(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "two.pt"
    launch(2, [str(tiny_model_dir), str(out)])
    two = torch.load(out, weights_only=False)
    torch.manual_seed(0)
    one = distributed_case.run_case(str(tiny_model_dir), Dist.single(), replay=two["rollout"])
    return two, one


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 2e-5, rtol: float = 1e-4) -> bool:
    return torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)


def test_ppo_iteration_matches_one_process(two_and_one, tiny_model_dir):
    two, one = two_and_one
    assert two["world_size"] == 2
    # the reward path ran on the same global batch
    for k in ("raw_scores", "values", "advantages", "returns"):
        assert close(two[k], one[k]), k
    # the update: same parameters after 2 epochs x 2 minibatches, and they moved far beyond the tolerance
    from megacoach.lm.loading import load_causal_lm

    start = load_causal_lm(str(tiny_model_dir))[0].state_dict()
    moved = max(float((one["apprentice"]["lm." + k] - v).abs().max()) for k, v in start.items()
                if "lm." + k in one["apprentice"])
    assert moved > 1e-3
    for k, v in one["apprentice"].items():
        assert close(two["apprentice"][k], v), k
    assert two["kl_coef_after"] == pytest.approx(one["kl_coef_after"], rel=1e-6)
    # rank 0's guard halted a second iteration before its update: every process got the halt, nothing changed
    assert two["halted"] == ["no update on a batch of 16", "halted: no update on a batch of 16"]
    assert two["iteration"] == one["iteration"] == 1
    assert two["replicas"][0] == two["replicas"][1]
    m2, m1 = two["metrics"], one["metrics"]
    for k, v in m1.items():
        if k.startswith("time/"):
            continue
        assert m2[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_values_coach_training_matches_one_process(two_and_one):
    two, one = two_and_one
    for k, v in one["coach"].items():
        assert close(two["coach"][k], v), k
    n2, n1 = two["coach_metrics"]["normalisation"], one["coach_metrics"]["normalisation"]
    for when in ("before", "after"):
        for k in ("mean", "std", "gain", "bias"):
            assert n2[when][k] == pytest.approx(n1[when][k], rel=1e-4, abs=1e-5), (when, k)
        assert n2[when]["n"] == n1[when]["n"] == 12
    for k in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "steps", "num_train"):
        assert two["coach_metrics"][k] == pytest.approx(one["coach_metrics"][k], rel=1e-4, abs=1e-5), k


def test_process_count_must_divide_the_batches():
    from megacoach.config import build_config

    cfg = build_config({"ppo": {"batch_size": 16, "mini_batch_size": 8, "gradient_accumulation_steps": 2}})
    check_world(cfg, Dist(2, 0))  # 16 / 2, 8 / (2 x 2): fine
    with pytest.raises(ConfigError, match=r"ppo\.batch_size \(16\).*processes \(3\)"):
        check_world(cfg, Dist(3, 0))
    with pytest.raises(ConfigError, match=r"ppo\.mini_batch_size \(8\).*2 x 4 = 8|ppo\.mini_batch_size"):
        check_world(build_config({"ppo": {"batch_size": 16, "mini_batch_size": 4, "gradient_accumulation_steps": 2}}),
                    Dist(4, 1))


def test_single_process_is_a_no_op():
    d = Dist.single()
    t = torch.arange(6.0)
    assert d.world_size == 1 and d.is_main and d.seed(5) == 5
    assert d.shard(t) is t and d.gather(t)[0] is t
    assert d.mean_metrics({"a": 1.5}) == {"a": 1.5}
    assert d.run_on_main(lambda x: x + 1, 1) == 2
    assert Dist(4, 3).seed(5) == 5 + 3 * 100003
    assert [Dist(3, r).bounds(8) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]


def test_process_count_checked_before_anything_is_written(tmp_path):
    from megacoach.config import build_config
    from megacoach.pipeline import train

    out = tmp_path / "run"
    cfg = build_config({"ppo": {"batch_size": 8, "mini_batch_size": 4}, "run": {"out": str(out)}})
    with pytest.raises(ConfigError, match=r"ppo\.batch_size \(8\).*processes \(3\)"):
        train(cfg, dist=Dist(3, 0))  # what `accelerate launch --num_processes 3` would give rank 0
    assert not out.exists()


def accelerate_train(args: list[str], timeout: float = 300) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 -m megacoach.cli_entry train ...` (on a machine without
    GPUs: 2 CPU processes over gloo)."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "megacoach.cli_entry", "train", *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_accelerate_launch_train_and_exact_resume(tmp_path, tiny_model_dir):
    """The whole `megacoach train` on 2 processes; then, resumed from its first checkpoint on 2 processes again,
    the second iteration comes out the same (model state, optimiser, every rank's sampling RNG restored)."""
    import json
    import shutil

    run = tmp_path / "run"
    common = ["--preset", "tiny", "--model", str(tiny_model_dir), "--set", "run.eval_queries=2",
              "--set", "labels.num_comparisons=8", "--no-guards"]
    accelerate_train([*common, "--out", str(run)])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]  # written once (rank 0), not once per process
    assert json.loads((run / "STATUS.json").read_text())["status"] == "finished"
    assert (run / "report.html").is_file() and (run / "values_coach" / "reward_config.json").is_file()

    again = tmp_path / "again"
    shutil.copytree(run, again)
    (again / "checkpoints" / "latest.json").write_text(json.dumps({"iteration": 1, "file": "state_000001.pt"}))
    accelerate_train(["--resume", str(again)])
    redo = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in redo] == [1, 2]
    for k, v in rows[1].items():
        if k.startswith(("objective/", "ppo/")):
            assert redo[1][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_engines_are_refused_at_start(monkeypatch, var):
    """Under configs/accelerate/fsdp.yaml or deepspeed_zero*.yaml, `accelerate launch` sets these variables."""
    monkeypatch.setenv(var, "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="multi_gpu.yaml"):
        Dist.from_env()


def test_launcher_notes(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert any("model.precision" in n for n in Dist.launcher_notes())
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert Dist.launcher_notes() == []
