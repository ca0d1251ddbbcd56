# Set-up lives here so that a fresh machine needs nothing but Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# DeepSpeed on CPU: no CUDA ops to build, the CPU accelerator.
export DS_BUILD_OPS := 0
export DS_ACCELERATOR ?= cpu
# glibc trims and mmaps large blocks by default; the page faults that causes cost real time here.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export RAY_AUTH_MODE ?= token
# DeepSpeed builds a small CPU op on first use; a cache per checkout stops two checkouts (different include
# paths) from invalidating each other's build in the shared ~/.cache/torch_extensions.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
PYTEST_ARGS ?=
# Unbuffered: if a test process dies, the log shows how far it got (a pipe would hold pytest's last lines).
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly: anything unpinned would pull the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	# The reference implementation, used only as a test oracle / benchmark peer (never imported by gears_dist).
	$(PY) -m pip install -q --no-deps cell-gears==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gears-dist demo --out runs/demo

# On failure, tools/diagnose.sh prints what the test log cannot show (Ray's own logs, OOM kills, memory).
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS) || { sh tools/diagnose.sh; exit 1; }

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS) || { sh tools/diagnose.sh; exit 1; }

clean:
	rm -rf runs .pytest_cache
