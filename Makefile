# The README's commands. Each creates .venv and installs what it needs on first use, so they work
# in a fresh Debian clone with nothing but python3: `make test` also installs the Debian packages
# the suite needs (PostgreSQL, chromium) when it can (root or passwordless sudo) and otherwise says
# which tests skip and why (scripts/system-packages.sh).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# Extra arguments for pytest, e.g. make test PYTEST_ARGS='tests/store -x'
PYTEST_ARGS ?=
# -q still ends with pytest's summary line ("N passed, M skipped in Ts"); CI (CI=true) runs in a
# fresh clone, so it keeps no pytest cache behind.
# The suite runs on $(TEST_WORKERS) pytest-xdist workers: most tests wait on real processes, servers
# and disks, so three workers keep this machine's two cores busy; Ray tests share one worker
# (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
PYTEST_OPTS := -q $(if $(filter true,$(CI)),-p no:cacheprovider) \
	$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	@# a venv whose pip does not run (an interrupted first attempt) is made again
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PY) -m venv --clear $(VENV)
	@# torch==2.13.0 is pinned so pip takes the CPU build on this machine's disk (pip.conf)
	@echo "make: installing shipyard and its dependencies into $(VENV) (PyTorch CPU included;"
	@echo "make: a few minutes the first time, then only when pyproject.toml changes)"
	$(BIN)/python -m pip install --progress-bar off -e ".[demo,dev,postgres,ray]" \
		| { grep --line-buffered -E '^(Collecting|Successfully)'; true; }
	@echo "make: install done"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shipyard demo

test: $(STAMP)
	@bash scripts/system-packages.sh
	$(BIN)/python -m pytest $(PYTEST_OPTS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy src/shipyard/domain src/shipyard/compute/policy src/shipyard/compute/admission.py src/shipyard/compute/records.py src/shipyard/wiring.py src/shipyard/errors.py

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache .grimp_cache
