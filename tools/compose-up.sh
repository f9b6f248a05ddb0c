#!/usr/bin/env bash
# One command from zero to Label Studio + samsem with Docker Compose.
# First run: writes .env with fresh random secrets (edit it to taste), then builds and starts both.
#   SAMSEM_GPU=1  also applies docker-compose.gpu.yml (CUDA image, one GPU reserved).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .env ]; then
  rand() { python3 -c "import secrets; print(secrets.token_hex($1))"; }
  cat > .env <<ENV
LABEL_STUDIO_USERNAME=admin@example.com
LABEL_STUDIO_PASSWORD=$(rand 12)
LABEL_STUDIO_API_KEY=$(rand 20)
BASIC_AUTH_USER=samsem
BASIC_AUTH_PASS=$(rand 12)
WEBHOOK_SECRET=$(rand 16)
ENV
  chmod 600 .env
  echo "wrote .env (Label Studio login and samsem secrets) — keep it private" >&2
fi
files=(-f docker-compose.yml)
[ "${SAMSEM_GPU:-0}" = 1 ] && files+=(-f docker-compose.gpu.yml)
docker compose "${files[@]}" up -d --build
echo "Label Studio: http://localhost:${LABEL_STUDIO_PORT:-8080}  samsem: http://localhost:${SAMSEM_PORT:-9090}" >&2
