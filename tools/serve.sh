#!/usr/bin/env bash
# Set up the runtime environment and run the service (`python -m backend`: gunicorn, port $PORT).
# Configuration comes from the environment (see README: every variable). Weights: WEIGHTS_DIR
# (default ./weights) must hold the SAM checkpoint and the DINOv2 weights, or use
# SAM_MODEL_TYPE=tiny-random EMBEDDER_MODEL=test_vit EMBEDDER_WEIGHTS=random for a demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
venv="${SAMSEM_VENV:-.venv}"
exec "$venv/bin/python" -m backend "$@"
