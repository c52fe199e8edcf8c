# trader: two commands do all set-up on a fresh machine.
#   make demo   runs the main job on the embedded default store
#   make test   sync check, nbdev_clean check, nbdev_test, pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export MPLBACKEND ?= Agg
export PYTHONHASHSEED ?= 0

.PHONY: install demo serve test bench sync-check clean-check nbtest pytest clean

install: $(STAMP)   ## create .venv once; re-run only when settings.ini/setup.py change

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: install    ## DEMO_SERVE=0 runs every stage without serving the dashboard
	$(BIN)/trader demo $(if $(filter 0 no false,$(DEMO_SERVE)),--no-serve,)

serve: install   ## the dashboard alone (read-only); CONTROL=1 enables the kill switch, resume and drill buttons
	$(BIN)/trader dashboard $(if $(filter 1 yes true,$(CONTROL)),--control,)

sync-check: install
	@$(BIN)/nbdev_export
	@if [ -n "$$(git status --porcelain -- trader)" ]; then \
	  echo "trader/ is out of sync with nbs/ (run nbdev_export and commit both):"; git status --porcelain -- trader; exit 1; fi
	@echo "sync check: trader/ matches nbs/"

clean-check: install
	@before=$$(cat $$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort) | sha256sum); \
	$(BIN)/nbdev_clean >/dev/null; \
	after=$$(cat $$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort) | sha256sum); \
	if [ "$$before" != "$$after" ]; then echo "notebooks were not clean (nbdev_clean changed them; commit the cleaned files)"; git status --porcelain -- nbs; exit 1; fi
	@echo "clean check: notebooks are clean"

nbtest: install
	TRADER_HOME=$(CURDIR)/.test-home/nbs TRADER_REPORTS=$(CURDIR)/.test-home/reports $(BIN)/nbdev_test --n_workers 2

pytest: install
	$(BIN)/python -m pytest tests/ -q

test: install   ## set PG=1 to start a throwaway PostgreSQL for the PostgreSQL tests
	@rm -rf .test-home
	$(MAKE) --no-print-directory sync-check
	$(MAKE) --no-print-directory clean-check
	$(BIN)/lint-imports   # the layer contracts in pyproject.toml: imports point down only (ops > live > research > core)
	$(MAKE) --no-print-directory nbtest
	@if [ "$(PG)" = "1" ] && [ -z "$$TRADER_TEST_PG_URL" ]; then \
	  .ci/with-postgres $(MAKE) --no-print-directory pytest; else $(MAKE) --no-print-directory pytest; fi

bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf .test-home .pytest_cache
