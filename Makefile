PY ?= .venv/bin/python

.PHONY: help install test test-fast fuzz bench lint format

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install the project with its test extras
	python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/pip install -q --no-deps -r tests/requirements-no-deps.txt

test:  ## the whole test suite (real servers on loopback, tiny models)
	$(PY) -m pytest

test-fast:  ## the suite without tests marked slow
	$(PY) -m pytest -m "not slow"

fuzz:  ## a deeper fuzzing pass over every server (100 generated requests per route and mode)
	FUZZ_EXAMPLES=100 $(PY) -m pytest tests/test_fuzz_on_cpu.py

bench:  ## every benchmark, each printing its ratios
	$(PY) benchmarks/real_models.py && $(PY) benchmarks/embedding.py && $(PY) benchmarks/judge.py && $(PY) benchmarks/infogain.py && $(PY) benchmarks/training.py && $(PY) benchmarks/ppo_server.py && $(PY) benchmarks/lewis.py && $(PY) benchmarks/sampler.py && $(PY) benchmarks/grpo_vs_trl.py

lint:  ## ruff lint and format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:  ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .
