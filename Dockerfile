# CPU image for the export / quantize / validate pipeline. The TensorRT build stage (a later
# issue) moves this onto NVIDIA's TensorRT base image; until then this image runs everything
# Shipyard does today.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/shipyard
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY calibration ./calibration
COPY recipes ./recipes
RUN pip install torch==2.13.0 && pip install .

WORKDIR /work
ENTRYPOINT ["shipyard"]
CMD ["--help"]
