# sparseft: `make demo` and `make test` each do the whole set-up on a fresh machine.
# The virtual environment lives at .venv in the repo root. On a GPU machine, see the README (TORCH=...).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build by default; override with the build for your CUDA version, e.g. make install TORCH="torch==2.13.0".
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[deepspeed,test]'
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/make_tiny_model.py --out demo/tiny-llama --corpus recipes/data/arith_train.jsonl
	$(BIN)/sparseft train recipes/quickstart.yaml --overwrite
	$(BIN)/sparseft export runs/quickstart --merged demo/quickstart-merged
	$(BIN)/sparseft eval demo/tiny-llama --data recipes/data/arith_val.jsonl --form completion --json demo/eval-base.json
	$(BIN)/sparseft eval demo/quickstart-merged --data recipes/data/arith_val.jsonl --form completion \
		--json demo/eval-tuned.json --fail-over perplexity=2.5

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs demo .pytest_cache
