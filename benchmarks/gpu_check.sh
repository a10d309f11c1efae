#!/usr/bin/env bash
# megacoach's GPU path in one call, on a GPU machine without a package registry, inside 8 minutes.
#
#   bash benchmarks/gpu_check.sh            from the project root, on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  here: verifies the plan (every step's timeout inside the budget), the
#                                           flags of both benchmarks, the wheelhouse and the tests' collection;
#                                           installs, trains and times nothing
#
# Before: `make wheelhouse` (here, with a registry) fills .wheelhouse/ with megacoach's dependencies for CPython 3.12
# on manylinux x86_64 (never torch: the machine's own CUDA build stays) and a copy of the TRL bench; carry
# .wheelhouse with the working tree. Steps, each under its own timeout (seconds), in this order:
#   env          nvidia-smi, python, torch, CUDA                                                      10
#   setup        megacoach's dependencies from the wheelhouse (--no-index), trl without its deps,
#                megacoach itself without deps (torch untouched)                                    45
#   gpu_tests    pytest -m gpu tests/test_gpu.py                                                      70
#   train        megacoach train on the built-in model, run.device=cuda, bf16-mixed, guards on, a
#                few iterations, to its end (report.html, apprentice/)                              120
#   resume_cpu   that run's checkpoint resumed on the CPU for one more iteration, guards on          60
#   bench_mc     benchmarks/ppo_iteration.py, GPT-2-small shape, --device cuda --precision bf16     70
#   bench_trl    the TRL bench with the same flags                                                   70
#   device_tests tests/test_device.py tests/test_precision.py (run.device=auto is the GPU there)    30
# A step that no longer fits the budget (GPU_CHECK_BUDGET_S, default 475) is skipped and said so; a failed step
# does not stop the next.
#
# Output, flat under $OUT (default ./gpu_check_out): summary.txt (one line per step: name, exit code, seconds,
# note), results.jsonl (one JSON object per step: step, rc, seconds, note, and the step's own figures: the
# benchmarks' JSON lines, the run's summary), <step>.log for each step, train_metrics.jsonl and train_summary.json
# of the run. docs/hardware.md describes them.
#
# Environment: OUT, PYTHON (default python3), WHEELHOUSE (default .wheelhouse), TRL_BENCH (default
# $WHEELHOUSE/trl_ppo_bench.py, else ../shared/bench/trl_ppo_bench.py), GPU_CHECK_BUDGET_S, BENCH_BATCH (512),
# TRAIN_ITERS (3).
set -u
set -o pipefail

MODE=full
case "${1:-}" in
  --dry-run) MODE=dry ;;
  "") ;;
  -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (expected --dry-run or nothing)"; exit 2 ;;
esac

[ -f pyproject.toml ] && [ -d src/megacoach ] || { echo "run it from the project root"; exit 2; }
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
WH=${WHEELHOUSE:-$ROOT/.wheelhouse}
TRL=${TRL_BENCH:-}
[ -z "$TRL" ] && for c in "$WH/trl_ppo_bench.py" "$ROOT/../shared/bench/trl_ppo_bench.py"; do [ -f "$c" ] && { TRL=$c; break; }; done
BUDGET=${GPU_CHECK_BUDGET_S:-475}
BATCH=${BENCH_BATCH:-512}
ITERS=${TRAIN_ITERS:-3}
RUN=$OUT/run
START=$(date +%s)
mkdir -p "$OUT"
: > "$OUT/summary.txt"
: > "$OUT/results.jsonl"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
[ "$MODE" = dry ] && export PYTHONDONTWRITEBYTECODE=1

STEPS="env:10 setup:45 gpu_tests:70 train:120 resume_cpu:60 bench_mc:70 bench_trl:70 device_tests:30"
# the GPT-2-small shape, the same for both benchmarks
BENCH_FLAGS="--n-layer 12 --n-head 12 --n-embd 768 --n-positions 256 --query-length 64 --response-length 24
  --batch-size $BATCH --mini-batch-size 64 --ppo-epochs 4 --iterations 2 --warmup 1 --threads 8 --seed 0
  --device cuda --precision bf16"
