# syntax=docker/dockerfile:1
# lusai images. Targets:
#   slim (default) - SCP, API and CPU worker; torch from the CPU wheel index (~1 GB smaller)
#   gpu            - CUDA worker; torch from PyPI (CUDA build), run with a GPU reservation
# Build: docker build -t lusai .            docker build --target gpu -t lusai:gpu .

ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/lusai lusai

FROM base AS build-base
WORKDIR /src
RUN python -m venv /opt/lusai
COPY pyproject.toml README.md ./
COPY service service
COPY workers workers
COPY migrations migrations

FROM build-base AS build-gpu
RUN /opt/lusai/bin/pip install .

FROM build-base AS build-cpu
RUN /opt/lusai/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.*" \
 && /opt/lusai/bin/pip install .

FROM base AS runtime
ENV PATH=/opt/lusai/bin:$PATH \
    LUSAI_DATA_DIR=/var/lib/lusai \
    LUSAI_API_HOST=0.0.0.0 \
    LUSAI_LOG_FORMAT=json
USER lusai
WORKDIR /var/lib/lusai
EXPOSE 11112 8000
# Each role answers its own check: `lusai check api|scp|worker` (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=40s --retries=3 CMD ["lusai", "check", "api"]
ENTRYPOINT ["lusai"]
CMD ["serve"]

FROM runtime AS gpu
COPY --from=build-gpu /opt/lusai /opt/lusai

FROM runtime AS slim
COPY --from=build-cpu /opt/lusai /opt/lusai
