# Two commands do all set-up on a fresh machine:
#   make train   create .venv, install (building the CUDA extension when it can), train
#                the small GPT on the built-in Shakespeare corpus
#   make test    the same install, then the test suite
#   make mutate  the curated mutation check: each tests/mutations/*.json entry must fail its tests
#                (scripts/mutate.py; MUTATE_ARGS="--only NAME" checks one)
# Options: TORCH_SPEC=torch==2.13.0 (CPU wheel), LLMKERNELS_BUILD_CUDA=0|1, MAX_JOBS=N,
#          TORCH_CUDA_ARCH_LIST="9.0a", TRAIN_ARGS="--max-steps 100", PYTEST_ARGS="-x"
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a

.PHONY: install train test mutate bench clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy ninja "setuptools>=77" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import llmkernels; print('llmkernels backends:', llmkernels.available_backends())"
	touch $@
	@echo "Installed. To put llm-train, llm-finetune, llm-generate, ... on PATH in this shell: source $(VENV)/bin/activate"

install: $(VENV)/.installed

train: install
	$(PY) -m llm.train $(TRAIN_ARGS)
	@echo "Next: source $(VENV)/bin/activate (puts llm-generate, llm-finetune, ... on PATH), then see README.md"

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

mutate: install
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

bench: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info llmkernels/_C*.so
