# The two commands of the README contract: `make demo` (main job) and `make test` (all tests).
# Both set up .venv themselves on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
XTOKEN := $(VENV)/bin/xtoken

.PHONY: setup demo test bench
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(XTOKEN) audit --student llama3 --teacher qwen3 --teacher phi4mini --plot demo_out/audit.png

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/build_w.py
