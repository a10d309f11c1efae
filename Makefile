# megacoach — two commands: `make demo` and `make test`. Both set up .venv via `make install`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean wheelhouse gpu-check-dry-run

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned (pyproject.toml gives the range the code needs; 2.13.0 is the tested one): its CPU
	# wheel lies on this machine's disk (anything else downloads GBs)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,gguf]' torch==2.13.0
	# torch.compile (run.compile) builds C++ kernels: Debian's g++ where it is missing (else the run stays eager)
	@command -v g++ >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null; } || \
	  echo "note: no C++ compiler (apt-get install g++): run.compile will stay off"; }
	touch $(STAMP)

demo: install
	$(BIN)/megacoach train --out runs/demo

test: install
	$(BIN)/lint-imports  # the import contract in .importlinter: no cycles, the method below the edges
	$(BIN)/python -m pytest

# The GPU check (benchmarks/gpu_check.sh) runs on a GPU machine without a package registry: megacoach's
# dependencies for CPython 3.12 on manylinux x86_64 (never torch: the machine keeps its CUDA build), built here.
TRL_BENCH ?= ../shared/bench/trl_ppo_bench.py
wheelhouse: install
	$(BIN)/python benchmarks/wheelhouse.py build .wheelhouse
	cp $(TRL_BENCH) .wheelhouse/ 2>/dev/null || echo "note: no TRL bench at $(TRL_BENCH) (set TRL_BENCH=...): the check skips it"

gpu-check-dry-run: install
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) runs
