#!/usr/bin/env bash
# Emulate, on this CPU machine, the GPU machine we borrow, and run the prepared GPU check in it
# (issue 21: the first GPU run must not be wasted). See docs/gpu_env_check.md.
#
#   bash bench/gpu_env_check.sh                  # temp venv, removed at the end
#   bash bench/gpu_env_check.sh --keep           # keep the venv; it prints how to reuse it
#   bash bench/gpu_env_check.sh --venv DIR       # create DIR once, reuse it afterwards (kept)
#
# Phases, each timed: venv (a Python 3.12 venv: $PYTHON312, else pyenv, else PATH), install
# (bench/gpu_env_packages.txt, the image's pinned packages; skipped when a reused venv already
# holds exactly that list), wheels (bench/gpu_wheels.sh with this repo's .venv python, as a user
# would run it), check (bash bench/gpu_check.sh --allow-cpu --tiny --wheels <them> in a bare
# environment: PYTHON = the venv, an empty HOME/TMPDIR/caches, no network when `unshare -n`
# works). Exit code: the check's (0 passed, 1 a check failed, 3-5 and 7 as docs/gpu_check.md), 124 the
# check overran --timeout-s, 2 usage error, 6 the emulated environment could not be built.
# Not part of `make test`: a fresh venv downloads GBs, the check takes 15-30 min on 2 cores.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PACKAGES="bench/gpu_env_packages.txt"
EXIT_USAGE=2 EXIT_ENV=6

usage() {
  cat <<'EOF'
usage: bash bench/gpu_env_check.sh [--keep] [--venv DIR] [--out DIR] [--timeout-s S] [--help]

Emulates the borrowed GPU machine's Python environment on this CPU machine (Python 3.12 venv with
the image's pinned packages, bench/gpu_env_packages.txt; megatron-core and the tokenizer data
packages as wheels from bench/gpu_wheels.sh) and runs
  bash bench/gpu_check.sh --allow-cpu --tiny --wheels <wheels> --out <out>
in it. Prints the check's output, then its summary and the wall time of each phase.

  --keep         keep the venv (default: a temp venv, removed at the end); prints its path
  --venv DIR     use DIR as the venv: created if missing, reused (install skipped when it holds
                 exactly bench/gpu_env_packages.txt), always kept
  --out DIR      the check's gpu_check.json/.log and this script's logs (default: a new temp folder)
  --timeout-s S  kill the check after S seconds (default 7200: a safety net above the check's
                 own hard stop, budget + margin = (310 + 20) s x 20 = 6,600 s under --tiny)
  --help         this text

Python 3.12: $PYTHON312, else the newest 3.12 under pyenv, else python3.12 / python3 on PATH.
Exit: the check's code (0 passed, 1 a check failed, 3-5 and 7 see docs/gpu_check.md), 124 timeout,
2 usage error, 6 the environment could not be built (Python 3.12, venv, install or wheels).
EOF
}

die() { echo "gpu_env_check: $1" >&2; exit "${2:-$EXIT_ENV}"; }

KEEP=0 VENV="" OUT_DIR="" TIMEOUT_S=7200
while [ $# -gt 0 ]; do
  case "$1" in
    --help | -h) usage; exit 0 ;;
    --keep) KEEP=1 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder (see --help)" "$EXIT_USAGE"; VENV="$2"; KEEP=1; shift ;;
    --venv=*) VENV="${1#--venv=}"; KEEP=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder (see --help)" "$EXIT_USAGE"; OUT_DIR="$2"; shift ;;
    --out=*) OUT_DIR="${1#--out=}" ;;
    --timeout-s) [ $# -ge 2 ] || die "--timeout-s needs seconds (see --help)" "$EXIT_USAGE"; TIMEOUT_S="$2"; shift ;;
    --timeout-s=*) TIMEOUT_S="${1#--timeout-s=}" ;;
    *) die "unknown argument '$1' (see --help)" "$EXIT_USAGE" ;;
  esac
  shift
done
[[ "$TIMEOUT_S" =~ ^[1-9][0-9]*$ ]] || die "--timeout-s must be a whole number of seconds > 0, got '$TIMEOUT_S'" "$EXIT_USAGE"

