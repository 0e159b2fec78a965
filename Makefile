# dsrna_dist: install from nothing, run the offline main job, run the tests.
#   make demo   search -> retrain -> attack + certify -> report on Fashion-MNIST, 2 CPU ranks
#   make test   the default test suite (CPU only)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dataset-fashion-mnist pkg-config libopencv-dev libturbojpeg0-dev g++ ninja-build
EXTRAS ?= test,deepspeed,attacks,ffcv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
METHOD ?= jacobian

.PHONY: install system-packages demo test test-all compare clean

install: $(VENV)/.installed

system-packages:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml | system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# test-only independent attack reference; --no-deps: its requests pin clashes, and it never imports requests
	$(PIP) install -q --no-deps torchattacks==3.5.1
	touch $@

demo: install
	METHOD=$(METHOD) PY=$(PY) bash launch/demo.sh

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

compare: install
	$(PY) bench/compare.py

clean:
	rm -rf runs/demo* report/
