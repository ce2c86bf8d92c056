#!/usr/bin/env bash
# One prepared GPU check (issue 15): the CUDA path (parts correct, fused) and the paper-shape step.
#
#   bash bench/gpu_check.sh --wheels gpu_wheels --out "$OUT"      # on the machine with one GPU
#   bash bench/gpu_check.sh --help                                 # every option
#
# Runs from the repository root, needs no network. --wheels DIR: the pure-Python packages the GPU
# machine lacks (megatron-core, the tokenizer data packages), downloaded beforehand with
# bench/gpu_wheels.sh; installed with pip --no-index --no-deps into a temp folder that goes on
# PYTHONPATH together with the repo root. Exit codes: 0 every check passed (aims never fail the
# run), 1 some check failed, 2 usage error, 3 no CUDA, 4 bad --wheels folder or install, 5 the
# whole run overran its hard time limit, 7 nothing failed but a part was stopped by its time box
# (TIMEOUT). Budget 310 s; the device call's timeout_s: 350. Python: $PYTHON, else python3.
# See docs/gpu_check.md.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# 1. arguments and CUDA, in seconds: no megatron import, no install
"$PY" bench/gpu_check.py --preflight "$@" || exit $?

# 2. wheels (the argument was validated by the preflight; take its value here)
WHEELS=""
prev=""
for a in "$@"; do
  case "$a" in
    --wheels=*) WHEELS="${a#--wheels=}" ;;
    *) [ "$prev" = "--wheels" ] && WHEELS="$a" ;;
  esac
  prev="$a"
done
SITE=""
if [ -n "$WHEELS" ]; then
  SITE="${XTOKEN_GPU_CHECK_SITE:-${TMPDIR:-/tmp}/xtoken-gpu-check-site}"
  rm -rf "$SITE" && mkdir -p "$SITE" || { echo "gpu_check: cannot create $SITE" >&2; exit 4; }
  shopt -s nullglob
  whls=("$WHEELS"/*.whl)
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
       --target "$SITE" "${whls[@]}" >"$SITE.pip.log" 2>&1; then
    echo "gpu_check: pip install of $WHEELS/*.whl failed: $(tail -n 1 "$SITE.pip.log")" >&2
    exit 4
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
  export XTOKEN_GPU_CHECK_SITE="$SITE"
fi

# 3. the check itself
exec "$PY" bench/gpu_check.py "$@"
