#!/usr/bin/env bash
# Set up the dev environment and run every check: ruff, hadolint, the compose file, pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k brush -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
SAMSEM_DEV=1 bash tools/setup.sh
venv="${SAMSEM_VENV:-.venv}"
echo "[test] ruff" >&2
"$venv/bin/ruff" check .
if [ -f Dockerfile ]; then
  echo "[test] hadolint" >&2
  "$venv/bin/hadolint" Dockerfile
fi
echo "[test] pytest" >&2
exec "$venv/bin/python" -m pytest "$@"
