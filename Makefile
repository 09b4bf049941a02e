# cmunet — two commands: `make setup` (once) and `make test` / `make demo`.
#
# CPU machines get the CPU build of torch (no CUDA download). On a GPU machine:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cmunet-installed

.PHONY: setup test demo bench gpu-check clean

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

# on a GPU machine: 2 pre-training steps (bf16, NCCL on several GPUs), a fine-tune, a search
# trial and a segmentation; prints throughput and whether bf16 is active (exits 0 without a GPU)
gpu-check: setup
	$(PY) bench/gpu_smoke.py

clean:
	rm -rf $(VENV) demo runs
