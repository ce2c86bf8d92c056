# The two commands of the README contract: `make demo` (main job) and `make test` (all tests).
# Both set up .venv themselves on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
XTOKEN := $(VENV)/bin/xtoken
OUT ?= demo_out

.PHONY: setup demo test bench
setup:
	@bash scripts/setup_env.sh

# For now the demo is the vocabulary bridge: W for the Llama-3.2 student against both
# cross-tokenizer teachers, and the coverage audit that picks each teacher's loss.
demo: setup
	$(XTOKEN) build-w --student llama3 --teacher qwen3 --out $(OUT)/W_llama3_qwen3.safetensors
	$(XTOKEN) build-w --student llama3 --teacher phi4mini --out $(OUT)/W_llama3_phi4mini.safetensors
	$(XTOKEN) audit --student llama3 --teacher qwen3 --teacher phi4mini --plot $(OUT)/audit.png

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/build_w.py
