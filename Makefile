# The README's two commands: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench proto clean

$(STAMP): client/pyproject.toml server/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e './client[plot,nats]' -e './server[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/writewatchd demo

lint: $(STAMP)
	$(VENV)/bin/ruff check client server tests bench
	$(VENV)/bin/ruff format --check client server tests bench
	$(VENV)/bin/mypy client/writewatch server/writewatchd

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py

proto: $(STAMP)
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) tests/fixtures/bin bench/bin
