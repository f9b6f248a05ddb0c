# samsem: Label Studio ML backend (SAM proposals + DINOv2 exemplar memory).
#
#   docker build -t samsem .                              # CPU image, official weights fetched
#   docker build -t samsem:cuda --build-arg VARIANT=cuda .  # CUDA image (NVIDIA GPU hosts)
#   docker build --build-arg FETCH_WEIGHTS=false .         # no weights in the image: mount them
#
# The container runs exactly what the tests run outside Docker: `python -m backend` with the
# dependencies of requirements.txt.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# cpu | cuda: selects the PyTorch wheel index (CUDA wheels bundle their own CUDA runtime).
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
# Weights baked into the image (checksums verified by samsem_plugin.weights) unless false.
ARG FETCH_WEIGHTS=true
ARG SAM_MODEL_TYPE=vit_b
ARG EMBEDDER_MODEL=vit_small_patch14_reg4_dinov2.lvd142m

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY requirements.txt ./
RUN set -eux; \
    case "$VARIANT" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" ;; \
      *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install --no-cache-dir --extra-index-url "$index" -r requirements.txt

COPY samsem_plugin ./samsem_plugin
COPY backend ./backend

RUN set -eux; \
    mkdir -p /opt/samsem/weights /data; \
    if [ "$FETCH_WEIGHTS" = "true" ]; then \
      python -m samsem_plugin.weights download --sam "$SAM_MODEL_TYPE" \
        --dinov2 "$EMBEDDER_MODEL" --dir /opt/samsem/weights; \
    fi; \
    useradd --create-home --uid 10001 --shell /usr/sbin/nologin samsem; \
    chown -R samsem:samsem /data

ENV SAM_MODEL_TYPE=${SAM_MODEL_TYPE} \
    EMBEDDER_MODEL=${EMBEDDER_MODEL} \
    WEIGHTS_DIR=/opt/samsem/weights \
    MODEL_DIR=/data \
    DEVICE=auto \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8 \
    LOG_LEVEL=INFO

USER 10001:10001
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "backend.healthcheck"]

# gunicorn, one worker, THREADS threads, no --preload: models load lazily after fork.
CMD ["python", "-m", "backend"]
