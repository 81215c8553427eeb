# tvr-bench: `make bench` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
METHOD ?= clip4clip
DATA ?= synthetic
PROFILE ?=
# PROFILE=paper: the reference's seed (recipes/profiles/paper_<m>.yaml) unless SEED is given; unset: 0
PROFILE_SEED = $(if $(PROFILE),$(shell sed -n 's/^seed_everything: *\([0-9][0-9]*\).*/\1/p' recipes/profiles/$(PROFILE)_$(METHOD).yaml 2>/dev/null))
SEED ?= $(or $(PROFILE_SEED),0)
SEEDS ?= $(SEED)
ARGS ?=
# ROOT=<dir>: the prepared shards to read (data.init_args.root), e.g. DATA=custom ROOT=data/my-videos
ROOT ?=
TVR := $(VENV)/bin/tvr-bench
RECIPES = --config recipes/base.yaml --config recipes/methods/$(METHOD).yaml --config recipes/data/$(DATA).yaml
RECIPE_EXTRA = $(wildcard recipes/methods/$(METHOD)_$(DATA).yaml)
# PROFILE=<p> stacks recipes/profiles/<p>.yaml and <p>_<method>.yaml last; `paper` adds the reference selection
PROFILE_LAYERS = $(if $(PROFILE),recipes/profiles/$(PROFILE).yaml $(wildcard recipes/profiles/$(PROFILE)_$(METHOD).yaml) $(if $(filter paper,$(PROFILE)),recipes/selection/reference_$(METHOD).yaml))
PROFILES := $(strip $(foreach p,$(basename $(notdir $(wildcard recipes/profiles/*.yaml))),$(if $(findstring _,$(p)),,$(p))))

DATASETS := $(basename $(notdir $(wildcard recipes/data/*.yaml)))
# the built-in methods: recipes/methods/<m>.yaml without the per-dataset layers <m>_<dataset>.yaml (tvr_bench/recipes.py)
METHODS := $(sort $(filter-out $(foreach d,$(DATASETS),%_$(d)),$(basename $(notdir $(wildcard recipes/methods/*.yaml)))))

.PHONY: install bench check-names test test-slow test-all perf leaderboard compare clean zero-shot synthetic-table

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	$(VENV)/bin/python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else f'torch {torch.__version__} installed, 2.13.0 required')"
	touch $@

install: $(VENV)/.installed

## Fit then test on the best checkpoint: make bench METHOD=drl DATA=synthetic SEEDS="0 1 2" ARGS="--trainer.max_epochs 2"
## Reproduce a paper's setting: make bench METHOD=xpool DATA=msrvtt PROFILE=paper (recipes/profiles/paper.yaml)
check-names:
	@case " $(METHODS) " in *" $(METHOD) "*) ;; *) echo "error: unknown METHOD '$(METHOD)'; choose one of: $(METHODS)" >&2; exit 2;; esac
	@case " $(DATASETS) " in *" $(DATA) "*) ;; *) echo "error: unknown DATA '$(DATA)'; choose one of: $(DATASETS)" >&2; exit 2;; esac
	@if [ -n "$(PROFILE)" ]; then case " $(PROFILES) " in *" $(PROFILE) "*) ;; *) echo "error: unknown PROFILE '$(PROFILE)'; choose one of: $(PROFILES)" >&2; exit 2;; esac; fi
	@if [ "$(PROFILE)" = paper ] && [ "$(DATA)" = synthetic ]; then echo "error: PROFILE=paper reproduces published numbers (pretrained CLIP ViT-B/32, 224 px) on a real benchmark; DATA=synthetic has none: choose one of $(filter-out synthetic,$(DATASETS))" >&2; exit 2; fi

# The synthetic recipes' pretrained backbone (`tvr-bench pretrain`, data_cards/synthetic.md): built once when missing
SYNTH_BACKBONE := data/synthetic-default/tiny-pretrained
$(SYNTH_BACKBONE)/config.json: tvr_bench/pretrain.py | $(VENV)/.installed
	$(TVR) pretrain --size default --out $(SYNTH_BACKBONE) && touch $@

bench: check-names install $(if $(filter synthetic,$(DATA)),$(if $(filter scratch,$(PROFILE)),,$(SYNTH_BACKBONE)/config.json))
	@for seed in $(SEEDS); do \
	  echo "== $(METHOD) on $(DATA), seed $$seed =="; \
	  $(TVR) bench $(RECIPES) $(foreach f,$(RECIPE_EXTRA) $(PROFILE_LAYERS),--config $(f)) \
	    --seed_everything $$seed --trainer.default_root_dir runs/$(METHOD)/$(DATA)/$(if $(PROFILE),$(PROFILE)/)seed$$seed $(if $(ROOT),--data.init_args.root $(ROOT)) $(ARGS) || exit $$?; \
	done

test: install
	$(VENV)/bin/python -m pytest -q

test-slow: install
	$(VENV)/bin/python -m pytest -q -m slow; rc=$$?; [ $$rc -eq 5 ] && echo "no slow tests" || exit $$rc

test-all: install
	$(VENV)/bin/python -m pytest -q -m "slow or not slow"

perf: install
	$(TVR) perf --out runs/perf.json

leaderboard: install
	$(TVR) leaderboard --runs runs

## The pretrained synthetic backbone's zero-shot row (CLIP4Clip meanP on its weights, no training): make zero-shot
zero-shot: install $(SYNTH_BACKBONE)/config.json
	$(TVR) test --config recipes/base.yaml --config recipes/methods/clip4clip.yaml --config recipes/data/synthetic.yaml \
	  --seed_everything 0 --trainer.default_root_dir runs/zero-shot/synthetic/seed0 $(ARGS)

## The README's synthetic table: the zero-shot row, then TABLE_SEEDS for every built-in method (TABLE_METHODS), with
## the temporal probes, then the leaderboard (runs/leaderboard.md, leaderboard_diagnostics.png): make synthetic-table.
## Each seed also seeds the training order (data.init_args.seed; else CLIP4Clip meanP, which has no new layer to
## initialise, trains three times on the same batches to the same weights).
TABLE_SEEDS ?= 0 1 2
TABLE_METHODS ?= $(METHODS)
synthetic-table: install $(SYNTH_BACKBONE)/config.json
	$(MAKE) zero-shot ARGS="--evaluator.probes all $(ARGS)"
	@for m in $(TABLE_METHODS); do for seed in $(TABLE_SEEDS); do \
	  $(MAKE) bench METHOD=$$m DATA=synthetic SEEDS=$$seed ARGS="--data.init_args.seed $$seed --evaluator.probes all $(ARGS)" || exit $$?; \
	done; done
	$(TVR) leaderboard --runs runs

## Paired comparison of two runs on the same test set: make compare A=runs/drl/synthetic/seed0 B=runs/clip4clip/synthetic/seed0
compare: install
	@if [ -z "$(A)" ] || [ -z "$(B)" ]; then echo "error: give two runs: make compare A=RUN_DIR_OR_RESULT_JSON B=RUN_DIR_OR_RESULT_JSON" >&2; exit 2; fi
	$(TVR) compare $(A) $(B)

clean:
	rm -rf runs lightning_logs .pytest_cache
