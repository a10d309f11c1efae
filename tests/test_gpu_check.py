"""The one-call GPU check (benchmarks/gpu_check.sh) and its wheelhouse (benchmarks/wheelhouse.py), here on the CPU:
the wheelhouse check on made-up wheel names, and the script's --dry-run (plan, flags, wheelhouse, the tests'
collection) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import wheelhouse  # noqa: E402


def _version_for(req: Requirement) -> str:
    for spec in req.specifier:
        if spec.operator in (">=", "==", "~="):
            return spec.version
    return "99.0"


def fake_wheelhouse(folder: Path, extra: list[str] = (), drop: set[str] = frozenset(),
                    transformers: str | None = None) -> Path:
    """Empty files named as the wheels `make wheelhouse` would download (one version each, satisfying megacoach's
    requirements), plus `extra` names."""
    folder.mkdir(parents=True, exist_ok=True)
    for r in wheelhouse.requirements() + [Requirement(p) for p in wheelhouse.PEER]:
        name = r.name.replace("-", "_").lower()
        if name in drop or r.name.lower() in wheelhouse.LEFT_OUT:
            continue
        version = transformers if (name == "transformers" and transformers) else _version_for(r)
        (folder / f"{name}-{version}-py3-none-any.whl").write_bytes(b"")
    for e in extra:
        (folder / e).write_bytes(b"")
    return folder


def test_a_complete_wheelhouse_is_ready(tmp_path):
    assert wheelhouse.check(fake_wheelhouse(tmp_path / "wh")) == []
    assert all(r.name not in ("torch", "accelerate", "peft") for r in wheelhouse.requirements())


def test_the_wheelhouse_refuses_torch_old_transformers_and_foreign_wheels(tmp_path):
    wh = fake_wheelhouse(tmp_path / "wh", transformers="5.17.0",
                         extra=["torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                "nvidia_cublas-13.0.0-py3-none-manylinux_2_27_x86_64.whl",
                                "pydantic_core-2.33.2-cp311-cp311-manylinux_2_17_x86_64.whl",
                                "sqlalchemy-2.0.40-cp312-cp312-macosx_11_0_arm64.whl"], drop={"alembic"})
    problems = "\n".join(wheelhouse.check(wh))
    assert "torch-2.13.0" in problems and "the GPU machine's own torch must stay" in problems
    assert "nvidia_cublas" in problems
    assert "transformers>=5.24: only 5.17.0" in problems
    assert "pydantic_core-2.33.2-cp311" in problems and "macosx" in problems  # not for cp312 manylinux x86_64
    assert "alembic>=1.13: no wheel" in problems
    assert "sqlalchemy: 2 versions" in problems
    assert wheelhouse.check(tmp_path / "none") == [f"{tmp_path / 'none'}: no such folder (make wheelhouse builds it)"]


def _dry_run(tmp_path, wh: Path) -> tuple[int, str, list[dict]]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "WHEELHOUSE": str(wh),
           # the TRL bench takes the same flags as megacoach's (checked against the real one by `make
           # gpu-check-dry-run`); megacoach's own stands in for it here
           "TRL_BENCH": str(ROOT / "benchmarks" / "ppo_iteration.py")}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return proc.returncode, proc.stdout + proc.stderr, rows


def test_the_gpu_check_dry_run_verifies_plan_flags_wheelhouse_and_tests(tmp_path):
    rc, text, rows = _dry_run(tmp_path, fake_wheelhouse(tmp_path / "wh"))
    steps = {r["step"]: r for r in rows}
    assert rc == 0, text
    assert set(steps) == {"plan", "wheelhouse", "bench_mc", "bench_trl", "train", "gpu_tests", "device_tests"}
    assert all(r["rc"] == "0" for r in rows), rows
    assert "of a 475s budget" in steps["plan"]["note"]
    assert steps["bench_mc"]["note"] == "flags: all known" and steps["train"]["note"] == "flags: all known"
    assert "collect:" in steps["device_tests"]["note"] and "tests collected" in steps["device_tests"]["note"]
    # a wheelhouse with a torch in it fails the dry run, and says why
    bad = fake_wheelhouse(tmp_path / "bad", extra=["torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl"])
    rc, text, rows = _dry_run(tmp_path / "again", bad)
    assert rc == 1 and {r["step"]: r["rc"] for r in rows}["wheelhouse"] == "1"
    assert "torch" in (tmp_path / "again" / "out" / "setup.log").read_text()


@pytest.mark.parametrize("flag", ["--device", "--precision", "--compare-generate"])
def test_the_benchmark_takes_the_gpu_flags(flag):
    help_text = subprocess.run([sys.executable, "benchmarks/ppo_iteration.py", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout
    assert flag in help_text
