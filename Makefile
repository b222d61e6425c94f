# recloop developer entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv and install the exact pins first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run

.PHONY: setup system-deps test demo lint format bench-prepare bench-serve bench-deps clean

setup: $(STAMP)

# redis-server, wrk and nginx (Debian packages), for the Redis and cluster tests and the serving benchmarks.
system-deps:
	./scripts/ensure-system-deps.sh

# torch==2.13.0 is pinned in requirements.lock and installed in the same pip call as the
# other pins, so nothing can pull in a different (CUDA) torch build.
# The sharded extra (TorchRec) goes in with --no-deps: see requirements-sharded.lock.
$(STAMP): requirements.lock requirements-sharded.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -r requirements-sharded.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Benchmark-only packages (requirements-bench.lock): the Milvus server bench/scale_serve.py runs.
bench-deps: setup system-deps
	$(PY) -m pip install --quiet --no-deps -r requirements-bench.lock

test: setup system-deps
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/recloop demo --workdir $(DEMO_DIR)

lint: setup
	$(VENV)/bin/ruff check recloop tests bench
	$(VENV)/bin/ruff format --check recloop tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format recloop tests bench
	$(VENV)/bin/ruff check --fix recloop tests bench

bench-prepare: setup
	$(PY) bench/prepare.py

bench-serve: setup system-deps
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
