#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install its dependencies.
#   SAMSEM_VENV   where the venv lives (default: .venv in the repo root)
#   SAMSEM_DEV=1  also install the test/dev tools (requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SAMSEM_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv" >&2
  "$python" -m venv "$venv"
fi
req=requirements.txt
[ "${SAMSEM_DEV:-0}" = 1 ] && req=requirements-dev.txt
stamp="$venv/.installed-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)-$(basename $req)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $req into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -m pip install --quiet -r "$req" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -c "import torch, timm, segment_anything, label_studio_sdk, flask, cv2" \
    || { echo "[setup] dependency install failed" >&2; exit 1; }
  touch "$stamp"
fi
