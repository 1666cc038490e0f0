# `make demo` and `make test` each work alone on a fresh machine: they create .venv and install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test bench-cpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python -m fmjax.demo

# Two workers, each test file on one of them (its module fixtures run once): 5 to 10 minutes on 2 cores.
TEST_WORKERS ?= 2
test: install-test
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=15

bench-cpu: install
	$(BIN)/fmjax bench --config=configs/gpt.py:tiny --steps=20

clean:
	rm -rf $(VENV) build *.egg-info
