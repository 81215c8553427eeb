# tvr-bench: `make bench` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
METHOD ?= clip4clip
DATA ?= synthetic
SEED ?= 0
SEEDS ?= $(SEED)
ARGS ?=
TVR := $(VENV)/bin/tvr-bench
RECIPES = --config recipes/base.yaml --config recipes/methods/$(METHOD).yaml --config recipes/data/$(DATA).yaml
RECIPE_EXTRA = $(wildcard recipes/methods/$(METHOD)_$(DATA).yaml)

.PHONY: install bench test test-slow test-all perf leaderboard clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip >/dev/null
	$(VENV)/bin/pip install -e '.[dev]'
	$(VENV)/bin/python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else f'torch {torch.__version__} installed, 2.13.0 required')"
	touch $@

install: $(VENV)/.installed

## Fit then test on the best checkpoint: make bench METHOD=drl DATA=synthetic SEEDS="0 1 2" ARGS="--trainer.max_epochs 2"
bench: install
	@for seed in $(SEEDS); do \
	  echo "== $(METHOD) on $(DATA), seed $$seed =="; \
	  $(TVR) bench $(RECIPES) $(if $(RECIPE_EXTRA),--config $(RECIPE_EXTRA)) \
	    --seed_everything $$seed --trainer.default_root_dir runs/$(METHOD)/$(DATA)/seed$$seed $(ARGS) || exit $$?; \
	done

test: install
	$(VENV)/bin/python -m pytest -q

test-slow: install
	$(VENV)/bin/python -m pytest -q -m slow

test-all: install
	$(VENV)/bin/python -m pytest -q -m "slow or not slow"

perf: install
	$(TVR) perf --out runs/perf.json

leaderboard: install
	$(TVR) leaderboard --runs runs

clean:
	rm -rf runs lightning_logs .pytest_cache
