# pocketzo: `make demo` runs the main job on real assets, `make test` runs the tests.
# Both set up .venv first (idempotent): torch is pinned to the CPU build (a bare `torch` pulls CUDA wheels).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  ?= $(or $(POCKETZO_CACHE),$(HOME)/.cache/pocketzo)
export POCKETZO_CACHE := $(CACHE)

# The demo: SmolLM2-135M-Instruct as a prompt-based Rotten Tomatoes sentiment classifier.
DEMO_BUNDLE := bundles/smollm2-sentiment
DEMO_RUN    := runs/demo
DEMO_MODEL  := $(CACHE)/smollm2-135m-instruct
DEMO_DATA   := $(CACHE)/data/rotten_tomatoes
DEMO_EXPORT := --task classify --template "Review: {text}\nSentiment:" --labels negative,positive \
               --trainable 'norm\.weight$$' --max-length 64
DEMO_TRAIN  := --steps 400 --batch-size 16 --lr 1e-4 --eps 1e-3 --schedule linear --seed 0 --eval-every 100

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[export,plot,dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check pocketzo tests benchmarks

test: lint
	$(PY) -m pytest -q

demo: setup
	$(PY) -m pocketzo assets
	$(PY) -m pocketzo export $(DEMO_MODEL) --out $(DEMO_BUNDLE) $(DEMO_EXPORT) --overwrite
	$(PY) -m pocketzo train $(DEMO_BUNDLE) --data $(DEMO_DATA)/train.jsonl --eval $(DEMO_DATA)/dev.jsonl \
	    --out $(DEMO_RUN) $(DEMO_TRAIN) --overwrite
	@echo "summary: $(DEMO_RUN)/summary.json"

# pocketzo vs PyTorch MeZO, PyTorch AdamW and ONNX Runtime training (own venv), each in a fresh
# process; writes benchmarks/results.json and docs/benchmarks.md (+ docs/img/*.png). About 30 min.
bench: setup
	$(PY) -m pocketzo assets
	cd benchmarks && ../$(PY) run.py --cache $(CACHE)

clean:
	rm -rf $(VENV) bundles runs
