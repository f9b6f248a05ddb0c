#!/usr/bin/env bash
# Run only the end-to-end test: a real Label Studio 1.23 drives `python -m backend` (tiny random models).
# Label Studio is installed into its own virtualenv on first use (~2 min) and reused afterwards.
#   LABEL_STUDIO_VENV  Label Studio's virtualenv (default: .venv-labelstudio in the repo root)
#   SAMSEM_VENV        the project's virtualenv (default: .venv)
# Extra arguments go to pytest (e.g. `bash tools/e2e_label_studio.sh -k drives`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SAMSEM_VENV:-.venv}"
exec "$venv/bin/python" -m pytest -m e2e tests/e2e -x -s "$@"
