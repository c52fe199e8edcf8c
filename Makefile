# trader: two commands do all set-up on a fresh machine.
#   make demo   runs the main job on the embedded default store
#   make test   lock check, sync check, nbdev_clean check, notebooks executed + outputs compared, pytest
#   make nbs    re-execute the notebooks in place (their committed outputs), then nbdev_clean
#   make lab    JupyterLab on 127.0.0.1 with the project's kernel (`trader`)
#   make docs   the static docs site (notebooks with their outputs, API reference, search) in _docs/, offline
#   make power  the power study (synthetic markets with and without a planted edge; not in CI)
#   make lock   re-compile requirements.lock from settings.ini (see the README's "Upgrading dependencies")
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export MPLBACKEND ?= Agg
export PYTHONHASHSEED ?= 0

.PHONY: install demo serve lab docs lock lock-check test bench power sync-check clean-check nbtest nbs pytest clean

# Extra wheel folders for the lock's CPU build of torch (torch==X+cpu is not on PyPI): this machine keeps it in /opt/wheels.
FIND_LINKS ?= $(wildcard /opt/wheels)
KERNEL := trader
LAB_PORT ?= 8888

install: $(STAMP)   ## create .venv once; re-run only when settings.ini/setup.py/requirements.lock change

# Exactly the lock: every pin without dependency resolution (--no-deps), then the project itself (editable, built with the
# locked setuptools), then `pip check` proves the pins satisfy each other and settings.ini.
$(STAMP): settings.ini setup.py requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r requirements.lock $(if $(FIND_LINKS),--find-links $(FIND_LINKS),)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python .ci/lock.py pipcheck
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (trader)" >/dev/null
	@touch $(STAMP)

lock:   ## re-compile requirements.lock from settings.ini: keeps every pin that still fits; UPGRADE=1 re-resolves all to the newest
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/pip install -q "$$(grep -m1 '^uv==' requirements.lock || echo uv)"
	$(BIN)/python .ci/lock.py in | $(BIN)/uv pip compile - -q -o requirements.lock --python $(BIN)/python \
	  --custom-compile-command "make lock" --override .ci/overrides.txt $(if $(FIND_LINKS),--find-links $(FIND_LINKS),) $(if $(filter 1 yes true,$(UPGRADE)),--upgrade,)
	$(BIN)/python .ci/lock.py check

lock-check: install   ## the lock is in step with settings.ini, the venv holds exactly the lock, and pip check passes
	$(BIN)/python .ci/lock.py check --installed
	$(BIN)/python .ci/lock.py pipcheck

lab: install   ## JupyterLab on 127.0.0.1 (LAB_PORT, default 8888; the next free one if taken), opened at nbs/index.ipynb
	$(BIN)/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser --ServerApp.root_dir=$(CURDIR) \
	  --MappingKernelManager.default_kernel_name=$(KERNEL) --LabApp.default_url=/lab/tree/nbs/index.ipynb \
	  --LabApp.extension_manager=readonly $(if $(filter 0,$(shell id -u)),--allow-root,)

docs: install   ## build the docs site into _docs/ (structure from _quarto.yml; see .ci/docs.py); view: python -m http.server -b 127.0.0.1 -d _docs
	$(BIN)/python .ci/docs.py

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

# Every notebook executed as nbdev_test executes it (same shell, skip rules and flags), in a home of its own. `nbtest`
# compares the fresh outputs with the committed ones (cells tagged `volatile` excepted) and fails on a difference;
# `nbs` writes them into the notebooks (charts as PNG through kaleido + headless Chromium), then nbdev_clean.
NB_ENV = TRADER_HOME=$(CURDIR)/.test-home/nbs TRADER_REPORTS=$(CURDIR)/.test-home/reports

nbtest: install
	@rm -rf .test-home/nbs .test-home/reports
	$(NB_ENV) $(BIN)/python .ci/nbrun.py check $(NB)

nbs: install   ## re-execute the notebooks in place and store their outputs (NB="nbs/01_data.ipynb ..." for some)
	@rm -rf .test-home/nbs .test-home/reports
	$(NB_ENV) $(BIN)/python .ci/nbrun.py write $(NB)
	$(BIN)/nbdev_clean

# pytest-xdist: 3 workers, a module's tests on one worker (its module fixtures built once), the long modules first (tests/conftest.py).
# Most of the suite waits on subprocesses, servers and simulated clocks, so 3 workers beat 2 on the 2-core CI machine.
PYTEST_WORKERS ?= 3
pytest: install
	$(BIN)/python -m pytest tests/ -q -n $(PYTEST_WORKERS) --dist loadfile --durations=20

test: install   ## set PG=1 to start a throwaway PostgreSQL for the PostgreSQL tests
	@rm -rf .test-home
	$(MAKE) --no-print-directory lock-check
	$(MAKE) --no-print-directory sync-check
	$(MAKE) --no-print-directory clean-check
	$(BIN)/lint-imports   # the layer contracts in pyproject.toml: imports point down only (ops > live > research > core)
	$(MAKE) --no-print-directory nbtest
	@if [ "$(PG)" = "1" ] && [ -z "$$TRADER_TEST_PG_URL" ]; then \
	  .ci/with-postgres $(MAKE) --no-print-directory pytest; else $(MAKE) --no-print-directory pytest; fi

power: install   ## the power study (not in CI; tens of minutes): the default experiment on a strong-edge, a weak-edge and 10 null synthetic markets; POWER_ARGS="--nulls 3 --steps 20000" for a quicker look
	$(BIN)/trader power $(POWER_ARGS)

bench: install   ## every benchmark runs and prints its figures; then a non-zero exit naming each one that missed a target or failed
	@missed=""; for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || missed="$$missed $$b"; done; \
	if [ -n "$$missed" ]; then echo "bench: missed a target or failed:$$missed"; exit 1; fi; echo "bench: every benchmark ran (each figure is printed beside its target)"

clean:
	rm -rf .test-home .pytest_cache _docs _docs_src
