# attention-edit: the project's entry points. On a fresh machine each target sets itself up.
PY      := .venv/bin/python
PORT    ?= 8188
DEVICE  ?= cpu
PYTEST_ARGS ?=

.PHONY: setup browser demo test lint unit serve bench clean

setup:
	@bash scripts/bootstrap.sh

browser: setup
	@bash scripts/bootstrap.sh --browser

demo: setup
	@$(PY) scripts/demo.py

lint: setup
	$(PY) -m ruff check .

test: setup browser lint
	$(PY) -m pytest $(PYTEST_ARGS)

serve: setup
	$(PY) scripts/serve.py --port $(PORT)

bench: setup
	$(PY) -m bench.run --device $(DEVICE)

clean:
	rm -rf out build .pytest_cache .ruff_cache
