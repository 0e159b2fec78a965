# dsrna_dist: install from nothing, run the offline main job, run the tests.
#   make demo               search -> retrain -> attack + certify -> report on Fashion-MNIST, 2 CPU ranks
#   make test               the default test suite (CPU only)
#   make install-ffcv       optional: FFCV loaders (+ OpenCV / libjpeg-turbo system packages, a C++ build)
#   make install-deepspeed  optional: DeepSpeed ZeRO engine for train (+ g++ / ninja for its ops)
# `make demo` and `make test` install only the lean set (torch, the package, its test and attack
# extras); FFCV and DeepSpeed tests skip when those are absent. `.ci/run` installs both and runs them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# no pip wheel cache: the CUDA build of torch pulls ~3 GB of nvidia-* wheels from PyPI, and caching
# them doubled the install's disk use (a CI box once ran out of space mid-install)
export PIP_NO_CACHE_DIR ?= 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dataset-fashion-mnist
APT_FFCV := pkg-config libopencv-dev libturbojpeg0-dev g++
APT_DEEPSPEED := g++ ninja-build
EXTRAS ?= test,attacks
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# e.g. https://download.pytorch.org/whl/cpu: the CPU-only wheels (no nvidia-* CUDA packages, GBs smaller)
TORCH_INDEX ?=
METHOD ?= jacobian
# pytest-xdist workers for `make test` (0: one process). Each test module runs whole on one worker
# (its module fixtures built once); multi-rank launches pick free ports, so workers never collide.
# On the 2-core CI box 2 workers were slower than 1 (21.4 vs 18.3 min: the multi-rank tests
# already use both cores, and two torch workloads side by side ran ~2x slower each), so 0 there;
# `make test TEST_WORKERS=auto` on a machine with more cores.
TEST_WORKERS ?= 0

.PHONY: install install-ffcv install-deepspeed install-all system-packages demo test test-all compare grid clean

install: $(VENV)/.installed

# apt-get only what is missing (no-op when every package is installed); $(2): extra apt flags
define apt_install
	@if ! dpkg -s $(1) >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(2) $(1); \
	fi
endef

system-packages:
	$(call apt_install,$(APT_PACKAGES),--no-install-recommends)

$(VENV)/.installed: pyproject.toml | system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# test-only independent attack reference; --no-deps: its requests pin clashes, and it never imports requests
	$(PIP) install -q --no-deps torchattacks==3.5.1
	touch $@

install-ffcv: $(VENV)/.installed-ffcv
$(VENV)/.installed-ffcv: pyproject.toml $(VENV)/.installed
	$(call apt_install,$(APT_FFCV))
	$(PIP) install -q -e ".[$(EXTRAS),ffcv]"
	touch $@

install-deepspeed: $(VENV)/.installed-deepspeed
$(VENV)/.installed-deepspeed: pyproject.toml $(VENV)/.installed
	$(call apt_install,$(APT_DEEPSPEED),--no-install-recommends)
	$(PIP) install -q -e ".[$(EXTRAS),deepspeed]"
	# DeepSpeed's CPU backend JIT-compiles its shared-memory comm op on first use (~1-2 min on
	# 2 cores, ~/.cache/torch_extensions): build it here, not in a user's first ZeRO run or test
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

install-all: install-ffcv install-deepspeed

demo: install
	METHOD=$(METHOD) PY=$(PY) bash launch/demo.sh

test: install
	$(PY) -m pytest -q --durations=60 -n $(TEST_WORKERS) --dist loadfile

test-all: install
	$(PY) -m pytest -q -m ""

compare: install
	$(PY) bench/compare.py

grid: install
	OMP_NUM_THREADS=1 $(PY) bench/grid.py
	$(PY) bench/grid_report.py

clean:
	rm -rf runs/demo* report/