TRAIN_ARGS="train --out $RUN --comparisons 600 --episodes $((64 * ITERS)) --set run.device=cuda
  --set model.precision=bf16-mixed --set run.max_iterations=$ITERS --set guards.enabled=true"
RESUME_ARGS="train --resume $RUN --set run.device=cpu --set run.max_iterations=$((ITERS + 1))
  --set ppo.total_episodes=$((64 * (ITERS + 1)))"

elapsed() { echo $(( $(date +%s) - START )); }
# record STEP RC SECONDS NOTE [JSON]: a summary line and a results line (JSON: the step's own figures, an object)
record() {
  printf '%-13s %5s %5s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/summary.txt"
  "$PY" -c 'import json, sys
d = {"step": sys.argv[1], "rc": sys.argv[2], "seconds": int(sys.argv[3]), "note": sys.argv[4]}
if len(sys.argv) > 5 and sys.argv[5]:
    d.update(json.loads(sys.argv[5]))
print(json.dumps(d))' "$@" >> "$OUT/results.jsonl" 2>/dev/null || echo "{\"step\": \"$1\", \"rc\": \"$2\"}" >> "$OUT/results.jsonl"
}
limit_of() { for s in $STEPS; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}"; done; }
# step NAME CMD...: CMD under the step's timeout (cut to what the budget has left), output in NAME.log; sets RC, SECS
step() {
  local name=$1; shift
  local lim; lim=$(limit_of "$name")
  local left=$(( BUDGET - $(elapsed) - 5 ))
  [ "$left" -lt "$lim" ] && lim=$left
  [ "$MODE" = dry ] && lim=180  # a dry run checks, outside the budget (here a loaded CPU may collect slowly)
  if [ "$lim" -lt 10 ]; then RC=SKIP; SECS=0; echo "skipped: the budget is spent" > "$OUT/$name.log"; return 1; fi
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$lim" "$@" > "$OUT/$name.log" 2>&1
  RC=$?
  SECS=$(( $(date +%s) - t0 ))
  [ "$RC" = 124 ] && echo "timed out after ${lim}s" >> "$OUT/$name.log"
  return 0
}
last_json() { grep '^{' "$1" | tail -1; }
pytest_line() { grep -E '([0-9]+ (passed|failed|errors?|skipped|deselected|tests? collected))|no tests ran' "$1" | tail -1 | cut -c1-150; }

