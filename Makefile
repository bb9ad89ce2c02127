# onnxprune: fresh-machine entry points.
#
#   make demo        venv + `.[cpu,torch]`, the README's quick start: info, prune + recover, bench (into build/)
#   make test        venv + `.[test]` (torch==2.14.1, torchvision==0.29.1 pinned there), whole suite
#   make test-fast   the same without the tests marked slow
#   make lint        venv + `.[test]`, ruff (lint and import order, configured in pyproject.toml)
#   make bench       venv + `.[test,bench]`, tools/bench_core.py (ResNet-50 vs Torch-Pruning / onnxsim)
#   make clean       build outputs and caches (keeps .venv); `make distclean` also removes .venv
#
# The venv is set up once: each extra has a stamp file in .venv that depends on
# pyproject.toml, so pip runs again only when pyproject.toml changes (or the
# venv's interpreter no longer starts, e.g. after a Python upgrade: then the
# venv is recreated). Variables: PYTHON (interpreter that creates the venv),
# VENV, JOBS (pytest-xdist workers; 0 = no xdist), PYTEST_ARGS, BENCH_ARGS.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= --disable-pip-version-check --progress-bar off
JOBS ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=
BUILD := build

.PHONY: demo test test-fast lint bench clean distclean venv

# $(call install_extras,EXTRAS): (re)create the venv when missing or broken, then
# install the package editable with EXTRAS, then touch the stamp ($@).
define install_extras
	@if ! "$(PY)" -c 'import sys' >/dev/null 2>&1; then \
	  echo "make: creating $(VENV) with $(PYTHON) -m venv"; \
	  rm -rf "$(VENV)"; \
	  "$(PYTHON)" -m venv "$(VENV)"; \
	  "$(PY)" -m pip install $(PIP_FLAGS) --quiet --upgrade pip; \
	fi
	@echo "make: pip install -e '.[$(1)]' into $(VENV) (only when pyproject.toml changes)"
	@start=$$(date +%s); \
	"$(PY)" -m pip install $(PIP_FLAGS) --quiet -e '.[$(1)]'; \
	echo "make: venv ready with [$(1)] in $$(( $$(date +%s) - start )) s"
	@touch "$@"
endef

# $(call run_pytest,ARGS): pytest exits 5 when it collected no tests; that is
# reported and kept as a failure (a run that tested nothing is not a pass).
define run_pytest
	@xdist=""; if [ "$(JOBS)" != "0" ]; then xdist="-n $(JOBS)"; fi; \
	rc=0; "$(PY)" -m pytest $$xdist -ra $(1) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  echo "make: pytest collected no tests (exit 5): failing, since a run that tests nothing is not a pass" >&2; \
	fi; \
	exit $$rc
endef

$(VENV)/.stamp-demo: pyproject.toml
	$(call install_extras,cpu$(comma)torch)

$(VENV)/.stamp-test: pyproject.toml
	$(call install_extras,test)

$(VENV)/.stamp-bench: pyproject.toml
	$(call install_extras,test$(comma)bench)

comma := ,

venv: $(VENV)/.stamp-test

# The README's quick start, command for command (tests/test_docs.py checks they are the same).
DEMO_OUT := $(BUILD)/digits.pruned.onnx
demo: $(VENV)/.stamp-demo
	@mkdir -p $(BUILD) && rm -f $(DEMO_OUT)
	$(VENV)/bin/onnxprune info models/digits_cnn.onnx
	$(VENV)/bin/onnxprune models/digits_cnn.onnx --structured 0.4 --provider cpu --data models/digits_train.npz --distill --finetune --epochs 20 --lr 0.003 --max-accuracy-drop 2 -o $(DEMO_OUT)
	$(VENV)/bin/onnxprune bench models/digits_cnn.onnx $(DEMO_OUT) --batch 1,256

test: $(VENV)/.stamp-test
	$(call run_pytest,)

test-fast: $(VENV)/.stamp-test
	$(call run_pytest,-m "not slow")

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check onnxprune tests tools

bench: $(VENV)/.stamp-bench
	$(PY) -m tools.bench_core $(BENCH_ARGS)

clean:
	rm -rf $(BUILD) dist .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name '*.pruned.onnx' -type f -exec rm -f {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
