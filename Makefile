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
# first DEMO_COMPARE_STEPS steps again with sharing off and print the side-by-side numbers and curves.
DEMO_STEPS ?= 100
DEMO_COMPARE_STEPS ?= 15
demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) tools/make_demo_data.py --output $(DEMO_DIR)/demo.jsonl
	$(PY) tools/build_dataset.py --input $(DEMO_DIR)/demo.jsonl --tokenizer byte \
	    --output $(DEMO_DIR)/data --max-unit-tokens 1024 --pack-tokens 2048
	$(PY) launch/train_dpo.py --config configs/demo-cpu.yaml train.max_steps=$(DEMO_STEPS)
	$(PY) launch/train_dpo.py --config configs/demo-cpu.yaml train.max_steps=$(DEMO_STEPS) \
	    train.exit_interval=$(DEMO_COMPARE_STEPS) data.layout=unshared checkpoint.dir=$(DEMO_DIR)/run-unshared \
	    checkpoint.interval=0 logging.interval=5
	$(PY) tools/compare_runs.py $(DEMO_DIR)/run-shared $(DEMO_DIR)/run-unshared --json $(DEMO_DIR)/compare.json
	$(PY) tools/plot_metrics.py $(DEMO_DIR)/run-shared $(DEMO_DIR)/run-unshared --labels shared unshared \
	    --output $(DEMO_DIR)/curves.png

test: venv
	$(PY) -m pytest -q -x -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest -q -m "not dist and not slow"

clean:
	rm -rf $(VENV) out