# ------------------------------------------------------------------------------------------------ dry run
if [ "$MODE" = dry ]; then
  total=0; for s in $STEPS; do total=$(( total + ${s##*:} )); done
  rc=0; [ "$total" -le "$BUDGET" ] && [ "$BUDGET" -le 480 ] || rc=1
  record plan "$rc" 0 "$(echo $STEPS | wc -w) steps, timeouts sum to ${total}s of a ${BUDGET}s budget (8 minutes: 480)"
  step setup "$PY" benchmarks/wheelhouse.py check "$WH"
  record wheelhouse "$RC" "$SECS" "$(tail -1 "$OUT/setup.log" | cut -c1-150)"
  for b in "benchmarks/ppo_iteration.py" "$TRL"; do
    name=$([ "$b" = "$TRL" ] && echo bench_trl || echo bench_mc)
    if [ -z "$b" ] || [ ! -f "$b" ]; then record "$name" 1 0 "no TRL bench (make wheelhouse copies it; or set TRL_BENCH)"; continue; fi
    help=$("$PY" "$b" --help 2>&1); bad=""
    for f in $BENCH_FLAGS; do case "$f" in --*) grep -q -- "$f\b" <<< "$help" || bad="$bad $f" ;; esac; done
    record "$name" "$([ -z "$bad" ] && echo 0 || echo 1)" 0 "flags: $([ -z "$bad" ] && echo "all known" || echo "unknown:$bad")"
  done
  help=$("$PY" -m megacoach.cli_entry train --help 2>&1); bad=""
  for f in $TRAIN_ARGS $RESUME_ARGS; do case "$f" in --*) grep -q -- "$f\b" <<< "$help" || bad="$bad $f" ;; esac; done
  record train "$([ -z "$bad" ] && echo 0 || echo 1)" 0 "flags: $([ -z "$bad" ] && echo "all known" || echo "unknown:$bad")"
  step gpu_tests "$PY" -m pytest -p no:cacheprovider -o addopts= --collect-only -q -m gpu tests/test_gpu.py
  record gpu_tests "$RC" "$SECS" "collect: $(pytest_line "$OUT/gpu_tests.log")"
  step device_tests "$PY" -m pytest -p no:cacheprovider -o addopts= --collect-only -q tests/test_device.py tests/test_precision.py
  record device_tests "$RC" "$SECS" "collect: $(pytest_line "$OUT/device_tests.log")"
  echo "dry run: $(grep -c . "$OUT/summary.txt") checks, $(awk '$2 != 0' "$OUT/summary.txt" | wc -l) failed; output in $OUT"
  awk '$2 != 0 {bad=1} END {exit bad}' "$OUT/summary.txt"
  exit $?
fi

# ------------------------------------------------------------------------------------------------ the check
step env bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'"
record env "$RC" "$SECS" "$(grep -m1 '^torch' "$OUT/env.log")"

# megacoach itself is imported from src/ (PYTHONPATH) whether or not its editable install below works
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
SETUP='set -e
"$PY" benchmarks/wheelhouse.py check "$WH"
"$PY" -m pip install -q --no-index --find-links "$WH" $("$PY" benchmarks/wheelhouse.py requirements)
"$PY" -m pip install -q --no-index --no-deps --find-links "$WH" trl || echo "trl not installed: the TRL bench will fail"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "no editable install: megacoach from src/"
"$PY" -c "import megacoach, torch, transformers; print(\"megacoach ready: torch\", torch.__version__, \"transformers\", transformers.__version__)"'
export PY WH
step setup bash -c "$SETUP"
record setup "$RC" "$SECS" "$(tail -1 "$OUT/setup.log" | cut -c1-150)"

step gpu_tests "$PY" -m pytest -p no:cacheprovider -o addopts= -q -rfEs -m gpu tests/test_gpu.py
record gpu_tests "$RC" "$SECS" "$(pytest_line "$OUT/gpu_tests.log")"

step train "$PY" -m megacoach.cli_entry $TRAIN_ARGS
ends=""; for f in report.html summary.json before_after.jsonl apprentice/config.json; do [ -f "$RUN/$f" ] || ends="$ends $f"; done
cp "$RUN/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null; cp "$RUN/summary.json" "$OUT/train_summary.json" 2>/dev/null
record train "$RC" "$SECS" "$([ -z "$ends" ] && echo "ended: report, apprentice" || echo "missing:$ends")" \
  "$("$PY" -c 'import json, sys; print(json.dumps({"summary": json.load(open(sys.argv[1]))}))' "$RUN/summary.json" 2>/dev/null)"

step resume_cpu "$PY" -m megacoach.cli_entry $RESUME_ARGS
record resume_cpu "$RC" "$SECS" "$(grep -m1 'resumed from' "$OUT/resume_cpu.log" | cut -c1-120)"

step bench_mc "$PY" benchmarks/ppo_iteration.py $BENCH_FLAGS
record bench_mc "$RC" "$SECS" "batch $BATCH" "$(last_json "$OUT/bench_mc.log")"

if [ -n "$TRL" ]; then
  step bench_trl "$PY" "$TRL" $BENCH_FLAGS
  record bench_trl "$RC" "$SECS" "batch $BATCH" "$(last_json "$OUT/bench_trl.log")"
else
  record bench_trl SKIP 0 "no TRL bench (make wheelhouse copies it; or set TRL_BENCH)"
fi

step device_tests "$PY" -m pytest -p no:cacheprovider -o addopts= -q -rfE tests/test_device.py tests/test_precision.py
record device_tests "$RC" "$SECS" "$(pytest_line "$OUT/device_tests.log")"

echo "megacoach GPU check: $(elapsed)s of ${BUDGET}s; output in $OUT"
cat "$OUT/summary.txt"
