# Two commands from a fresh clone, each self-contained:
#   make demo   set up .venv (if needed) and run the worked example (teacher, then 4 schedules x 4 seeds)
#   make test   set up .venv (if needed), then ruff, mypy and the test suite
# .venv is made with $(PYTHON); the CPU build of torch goes in first (TORCH_PIP_ARGS, e.g.
# "--index-url https://download.pytorch.org/whl/cpu", chooses where from), then the project with its dev extras.
# It is set up again when pyproject.toml changes. DEMO_ARGS go to the demo, e.g. make demo DEMO_ARGS="--seeds 3".

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: demo test venv

demo: $(VENV)/.installed
	$(PY) -m examples.segmentation demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $@
