# Shipyard on NVIDIA's TensorRT container: every stage, TensorRT engine builds and engine parity.
#
#   base image   nvcr.io/nvidia/tensorrt:26.02-py3 (x86_64, Ubuntu 24.04)
#   TensorRT     10.15 (its ONNX operator list ships in pipeline/trt_ops/10.15.json; the build
#                below fails if the image carries another version)
#   CUDA         the base image's (see NVIDIA's TensorRT container release notes for 26.02);
#                the host's NVIDIA driver must support it
#   Python       3.12, from the base image; Shipyard lives in a virtualenv that also sees the
#                image's tensorrt package (--system-site-packages)
#   torch        2.13.0 from PyPI (its CUDA build): the reference model and the GPU buffers of
#                the engine runner
#
# Build and run (a GPU host with the NVIDIA Container Toolkit):
#   docker build -t shipyard-trt .
#   docker run --gpus all --rm -v "$PWD:/work" -v "$HOME/.cache/shipyard:/root/.cache/shipyard" \
#     shipyard-trt build --model release/minilm-tweets/model.trt.int8-fp16.onnx \
#     --target a100-int8 --recipe recipes/minilm-tweets.yaml --out engines/a100-int8.engine
#
# Jetson (sm_87) engines are built on the device with JetPack's own TensorRT, not in this image.
FROM nvcr.io/nvidia/tensorrt:26.02-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/shipyard/venv \
    PATH=/opt/shipyard/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/shipyard
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && python -c "import tensorrt, sys; v = tensorrt.__version__; print('TensorRT', v); sys.exit(0 if v.startswith('10.15.') else 'this image has TensorRT ' + v + ', Shipyard pins 10.15')"

COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY calibration ./calibration
COPY recipes ./recipes
# The local project cannot be pinned by version; torch is pinned and TensorRT by the `trt` extra.
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 \
    && pip install ".[trt]" \
    && shipyard --version

WORKDIR /work
ENTRYPOINT ["shipyard"]
CMD ["--help"]
