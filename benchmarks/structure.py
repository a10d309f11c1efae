"""How the house is built, measured: the files one PPO iteration passes through, import cycles, the largest class.

    python benchmarks/structure.py [--out DIR]

Runs a tiny run (the test suite's random 2-layer GPT-2, its Values Coach built to agree with its labeler, guards on,
one process) for 3 iterations under `sys.setprofile`, and reports, for the 2nd iteration (the 1st builds caches):
- `trainer`: inside `PPOTrainer.iteration()` — rollout, the guards' check of the batch, the update, beta, metrics;
- `loop`: the whole iteration of `PPOLoop.run` — also the labelers, the guards' monitors and fresh labels, the label
  store, metrics, report, Andon checks and checkpoint;
the files of src/megacoach entered (a function of the file called), the moves between files (consecutive calls in
different files), and the re-entries of the most visited file, each count raw and with the leaf helpers (below)
folded into their callers, side by side. Then the import graph's cycles (grimp, which counts
imports inside functions too), megacoach's own imports made inside functions, and the largest classes and functions.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "megacoach"


def trace_run(out: Path) -> list[tuple[str, str, str]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from rich.console import Console

    import guard_helpers as H
    from conftest import build_tiny_model
    from megacoach.pipeline import train

    md = build_tiny_model(out / "tiny")
    db, coach = H.prepare_tiny(out / "prep", md)
    run = H.new_run(out / "r", db)
    cfg = H.tiny_config(run, md, coach, run={"max_iterations": 3, "out": str(run)}, ppo={"total_episodes": 32})
    src = str(SRC)
    events: list[tuple[str, str, str]] = []  # (caller's file, callee's file, callee)

    def prof(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(src):
            return
        back = frame.f_back  # the nearest project frame up the stack (skips torch's Module.__call__ and the like)
        while back is not None and not back.f_code.co_filename.startswith(src):
            back = back.f_back
        caller = back.f_code.co_filename[len(src) + 1:] if back is not None else "(outside)"
        events.append((caller, frame.f_code.co_filename[len(src) + 1:], frame.f_code.co_qualname))

    import inspect

    kwargs = {}
    if "guards_factory" in inspect.signature(train).parameters:  # the code before the composition root built them
        from megacoach.guards import make_guards

        kwargs["guards_factory"] = make_guards
    sys.setprofile(prof)
    threading.setprofile(prof)
    try:
        train(cfg, console=Console(quiet=True), **kwargs)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return events


# pure helpers that every room calls (LM inputs, the store's tables and records, statistics): the structure review
# counts moves with them folded into their callers
LEAF_HELPERS = {"lm/hf.py", "lm/padding.py", "labels/schema.py", "labels/records.py", "guards/stats.py"}


def _rooms(events, skip=frozenset()) -> list[str]:
    rooms: list[str] = []
    for caller, callee, _ in events:
        for x in (caller, callee):
            if x != "(outside)" and x not in skip and (not rooms or rooms[-1] != x):
                rooms.append(x)
    return rooms


def route(events) -> dict:
    """The route's figures, each raw and with the leaf helpers folded into their callers (side by side: a fold
    can hide code placed in a helper to lower a count, the raw figure cannot)."""
    files: list[str] = []
    for _, callee, _ in events:
        if callee not in files:
            files.append(callee)
    rooms, folded = _rooms(events), _rooms(events, LEAF_HELPERS)
    return {"files": len(files), "files_leaf_helpers_folded": len([f for f in files if f not in LEAF_HELPERS]),
            "moves": max(0, len(rooms) - 1), "moves_leaf_helpers_folded": max(0, len(folded) - 1),
            "trainer_entries": rooms.count("ppo/trainer.py"),
            "trainer_entries_leaf_helpers_folded": folded.count("ppo/trainer.py"), "files_in_order": files,
            "most_entered": [f"{f}: {n}" for f, n in collections.Counter(rooms).most_common(3)],
            "most_entered_leaf_helpers_folded": [f"{f}: {n}" for f, n in collections.Counter(folded).most_common(3)]}


def table(name: str, r: dict) -> str:
    """The route's figures as rows of raw | folded."""
    rows = [("files entered", r["files"], r["files_leaf_helpers_folded"]),
            ("moves between files", r["moves"], r["moves_leaf_helpers_folded"]),
            ("ppo/trainer.py entered", r["trainer_entries"], r["trainer_entries_leaf_helpers_folded"]),
            ("most entered", ", ".join(r["most_entered"]), ", ".join(r["most_entered_leaf_helpers_folded"]))]
    w = max(len(str(raw)) for _, raw, _ in rows)
    lines = [f"{name}:", f"  {'':24s} {'raw':{w}s} | leaf helpers folded ({', '.join(sorted(LEAF_HELPERS))})"]
    lines += [f"  {label:24s} {str(raw):{w}s} | {fold}" for label, raw, fold in rows]
    return "\n".join(lines + ["  " + " > ".join(r["files_in_order"])])


def segments(events):
    calls = [i for i, e in enumerate(events) if e[1] == "ppo/trainer.py" and e[2] == "PPOTrainer.iteration"]
    # the trainer's iteration: from its call to the first event back in the loop's own file after it
    start = calls[1]
    end = next(i for i in range(start + 1, len(events)) if events[i][0] == "loop.py" and events[i][1] != "ppo/trainer.py"
               and events[i][2] != "PPOLoop.iterate")
    loop_start = max(i for i in range(start) if events[i][2] in ("RunControl.pulled", "PPOLoop.andon_pull"))
    return events[start:end], events[loop_start:calls[2]]


def import_figures() -> dict:
    import grimp

    graph = grimp.build_graph("megacoach")
    tops = sorted({m.split(".")[1] for m in graph.modules if m.count(".") >= 1})
    cycles = []
    for a in tops:
        for b in tops:
            if a < b and graph.chain_exists(f"megacoach.{a}", f"megacoach.{b}", as_packages=True) and \
                    graph.chain_exists(f"megacoach.{b}", f"megacoach.{a}", as_packages=True):
                cycles.append(f"{a} <-> {b}")
    local = 0
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megacoach"):
                        local += 1
                    elif isinstance(node, ast.Import) and any(a.name.startswith("megacoach") for a in node.names):
                        local += 1
    return {"package_cycles": cycles, "megacoach_imports_inside_functions": local}


def largest(kind) -> list[str]:
    sizes = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, kind):
                sizes.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC)}:{node.name}"))
    return [f"{n} {name}" for n, name in sorted(sizes, reverse=True)[:3]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="megacoach-structure-"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    events = trace_run(out)
    trainer_seg, loop_seg = segments(events)
    res = {"trainer_iteration": route(trainer_seg), "loop_iteration": route(loop_seg), **import_figures(),
           "largest_classes": largest(ast.ClassDef),
           "largest_functions": largest((ast.FunctionDef, ast.AsyncFunctionDef)),
           "readme_bytes": (ROOT / "README.md").stat().st_size}
    for k in ("trainer_iteration", "loop_iteration"):
        print(table(k, res[k]), file=sys.stderr)
    if a.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
