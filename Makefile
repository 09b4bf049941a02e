# cmunet — two commands: `make setup` (once) and `make test` / `make demo`.
#
# CPU machines get the CPU build of torch (no CUDA download). On a GPU machine:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cmunet-installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all,dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) launch/demo.py $(DEMO_ARGS)

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo runs
