# Every target sets up .venv itself, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
# The modules setup.py compiles and the .pxd declarations they cimport: an edit to one
# needs a rebuild of the extension modules.
HOT_SOURCES := $(shell sed -n 's/^    "proxy\.\(.*\)",$$/\1/p' proxy/compiled.py \
                 | tr . / | sed 's|.*|proxy/&.py|') $(wildcard proxy/*/*.pxd)
# Run once more as pure Python (SLUICEGATE_NO_EXTENSIONS=1): the units and the core of the
# traffic path, so the .py files the compiled run does not execute still do what it does.
PURE_SUBSET := tests/unit tests/pipeline tests/integration/test_forwarding.py \
               tests/integration/test_retries.py tests/integration/test_hostile_input.py \
               tests/integration/test_ratelimit_e2e.py

.PHONY: run test lint bench bench-instr loadtest cache-tests venv clean

$(STAMP): pyproject.toml setup.py proxy/compiled.py $(HOT_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sluicegate demo

test: $(STAMP)
	@scripts/ensure-tools.sh test
	$(PY) -m pytest -q -p no:cacheprovider
	SLUICEGATE_NO_EXTENSIONS=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_SUBSET)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	@scripts/ensure-tools.sh bench
	$(PY) loadtests/bench.py
	$(PY) loadtests/idle_memory.py --connections 10000

# User-space instructions per request under callgrind: nginx, the featureless forwarder
# (loadtests/forwarder.py) and Sluicegate. Repeats within about 1 %, unlike req/s.
# cache-hit: a memory-cache hit against the same proxy's proxied GET; gzip-64k: 64 KiB of
# JSON gzipped at nginx's default level, Sluicegate against nginx.
bench-instr: $(STAMP)
	@scripts/ensure-tools.sh bench-instr
	$(PY) loadtests/bench_instr.py --scenario small
	$(PY) loadtests/bench_instr.py --scenario 64k
	$(PY) loadtests/bench_instr.py --scenario cache-hit
	$(PY) loadtests/bench_instr.py --scenario gzip-64k

loadtest: $(STAMP)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[load]'
	$(PY) loadtests/run_loadtest.py

# RFC 9111 conformance (http-tests/cache-tests, checked out apart: see scripts/cache_tests.py).
CACHE_TESTS_DIR ?=
cache-tests: $(STAMP)
	$(PY) scripts/cache_tests.py --suite "$(CACHE_TESTS_DIR)"

clean:
	rm -rf $(VENV) build *.egg-info bench-results
	find proxy -name '*.so' -delete
