# The verbs a user types. `make report` sets up .venv on first use, then runs the whole report.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= synthetic
# torch/torchvision: any release in the pyproject ranges; this pin matches the wheels tested here.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup report options demo pack lint test test-all bench bench-deploy gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

report: setup  ## the whole report for DATA (synthetic | tiny | isic2016 | isic2017 | isic2018, each real one with a _holdout form); SET='seeds=[0,1,2]' overrides
	$(PY) -m isic_utils report --data $(DATA) $(if $(SET),--set $(SET))

options: setup  ## what each generalisation option of task 3 buys, three seeds each (DATA=, EPOCHS= optional); the comparison shows it
	$(PY) -m isic_utils options --data $(DATA) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(SET),--set $(SET))

demo: setup  ## the smallest end-to-end run (tiny profile: every chapter, tasks 1-3, about two minutes)
	$(PY) -m isic_utils report --data tiny

pack: setup $(if $(WITH_MODEL),web/node_modules/.package-lock.json)  ## the finished report for DATA as one zip to hand over (pages, tables, figures; no checkpoints); WITH_MODEL=1 adds the page that segments the reader's image
	$(PY) -m isic_utils pack --data $(DATA) $(if $(WITH_MODEL),--with-model)

# onnxruntime-web (from npm) for pack --with-model's page: the versions web/package-lock.json pins
web/node_modules/.package-lock.json: web/package-lock.json
	npm ci --prefix web --no-audit --no-fund

# Two test processes of one compute thread each (tests/conftest.py), a file per process: a third faster on two cores.
# The fast tier takes the files as xdist orders them (most tests first); the whole suite in the order
# tests/conftest.py gives them (the slow tier's report is built first, the files that wait for it last).
TEST_JOBS ?= 2
PYTEST := $(PY) -m pytest -q --durations=15 $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)
IN_ORDER := $(if $(filter-out 1,$(TEST_JOBS)),--no-loadscope-reorder)

lint: setup  ## ruff: the lint rules and the formatting, over the package, tests, tools and notebooks
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint  ## every behaviour, fast (the inner loop): lint, then all tests but the slow end-to-end tier (TEST_JOBS=1: one process)
	$(PYTEST) -m "not slow"

test-all: lint  ## everything, the slow end-to-end runs included (papermill chapters, the GPU-check rehearsal): what CI runs
	$(PYTEST) $(IN_ORDER)

bench: setup  ## speed benchmark: naive vs this project's pipeline, same data, one run
	$(PY) benchmarks/bench_training.py

bench-deploy: setup  ## what running a model costs: PyTorch eager vs ONNX Runtime fp32 and int8, one thread, one run (CHECKPOINTS= optional)
	$(PY) benchmarks/bench_deploy.py $(CHECKPOINTS)

# Where python3 already has torch and nothing can be installed (a GPU server, Colab): make -o setup gpu-check PY=python3
gpu-check: setup  ## prove the CUDA path (tools/gpu_check.py); says so and exits 0 without a GPU. DATA_DIR=, WEIGHTS=, EPOCHS= optional
	$(PY) tools/gpu_check.py $(if $(DATA_DIR),--data $(DATA_DIR)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(EPOCHS),--epochs $(EPOCHS))

clean:
	rm -rf outputs
