# cmunet — two commands: `make setup` (once) and `make test` / `make demo`.
#
# torch: tools/torch_spec.py picks the pip arguments. A GPU machine gets torch==$(TORCH_VERSION)
# from the configured index (PyPI: the CUDA build). A CPU machine gets the CPU build without any
# CUDA download: as configured when pip here already resolves torch to a CPU wheel (a pip config
# or $PIP_INDEX_URL / $PIP_FIND_LINKS pointing at CPU wheels), else from $(TORCH_CPU_INDEX).
# Or choose yourself:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   make setup TORCH_CPU_INDEX=https://mirror.example/whl/cpu
PYTHON ?= python3
VENV   ?= .venv
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH  ?=
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cmunet-installed

.PHONY: setup test test-fast demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	spec='$(TORCH)'; test -n "$$spec" || \
	    spec=$$($(PY) tools/torch_spec.py $(TORCH_VERSION) --cpu-index '$(TORCH_CPU_INDEX)') || exit 1; \
	echo "pip install $$spec"; \
	$(PY) -m pip install --quiet --disable-pip-version-check $$spec
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all,dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the suite without the tests marked slow (the real DeepSpeed / torchrun / Ray / MLflow-server
# jobs, the study and the demo); PYTEST_ARGS passes options to pytest, as for `make test`
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

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
