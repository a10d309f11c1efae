# megacoach — two commands: `make demo` and `make test`. Both set up .venv via `make install`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: its CPU wheel lies on this machine's disk (anything else downloads GBs)
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

clean:
	rm -rf $(VENV) runs
