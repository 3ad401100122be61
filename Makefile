# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= build/demo

.PHONY: venv test lint demo model evaluate bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch comes first so that nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(PY) scripts/demo.py --out $(DEMO_DIR)

model: $(STAMP)
	MKL_CBWR=AVX2 $(PY) scripts/make_model.py

evaluate: $(STAMP)
	$(PY) scripts/evaluate_model.py

bench: $(STAMP)
	$(PY) benchmarks/bench_detect.py

clean:
	rm -rf build $(VENV) .pytest_cache
