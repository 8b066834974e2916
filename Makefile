# attention-edit: the project's entry points. On a fresh machine each target sets itself up.
# HOST=dev (default): ComfyUI 0.33.0 from ../shared/hosts when it is there, else a 0.3.75 tree from
# PyPI; HOST=0.3.75 (or another version with a tarball there): that release, in its own venv;
# ATTN_EDIT_HOST=/path/to/ComfyUI: any tree you have (scripts/bootstrap.sh).
HOST    ?= dev
VENV    ?= $(if $(filter dev,$(HOST)),.venv,.venv-$(HOST))
PY      := $(VENV)/bin/python
PORT    ?= 8188
DEVICE  ?= cpu
PYTEST_ARGS ?=

.PHONY: setup browser demo test lint unit serve bench clean

setup:
	@ATTN_EDIT_VENV=$(VENV) bash scripts/bootstrap.sh $(HOST)

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