BASE="${TMPDIR:-/tmp}"
WORK="$(mktemp -d "$BASE/xtoken-gpu-env-check.XXXXXX")"
OUT_MADE=0
cleanup() {
  rm -rf "$WORK"
  if [ "$OUT_MADE" = 1 ]; then rmdir "$OUT_DIR" 2>/dev/null || true; fi  # only when left empty
}
trap cleanup EXIT
if [ -z "$OUT_DIR" ]; then OUT_DIR="$(mktemp -d "$BASE/xtoken-gpu-env-out.XXXXXX")" && OUT_MADE=1; fi
mkdir -p "$OUT_DIR" || die "cannot create --out $OUT_DIR" "$EXIT_USAGE"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -z "$VENV" ]; then
  if [ "$KEEP" = 1 ]; then VENV="$(mktemp -d "$BASE/xtoken-gpu-env-venv.XXXXXX")"; else VENV="$WORK/venv"; fi
fi
mkdir -p "$(dirname "$VENV")" && VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"

T_START=$EPOCHREALTIME
declare -A SECS=()
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "[gpu_env_check] $*"; }

is_py312() { [ -x "$1" ] && "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# phase 1: venv
# ---------------------------------------------------------------------------------------------
t0=$EPOCHREALTIME
if [ -x "$VENV/bin/python" ]; then
  is_py312 "$VENV/bin/python" || die "--venv $VENV is not a Python 3.12 venv: give another folder or delete it"
  say "venv: reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
else
  if [ -e "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
    die "--venv $VENV exists and is not a venv: give an empty or new folder"
  fi
  PY312=""
  if [ -n "${PYTHON312:-}" ]; then
    is_py312 "$PYTHON312" || die "PYTHON312=$PYTHON312 is not a Python 3.12 with venv and ensurepip: point it to one"
    PY312="$PYTHON312"
  else
    cands=()
    PYENV_ROOT_DIR="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    mapfile -t found < <(ls -d "$PYENV_ROOT_DIR"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV)
    cands+=("${found[@]}")
    for name in python3.12 python3; do
      p="$(command -v "$name" 2>/dev/null || true)"
      [ -n "$p" ] && cands+=("$p")
    done
    for c in "${cands[@]}"; do
      if is_py312 "$c"; then PY312="$c"; break; fi
    done
  fi
  [ -n "$PY312" ] || die "no Python 3.12 found: install one (e.g. pyenv install 3.12) or set PYTHON312=/path/to/python3.12"
  say "venv: $("$PY312" --version 2>&1) ($PY312) -> $VENV"
  "$PY312" -m venv "$VENV" >"$OUT_DIR/gpu_env_venv.log" 2>&1 ||
    die "python -m venv $VENV failed: $(tail -n 1 "$OUT_DIR/gpu_env_venv.log") (log: $OUT_DIR/gpu_env_venv.log)"
fi
SECS[venv]=$(since "$t0")

# ---------------------------------------------------------------------------------------------
# phase 2: install the image's pinned packages
# ---------------------------------------------------------------------------------------------
t0=$EPOCHREALTIME
STAMP="$VENV/.gpu_env_packages.sha256"
WANT="$(sha256sum "$PACKAGES" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  say "install: up to date ($VENV holds exactly $PACKAGES)"
else
  LOG="$OUT_DIR/gpu_env_install.log"
  say "install: $PACKAGES into the venv (the first time several GB of torch/nvidia wheels; log: $LOG)"
  rm -f "$STAMP"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --only-binary=:all: -r "$PACKAGES" >"$LOG" 2>&1; then
    ERR="$(grep -E '^ERROR' "$LOG" | tail -n 1 || true)"
    die "installing $PACKAGES into the Python 3.12 venv failed: ${ERR:-$(tail -n 1 "$LOG")} (log: $LOG)"
  fi
  echo "$WANT" >"$STAMP"
fi
"$VENV/bin/python" -m pip freeze --all >"$OUT_DIR/gpu_env_freeze.txt" 2>/dev/null || true
if PIPCHECK="$("$VENV/bin/python" -m pip check 2>&1)"; then
  say "install: pip check: consistent"
else
  say "install: pip check: $(echo "$PIPCHECK" | tr '\n' ';' | cut -c1-400)"
fi
SECS[install]=$(since "$t0")

# ---------------------------------------------------------------------------------------------
# phase 3: the wheels the image lacks, made as a user makes them (this repo's .venv python)
# ---------------------------------------------------------------------------------------------
t0=$EPOCHREALTIME
WHEELS="$WORK/gpu_wheels"
LOG="$OUT_DIR/gpu_env_wheels.log"
env -u PYTHON bash bench/gpu_wheels.sh "$WHEELS" >"$LOG" 2>&1 ||
  die "bash bench/gpu_wheels.sh failed: $(tail -n 1 "$LOG") (log: $LOG)"
say "wheels: $(tail -n 1 "$LOG")"
SECS[wheels]=$(since "$t0")

# ---------------------------------------------------------------------------------------------
# phase 4: the check, in a bare environment like the GPU machine's
# ---------------------------------------------------------------------------------------------
t0=$EPOCHREALTIME
mkdir -p "$WORK/home" "$WORK/tmp" "$WORK/check"
# nothing from this machine's environment or caches (HF hub, tiktoken's cache in $TMPDIR, pip
# settings, PYTHONPATH) may help the check: the GPU machine has none of them
CHECK_ENV=(
  env -i
  "PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "HOME=$WORK/home" "TMPDIR=$WORK/tmp" "LANG=C.UTF-8" "TERM=${TERM:-dumb}"
  "PYTHON=$VENV/bin/python" "XTOKEN_GPU_CHECK_SITE=$WORK/site"
)
CHECK_CMD=(bash bench/gpu_check.sh --allow-cpu --tiny --wheels "$WHEELS" --out "$OUT_DIR" --work "$WORK/check")
NET="this machine's network (unshare -n unavailable: run as root to cut it, as on the GPU machine)"
if unshare -n sh -c 'ip link set lo up' >/dev/null 2>&1; then
  NET="none (unshare -n, loopback only, as on the GPU machine)"
  CHECK_CMD=(unshare -n sh -c 'ip link set lo up && exec "$@"' sh "${CHECK_CMD[@]}")
fi
rm -f "$OUT_DIR/gpu_check.log" "$OUT_DIR/gpu_check.json"
say "check: PYTHON=$VENV/bin/python, network: $NET, timeout ${TIMEOUT_S} s"
say "check: bash bench/gpu_check.sh --allow-cpu --tiny --wheels $WHEELS --out $OUT_DIR"
set +e
timeout -k 30 "$TIMEOUT_S" "${CHECK_ENV[@]}" "${CHECK_CMD[@]}"
RC=$?
set -e
SECS[check]=$(since "$t0")

# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
CLOG="$OUT_DIR/gpu_check.log"
echo
say "=== summary ==="
if [ "$RC" = 124 ]; then
  say "TIMEOUT: the check ran past --timeout-s ${TIMEOUT_S} and was killed (a hang? its last lines are in $CLOG)"
elif [ "$RC" -gt 128 ]; then
  say "KILLED: the check died of signal $((RC - 128)) (out of memory? see $CLOG)"
fi
DONE="$(grep -E '^\[gpu_check\] (done in|HARD LIMIT)' "$CLOG" 2>/dev/null | tail -n 1 || true)"
say "check: ${DONE:-no summary line (the check did not finish; see $CLOG)}"
if [ -z "$DONE" ] && [ -f "$CLOG" ]; then
  say "check: so far $(grep -c '^\[gpu_check\] PASS' "$CLOG") passed, $(grep -c '^\[gpu_check\] FAIL' "$CLOG") failed"
fi
grep -E '^\[gpu_check\] (FAIL|TIMEOUT|SKIPPED|AIM)' "$CLOG" 2>/dev/null | sed 's/^/[gpu_env_check]   /' || true
VENV_SIZE="$(du -sh "$VENV" 2>/dev/null | cut -f1)"
say "time: venv ${SECS[venv]} s, install ${SECS[install]} s, wheels ${SECS[wheels]} s, check ${SECS[check]} s, total $(since "$T_START") s"
if [ "$KEEP" = 1 ]; then
  say "venv: $VENV ($VENV_SIZE, kept; reuse: bash bench/gpu_env_check.sh --venv $VENV)"
else
  say "venv: $VENV ($VENV_SIZE, removed; --keep keeps it)"
fi
say "out: $OUT_DIR (gpu_check.log, gpu_check.json, gpu_env_freeze.txt)"
say "exit $RC"
exit "$RC"
