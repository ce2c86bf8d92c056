# The two commands of the README contract: `make demo` (main job) and `make test` (all tests).
# Both set up .venv themselves on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
XTOKEN := $(VENV)/bin/xtoken
OUT ?= demo_out

.PHONY: setup demo test lint bench
setup:
	@bash scripts/setup_env.sh

# The CPU demo: W + coverage audit, a room-number lookup only the teachers' corpus states, compact
# vocabularies, CE-only teachers with the Qwen3 and Phi-4-mini tokenizers, 5 seeds x the students the
# paper's claims compare (CE, GOLD, P-KL, H-KL, two teachers) and the second task (J-KL against P-KL
# and CE from Qwen3), evaluation, claims, demo_out/report.md. 5 min 4 s on 2 idle cores after set-up
# (AMD EPYC, AVX-512 machine, kernels pinned to AVX2 by the demo; 45 1-layer students x 300 steps;
# 2026-12-03).
demo: setup
	$(XTOKEN) demo --out $(OUT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff's rules and formatter (pyproject.toml [tool.ruff]); .ci/run runs this before the tests
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) bench/build_w.py
	$(PY) bench/align.py
	$(PY) bench/losses.py --chunks 256
	$(PY) bench/step.py
