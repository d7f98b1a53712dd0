# syntax=docker/dockerfile:1
#
# DIN ranking service images. One Dockerfile, four targets:
#
#   cpu      (default) the ranking service on CPU: python slim, no torch, non-root, HEALTHCHECK
#   gpu      the ranking service on an NVIDIA GPU: CUDA + cuDNN runtime base, non-root, HEALTHCHECK
#   trainer  `din train` / `din load` (PyTorch CPU build), for the compose file's one-shot job
#   loadtest locust with the project's locustfile (master and workers of the compose file)
#
#   docker build -t din-ranker:cpu .
#   docker build --target gpu -t din-ranker:gpu .
#   docker build --target trainer -t din-ranker:trainer .
#   docker build --target loadtest -t din-ranker:loadtest .
#
# Build args (defaults below):
#   PYTHON_VERSION   Python of the slim images (cpu, trainer, loadtest).
#   CUDA_IMAGE       base of the gpu image. onnxruntime-gpu 1.27 and later (we install 1.31)
#                    are built against CUDA 13 and cuDNN 9, so the base must be a CUDA 13.x
#                    "cudnn-runtime" image; an onnxruntime-gpu before 1.27 needs a CUDA 12.x one
#                    (e.g. nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04). Host driver: >= 580.
#   TORCH_VERSION    torch of the trainer image; must equal the pin in pyproject.toml.
#   TORCH_INDEX_URL  where the trainer gets torch: the CPU-only wheel index (about 200 MB
#                    instead of the multi-GB CUDA build PyPI serves on Linux).
#   APP_UID          uid of the non-root user `din` that every image runs as.
#
# The serving images never install torch: the service runs the exported ONNX graph.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=10001

# ---- wheel: the project built once, installed by every target ---------------------------
FROM python:${PYTHON_VERSION}-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY feature_store ./feature_store
COPY service ./service
COPY loadtest ./loadtest
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- python-base: a venv and the non-root user, shared by the slim targets ---------------
FROM python:${PYTHON_VERSION}-slim AS python-base
ARG APP_UID
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DIN_HOME=/var/lib/din
RUN python -m venv /opt/venv \
    && useradd --uid ${APP_UID} --user-group --create-home --shell /usr/sbin/nologin din \
    && mkdir -p /bundles /var/lib/din \
    && chown din:din /bundles /var/lib/din
WORKDIR /home/din

# ---- cpu: the ranking service on CPU (default target) ------------------------------------
FROM python-base AS cpu
COPY --from=wheel /wheels /wheels
# pyproject.toml pins onnxruntime-gpu on Linux x86-64 (it also runs on CPU); the CPU image
# swaps it for the same version of plain onnxruntime, which leaves the CUDA kernels out.
RUN pip install /wheels/*.whl \
    && ORT_VERSION="$(pip show onnxruntime-gpu 2>/dev/null | sed -n 's/^Version: //p')" \
    && if [ -n "$ORT_VERSION" ]; then \
         pip uninstall -y onnxruntime-gpu && pip install "onnxruntime==${ORT_VERSION}"; \
       fi \
    && rm -rf /wheels \
    && ! python -c "import torch" 2>/dev/null
ENV BUNDLE=/bundles/latest HOST=0.0.0.0 PORT=8000 DEVICE=cpu
USER din
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '8000'), timeout=2)"]
# Exec form: `din serve` is PID 1 and receives `docker stop`'s SIGTERM itself (uvicorn then
# drains and exits); a shell-form CMD would put /bin/sh in between, which does not forward it.
# No flags: BUNDLE, HOST and PORT come from the ENV above, so `docker run -e PORT=9000` moves the
# server and the HEALTHCHECK together (a flag would win over the environment).
CMD ["din", "serve"]

# ---- gpu: the ranking service on an NVIDIA GPU --------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG APP_UID
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DIN_HOME=/var/lib/din
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --uid ${APP_UID} --user-group --create-home --shell /usr/sbin/nologin din \
    && mkdir -p /bundles /var/lib/din \
    && chown din:din /bundles /var/lib/din
WORKDIR /home/din
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && ! python -c "import torch" 2>/dev/null
# DEVICE=cuda: /readyz stays 503 when the container cannot use the GPU (no --gpus, old
# driver) instead of silently ranking on CPU; set DEVICE=auto to allow the fallback.
ENV BUNDLE=/bundles/latest HOST=0.0.0.0 PORT=8000 DEVICE=cuda
USER din
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '8000'), timeout=2)"]
CMD ["din", "serve"]

# ---- trainer: train, export and load features (torch, CPU build) --------------------------
FROM python-base AS trainer
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
COPY --from=wheel /wheels /wheels
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install "$(ls /wheels/*.whl)[train]" \
    && rm -rf /wheels \
    && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')"
USER din
# Writes /bundles/<version> and points /bundles/latest at it; the compose file also loads Redis.
CMD ["din", "train", "--data", "synthetic", "--model", "din", "--out", "/bundles", "--json"]

# ---- loadtest: locust master / worker with the project's locustfile -----------------------
FROM python-base AS loadtest
COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/*.whl)[loadtest]" && rm -rf /wheels
COPY loadtest/locustfile.py /loadtest/locustfile.py
ENV LOCUST_LOCUSTFILE=/loadtest/locustfile.py
USER din
EXPOSE 8089 5557
CMD ["locust", "--master"]
