# The README's commands. Each creates .venv and installs what it needs on first use, so they work
# in a fresh clone with nothing but python3 (and, for the PostgreSQL tests, Debian's `postgresql`
# package: .ci/run installs it; elsewhere those tests skip without it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# Extra arguments for pytest, e.g. make test PYTEST_ARGS='tests/store -x'
PYTEST_ARGS ?=
# -q still ends with pytest's summary line ("N passed, M skipped in Ts"); CI (CI=true) runs in a
# fresh clone, so it keeps no pytest cache behind.
PYTEST_OPTS := -q $(if $(filter true,$(CI)),-p no:cacheprovider)

export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	@# a venv whose pip does not run (an interrupted first attempt) is made again
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PY) -m venv --clear $(VENV)
	@# torch==2.13.0 is pinned so pip takes the CPU build on this machine's disk (pip.conf)
	$(BIN)/python -m pip install -q -e ".[demo,dev,postgres]"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shipyard demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_OPTS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy src/shipyard/domain src/shipyard/compute/scheduler.py src/shipyard/errors.py

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache .grimp_cache
