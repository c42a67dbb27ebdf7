# Quiver on one NVIDIA GPU.
#
#   docker build -t quiver .
#   docker run --gpus all -p 8000:8000 --stop-timeout 40 \
#       -v /srv/models/Llama-3.2-1B-Instruct:/models/base:ro -v /srv/adapters:/adapters \
#       -e QUIVER_MODEL=/models/base -e QUIVER_API_KEY=... -e QUIVER_ADMIN_KEY=... quiver
#
# Every `quiver serve` flag can be set with its QUIVER_* environment variable (README,
# "Running in production"). Without QUIVER_MODEL the embedded demo model is served.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0

# gcc and the Python headers stay in the image: Triton compiles its kernel launchers at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/quiver \
    PATH=/opt/quiver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "$VIRTUAL_ENV"

# torch first, in its own layer: it is most of the image and changes least. The default index's
# Linux wheel is the CUDA build (the Makefile's CPU-only install is for development machines);
# the check fails the build if a CPU-only wheel slipped in.
RUN pip install "torch==${TORCH_VERSION}" \
 && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch was installed without CUDA')"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY scheduler ./scheduler
COPY adapters ./adapters
COPY training ./training
# The training extra is what fine-tuning jobs (`quiver train` child processes) need.
RUN pip install ".[training]" \
 && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'the project install replaced the CUDA torch')"

RUN useradd --system --uid 10001 --create-home --home-dir /home/quiver quiver \
 && mkdir -p /models /adapters /home/quiver/.cache \
 && chown -R quiver:quiver /adapters /home/quiver
USER 10001
WORKDIR /home/quiver

# /models: base model weights (read-only is fine). /adapters: the adapter root, one PEFT directory
# per adapter, served by its directory name. Caches (demo bundle, hub downloads, Triton kernels) go
# under /home/quiver/.cache.
ENV QUIVER_ADAPTER_ROOT=/adapters \
    QUIVER_PORT=8000 \
    QUIVER_CACHE=/home/quiver/.cache/quiver \
    HF_HOME=/home/quiver/.cache/huggingface
VOLUME ["/models", "/adapters"]
EXPOSE 8000

# Ready = the model is loaded; a large model may take minutes, hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('QUIVER_PORT', '8000'), timeout=4)"

# SIGTERM drains in-flight requests for up to QUIVER_SHUTDOWN_TIMEOUT seconds (30) and exits 0:
# give `docker stop` more than that (--stop-timeout 40).
STOPSIGNAL SIGTERM
CMD ["quiver", "serve", "--host", "0.0.0.0"]
