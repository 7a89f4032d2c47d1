# One command sets up a fresh clone and runs the tests: `make test`.
# torch is installed first as `pip install $(TORCH_SPEC)`: which build that is depends on pip's indexes. Plain PyPI
# gives a CPU build on macOS/Windows but its CUDA build on Linux x86_64; a CPU build anywhere:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# a CUDA build (the cuXYZ that pytorch.org lists for your driver):
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The oldest peft we support (pyproject says peft>=0.18.1,<0.22); the venv holds the newest.
PEFT_MIN ?= 0.18.1
BIN := $(VENV)/bin
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast test-peft-min test-slow test-all train pretrain benchmarks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test,data]"
	touch $@

install: $(VENV)/.installed

## The default test run (well under 10 minutes on 2 CPU cores), then the peft lower bound.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-peft-min

## The rankmoe_peft tests again with the oldest supported peft, installed beside the venv (not into it).
.peft-min-$(PEFT_MIN)/peft: | install
	$(BIN)/python -m pip install --quiet --no-deps --target .peft-min-$(PEFT_MIN) peft==$(PEFT_MIN)

test-peft-min: .peft-min-$(PEFT_MIN)/peft
	PYTHONPATH=$(CURDIR)/.peft-min-$(PEFT_MIN) $(BIN)/python -c "import peft; assert peft.__version__ == '$(PEFT_MIN)', peft.__version__; print('peft', peft.__version__)"
	PYTHONPATH=$(CURDIR)/.peft-min-$(PEFT_MIN) $(BIN)/python -m pytest tests/test_rankmoe.py tests/test_rankmoe_perf.py tests/test_backbones.py tests/test_search.py $(PYTEST_ARGS)

## Slow tests: end-to-end training runs, two processes, kill and resume.
test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

## Train one model jointly on the four synthetic tasks (under 10 minutes on 2 CPU cores); TRAIN_ARGS adds flags.
TRAIN_ARGS ?=
TRAIN_THREADS ?= $(shell nproc 2>/dev/null || echo 2)
train: install
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process $(TRAIN_THREADS) --mixed_precision no --dynamo_backend no examples/train_unistd.py $(TRAIN_ARGS)

## Stage one: MAE-pretrain the shipped backbone unistd_hf/pretrained/clip-mae-tiny on the images bundled with
## scikit-image/scikit-learn (about 10 minutes on one CPU thread; see docs/PRETRAINING.md). PRETRAIN_ARGS adds flags.
PRETRAIN_ARGS ?=
PRETRAIN_DIR ?= outputs/pretrain/clip-mae-tiny
pretrain: install
	OMP_NUM_THREADS=1 $(BIN)/python -m unistd_hf.pretrain --output_dir $(PRETRAIN_DIR) --export_dir unistd_hf/pretrained/clip-mae-tiny --seed 0 --num_threads 1 $(PRETRAIN_ARGS)

benchmarks: install
	$(BIN)/python benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) .peft-min-* build *.egg-info
