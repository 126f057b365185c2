# transferkit — two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# oneDNN crashes on some 1x1 stride-2 convolutions on AVX-512 CPUs (README, Troubleshooting).
export TF_ENABLE_ONEDNN_OPTS ?= 0
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-torch lint typecheck unit unit-jax-all docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Each stamp is rebuilt only when pyproject.toml changes: a second run installs nothing.
$(VENV)/.stamp-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo,plot]"
	touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.stamp-demo

demo: $(VENV)/.stamp-demo
	$(BIN)/python -m transferkit.demo

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.stamp-dev
	$(BIN)/mypy --strict src tests/typing_check.py

# The whole suite runs on TensorFlow; then the files already verified on JAX run again there
# (tests marked tensorflow_only skip on JAX). The rest of the suite is not yet checked on JAX
# (issue #13): add a file to JAX_TESTS once it passes there.
JAX_TESTS := tests/test_cache.py tests/test_lr_finder.py tests/test_recipes_phases.py \
	tests/test_batchnorm.py tests/test_reliability.py tests/test_lora.py tests/test_faults.py \
	tests/test_cli.py tests/test_keras2_ops.py tests/test_cross_backend.py tests/test_cache_shapes.py \
	tests/test_tuner.py tests/test_compiling.py

unit: $(VENV)/.stamp-dev
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest -n 2 -q --durations=25
	KERAS_BACKEND=jax $(BIN)/python -m pytest -n 2 -q $(JAX_TESTS)

# PyTorch is opt-in (not part of `make test`): the chain, the cache, LoRA and checkpoints on
# KERAS_BACKEND=torch. TORCH_SPEC pins a CPU build where one is at hand; PyPI's default torch
# for Linux is a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0
TORCH_TESTS := tests/test_tuner.py tests/test_cache.py tests/test_lora.py tests/test_faults.py \
	tests/test_cross_backend.py
test-torch: $(VENV)/.stamp-dev
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	KERAS_BACKEND=torch $(BIN)/python -m pytest -n 2 -q $(TORCH_TESTS)

unit-jax-all: $(VENV)/.stamp-dev
	KERAS_BACKEND=jax $(BIN)/python -m pytest -n 2 -q

docs: $(VENV)/.stamp-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint typecheck unit docs

bench: $(VENV)/.stamp-dev
	$(BIN)/python -m benchmarks.cache --backends tensorflow,jax

clean:
	rm -rf $(VENV) build dist site .pytest_cache .mypy_cache .ruff_cache
