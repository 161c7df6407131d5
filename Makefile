# maxllama: `make train` and `make test` work on a fresh machine with only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PARITY_STAMP := $(VENV)/.installed-parity
CONFIG ?= experiments/tiny.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-slow bench bench-data bench-ckpt lint clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# torch + transformers, only for the tests that compare logits with the Hugging Face reference.
$(PARITY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,parity]'
	@touch $(PARITY_STAMP)

install: $(STAMP)  ## create .venv and install maxllama with its dependencies

train: $(STAMP)  ## train the default experiment; CONFIG=... and ARGS='key=value ...' change it
	$(VENV)/bin/maxllama train $(CONFIG) $(ARGS)

test: $(PARITY_STAMP)  ## the fast test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(PARITY_STAMP)  ## the long tests only
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)  ## throughput, MFU, compile time and peak memory of the tiny model
	rm -rf runs/bench/bench-tiny
	$(VENV)/bin/maxllama train experiments/bench/tiny.yaml $(ARGS)

bench-data: $(STAMP)  ## token-store preparation MB/s and packed-batch tokens/s
	$(PY) -m maxllama.data.benchmark $(ARGS)

bench-ckpt: $(STAMP)  ## checkpoint save / async-blocked / restore times (tiny and ~300M parameters)
	$(PY) -m maxllama.checkpoint.benchmark $(ARGS)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check maxllama tests

clean:
	rm -rf runs .pytest_cache
