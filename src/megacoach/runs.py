"""The run folder: its config, versions, metrics, checkpoints, and halt / Andon records.

    RUN_DIR/config.yaml        the exact resolved config          RUN_DIR/versions.json   package versions
    RUN_DIR/metrics.jsonl      one JSON object per iteration      RUN_DIR/tb/             TensorBoard events
    RUN_DIR/checkpoints/       state_NNNNNN.pt + latest.json      RUN_DIR/HALTED.json     why a run was halted
    RUN_DIR/ANDON.json         an Andon cord pull waiting to be honoured (removed by --resume)
    RUN_DIR/STATUS.json        running / halted / finished, with the iteration and pid
    RUN_DIR/precision.json     the device and each model's precision (written by the pipeline, hardware.py)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from megacoach.config import Config, build_config, read_config_file, save_config
from megacoach.errors import ConfigError, DataError


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("megacoach", "torch", "transformers", "tokenizers", "accelerate", "sqlalchemy", "vaderSentiment"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.ckpt_dir = self.path / "checkpoints"
        self.halted_path = self.path / "HALTED.json"
        self.andon_path = self.path / "ANDON.json"
        self.status_path = self.path / "STATUS.json"

    # ---------------------------------------------------------------- config and versions
    def create(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.yaml")
        _atomic_write(self.path / "versions.json", json.dumps(versions(), indent=2))

    def load_config(self) -> Config:
        p = self.path / "config.yaml"
        if not p.is_file():
            raise ConfigError(f"{self.path} is not a megacoach run folder (no config.yaml)")
        return build_config(read_config_file(p))

    # ---------------------------------------------------------------- metrics
    def append_metrics(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_iteration: int) -> None:
        """On resume: drop rows written after the checkpoint being resumed from."""
        rows = [r for r in self.read_metrics() if r.get("iteration", 0) <= last_iteration]
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, state: dict, iteration: int, keep: int = 2) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self.ckpt_dir / f"state_{iteration:06d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        _atomic_write(self.ckpt_dir / "latest.json", json.dumps({"iteration": iteration, "file": path.name}))
        for old in sorted(self.ckpt_dir.glob("state_*.pt"))[:-keep]:
            old.unlink()
        return path

    def latest_checkpoint(self) -> dict | None:
        latest = self.ckpt_dir / "latest.json"
        if not latest.is_file():
            return None
        info = json.loads(latest.read_text())
        path = self.ckpt_dir / info["file"]
        try:  # on the host, whatever device saved it: the trainer copies each tensor to where its model lives
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                            "delete checkpoints/latest.json to start over") from None

    # ---------------------------------------------------------------- status, halt, Andon
    def set_status(self, status: str, iteration: int, **extra) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.status_path, json.dumps({"status": status, "iteration": iteration, "pid": os.getpid(),
                                                    "updated": time.time(), **extra}))

    def status(self) -> dict | None:
        return json.loads(self.status_path.read_text()) if self.status_path.is_file() else None

    def write_halt(self, record: dict) -> None:
        _atomic_write(self.halted_path, json.dumps(record, indent=2, default=str))

    def pull_andon(self, reason: str, who: str) -> None:
        _atomic_write(self.andon_path, json.dumps({"reason": reason, "who": who, "at": time.time()}))

    def andon(self) -> dict | None:
        try:
            return json.loads(self.andon_path.read_text()) if self.andon_path.is_file() else None
        except json.JSONDecodeError:
            return {"reason": "unreadable ANDON.json (treated as a pull)", "who": "unknown"}

    def clear_for_resume(self) -> None:
        for p in (self.andon_path, self.halted_path):
            if p.is_file():
                p.rename(p.with_name(p.stem + f".{int(time.time())}.resolved.json"))


class RunControl:
    """One home for "stop": both Andon channels, the run's status, and the halt record.

    An Andon cord pull reaches a run two ways: `megacoach andon RUN_DIR` writes RUN_DIR/ANDON.json, and the
    labeling app marks the run 'paused' in the label store. The PPO loop asks `pulled()` before every iteration and
    again after it, and writes its status with `running(...)`: a compare-and-set, so a pause that lands between the
    check and the write is kept (and honoured), never overwritten. `halted(record)` writes HALTED.json and the
    status in both places; `finished(...)` ends a run that ran to the end."""

    APP = {"who": "labeling app", "reason": "paused from the labeling app"}

    def __init__(self, rundir: RunDir, store, run_id: str):
        self.rundir, self.store, self.run_id = rundir, store, run_id

    def pulled(self) -> dict | None:
        """The Andon pull waiting to be honoured ({'who', 'reason', ...}), or None."""
        pull = self.rundir.andon()
        if pull:
            return pull
        status = self.store.get_run_status(self.run_id)
        if status is not None and status.status == "paused":
            return {"reason": status.detail.get("reason", self.APP["reason"]),
                    "who": status.detail.get("who", self.APP["who"])}
        return None

    def started(self, iteration: int) -> None:
        self.rundir.set_status("running", iteration)
        self.store.set_run_status(self.run_id, "running", iteration, {})

    def running(self, iteration: int, detail: dict) -> dict | None:
        """Status 'running' after an iteration, unless a pause landed meanwhile: then that pull is returned."""
        rec = self.store.set_run_status(self.run_id, "running", iteration, detail, unless=("paused",))
        if rec.status == "paused":
            return self.pulled() or dict(self.APP)
        return None

    def halted(self, record: dict) -> None:
        self.rundir.write_halt(record)
        self.rundir.set_status("halted", record["iteration"], reason=record["reason"])
        self.store.set_run_status(self.run_id, "halted", record["iteration"],
                                  {"reason": record["reason"], "source": record["source"]})

    def finished(self, iteration: int) -> None:
        self.rundir.set_status("finished", iteration)
        self.store.set_run_status(self.run_id, "finished", iteration, {})
