# sortline worker/producer/Flower image, with the trained model baked in.
#
#   docker build -t sortline:latest .                                   CPU (PyTorch CPU wheels)
#   docker build -t sortline:gpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .  CUDA wheels for GPU workers
#
# The CUDA wheels bring their own CUDA libraries; the host needs the NVIDIA driver and the
# NVIDIA Container Toolkit (docker-compose.yml reserves the device for worker-gpu).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 sortline \
 && useradd --system --uid 10001 --gid sortline --create-home --home-dir /home/sortline \
      --shell /usr/sbin/nologin sortline

WORKDIR /app

# The largest layer first, so code changes do not download PyTorch again.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
      --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md ./
COPY sortline/ sortline/
COPY db/ db/
COPY training/ training/
COPY worker/ worker/
COPY producer/ producer/
# Editable, so the shipped checkpoint is found at /app/models (training.config.DEFAULT_CHECKPOINT).
RUN pip install -e .

# The trained model, read-only for the service user; the build fails if it is missing.
COPY models/sortline-trashnet.safetensors models/sortline-trashnet.int8.json models/
# the int8 parity check of the shipped model runs on the sample photos
COPY samples/ samples/
RUN python -c "from training.model.checkpoint import read_metadata, model_version; \
from training.config import DEFAULT_CHECKPOINT as p; print(p, model_version(read_metadata(p)))" \
 && mkdir -p /app/cache /app/runs /app/.sortline /data \
 && chown sortline:sortline /app/cache /app/runs /app/.sortline

USER sortline:sortline
ENV SORTLINE_HOME=/app/.sortline \
    SORTLINE_CACHE_DIR=/app/cache \
    SORTLINE_RUNS_DIR=/app/runs

# Compose overrides this per service (workers also require their own node to answer).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD ["sortline", "health", "--check", "broker", "--check", "database", "--check", "model"]

CMD ["sortline", "--help"]
