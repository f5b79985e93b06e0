# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv (if missing) and install dalle1 into it. torch is pinned
# first so that pip never pulls the multi-GB CUDA wheels on a CPU machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test install lint format clean

$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dalle1.demo --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check dalle1 tests train.py sample.py benchmarks
	$(VENV)/bin/ruff format --check dalle1 tests train.py sample.py benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format dalle1 tests train.py sample.py benchmarks
	$(VENV)/bin/ruff check --fix dalle1 tests train.py sample.py benchmarks

clean:
	rm -rf outputs data lightning_logs
