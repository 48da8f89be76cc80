# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing. Without CUDA we install the CPU build of torch first
# (a bare `torch` would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
DEMO_DIR := out/demo

.PHONY: demo test test-fast venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e ".[dev,quantize]"
	touch $@

# The demo: build the sorting data, train a tiny model with DPO + prefix sharing on CPU, then run the
# first DEMO_COMPARE_STEPS steps again with sharing off and print the side-by-side numbers and curves,
# then a short summary (speed-up measured and ideal, held-out accuracy, the plot). About 4 minutes on 2 cores.
DEMO_RECORDS ?= 1000
DEMO_STEPS ?= 60
DEMO_COMPARE_STEPS ?= 8

demo: venv
	@echo "demo: 1/5 writing $(DEMO_RECORDS) sorting records"
	rm -rf $(DEMO_DIR)
	@mkdir -p $(DEMO_DIR) && date +%s > $(DEMO_DIR)/started
	$(PY) tools/make_demo_data.py --output $(DEMO_DIR)/demo.jsonl --records $(DEMO_RECORDS)
	@echo "demo: 2/5 building the dataset (byte tokenizer, rows of 2048 tokens)"
	$(PY) tools/build_dataset.py --input $(DEMO_DIR)/demo.jsonl --tokenizer byte \
	    --output $(DEMO_DIR)/data --max-unit-tokens 1024 --pack-tokens 2048
	@echo "demo: 3/5 training $(DEMO_STEPS) steps with prefix sharing (reference log-probs first)"
	$(PY) launch/train_dpo.py --config configs/demo-cpu.yaml train.max_steps=$(DEMO_STEPS)
	@echo "demo: 4/5 the first $(DEMO_COMPARE_STEPS) steps again without sharing, to measure the speed-up"
	$(PY) launch/train_dpo.py --config configs/demo-cpu.yaml train.max_steps=$(DEMO_STEPS) \
	    train.exit_interval=$(DEMO_COMPARE_STEPS) data.layout=unshared checkpoint.dir=$(DEMO_DIR)/run-unshared \
	    checkpoint.interval=0 logging.interval=2 train.eval_interval=0
	@echo "demo: 5/5 comparing and plotting"
	$(PY) tools/compare_runs.py $(DEMO_DIR)/run-shared $(DEMO_DIR)/run-unshared --json $(DEMO_DIR)/compare.json
	$(PY) tools/plot_metrics.py $(DEMO_DIR)/run-shared $(DEMO_DIR)/run-unshared --labels shared unshared \
	    --output $(DEMO_DIR)/curves.png
	@$(PY) tools/demo_summary.py $(DEMO_DIR)/run-shared $(DEMO_DIR)/run-unshared --plot $(DEMO_DIR)/curves.png \
	    --seconds $$(( $$(date +%s) - $$(cat $(DEMO_DIR)/started) ))

test: venv
	$(PY) -m pytest -q -x -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest -q -m "not dist and not slow"

clean:
	rm -rf $(VENV) out
