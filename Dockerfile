# syntax=docker/dockerfile:1
#
# seqsentinel images. Every Python install step is deploy/install.sh, which the tests run without
# Docker.
#
#   docker build -t seqsentinel-detector .                                  # runtime (default)
#   docker build --target trainer -t seqsentinel-trainer .                  # adds torch
#   docker build --build-arg VARIANT=gpu -t seqsentinel-detector:gpu .      # onnxruntime-gpu, CUDA
#
# The runtime runs as uid 10001 with a read-only root: it writes only under /tmp and reads its
# model from /models (mount a volume there), e.g.
#   docker run --read-only --tmpfs /tmp -v models:/models:ro --env-file detector.env seqsentinel-detector

# cpu or gpu: picks the onnxruntime package. One base image serves both: onnxruntime-gpu brings
# the CUDA and cuDNN libraries of its own CUDA release as pip packages (deploy/install.sh), so
# no CUDA base image has to match it, and the NVIDIA container toolkit mounts the host's driver.
ARG VARIANT=cpu
ARG BASE_IMAGE=python:3.11-slim-bookworm

# What every image shares: the service user and the folders it may write.
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    PATH=/opt/seqsentinel/bin:$PATH
RUN groupadd --system --gid 10001 seqsentinel \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin seqsentinel \
    && install --directory --owner 10001 --group 10001 /models

# Builds the virtual environment; only /opt/seqsentinel leaves this stage. Every pip call of
# deploy/install.sh is held to the versions of constraints.txt, the lock `make venv` and CI use
# (it pins onnxruntime-gpu for the gpu variant too); each image installs only what it needs.
FROM base AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/constraints.txt
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY detector/ detector/
COPY trainer/ trainer/
COPY deploy/install.sh deploy/install.sh

FROM build AS build-runtime
RUN deploy/install.sh --runtime --variant "${VARIANT}" --venv /opt/seqsentinel

FROM build AS build-trainer
RUN deploy/install.sh --trainer --variant "${VARIANT}" --venv /opt/seqsentinel

# `trainer retrain` in the retraining job; writes the promoted model under /models.
FROM base AS trainer
COPY --from=build-trainer /opt/seqsentinel /opt/seqsentinel
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["trainer"]
CMD ["--help"]

# The detector daemon: no torch, onnxruntime only. Last, so that it is the default target.
FROM base AS runtime
COPY --from=build-runtime /opt/seqsentinel /opt/seqsentinel
ENV SEQSENTINEL_MODEL__PATH=/models/model.onnx
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# Python's standard library only: slim images have no curl. A non-2xx answer or no answer fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SEQSENTINEL_HTTP__PORT', '8080') + '/healthz', timeout=4)"]
ENTRYPOINT ["detector"]
CMD ["run"]
