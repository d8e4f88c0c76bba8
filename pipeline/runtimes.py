"""The runtime table: one entry per runtime an artifact is made for and run by.

An artifact records its `format` when a stage writes it, and everything after reads this table
through that record: which runner loads it (`pipeline.parity.runners.RUNNERS`, keyed by format),
which companion files travel with it (hashed, verified, cached and copied as part of it), whether
it runs on this CPU, and what to install when its runtime is missing. Adding a runtime is one row
here and one runner there. This module imports nothing heavy: `shipyard --help` reads it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, get_args

from pipeline.errors import ShipyardError

ArtifactFormat = Literal["onnx", "openvino", "tensorrt-engine"]
ARTIFACT_FORMATS: tuple[str, ...] = get_args(ArtifactFormat)

# How an artifact's companion files are found: ONNX names its external data files inside the
# graph; an OpenVINO IR keeps its weights in a `.bin` of the same stem beside its `.xml`.
Companions = Literal["onnx-external-data", "weights-bin", "none"]


@dataclass(frozen=True)
class Runtime:
    """What Shipyard knows about one runtime (module docstring)."""

    format: ArtifactFormat
    name: str  # as the report, the bench and messages call it
    suffixes: tuple[str, ...]  # the main file's suffixes, the first one the one stages write
    companions: Companions
    device: Literal["cpu", "gpu"]  # where it runs: CPU artifacts are timed on the build machine
    module: str  # the Python module whose presence says the runtime is installed
    install: str  # what to run when it is not


RUNTIMES: dict[str, Runtime] = {
    "onnx": Runtime("onnx", "onnxruntime", (".onnx",), "onnx-external-data", "cpu", "onnxruntime",
                    'pip install -e "."'),
    # Intel's CPU runtime; with NNCF it runs static INT8 fastest on VNNI and AMX cores. An extra.
    "openvino": Runtime("openvino", "openvino", (".xml",), "weights-bin", "cpu", "openvino",
                        'pip install -e ".[openvino]"'),
    "tensorrt-engine": Runtime("tensorrt-engine", "tensorrt", (".engine", ".plan"), "none", "gpu", "tensorrt",
                               'pip install -e ".[trt]" on a GPU host (or the Dockerfile\'s image)'),
}


def runtime(fmt: str) -> Runtime:
    """The table's entry for an artifact format."""
    if fmt not in RUNTIMES:
        raise ShipyardError(f"artifact format {fmt!r} is not one Shipyard runs; known: {', '.join(RUNTIMES)}")
    return RUNTIMES[fmt]


def format_of_path(path: str) -> ArtifactFormat:
    """The format a file given on the command line is in, from its suffix (ONNX when none matches:
    its loader then says what is wrong with it)."""
    suffix = "." + str(path).rsplit(".", 1)[-1] if "." in str(path) else ""
    return next((r.format for r in RUNTIMES.values() if suffix in r.suffixes), "onnx")


def installed(fmt: str) -> bool:
    """Whether this machine can run artifacts of `fmt` (its runtime's module imports)."""
    return importlib.util.find_spec(runtime(fmt).module) is not None


def require(fmt: str, why: str) -> None:
    """Refuse, in one line naming the install command, work that needs a runtime not installed."""
    if not installed(fmt):
        entry = runtime(fmt)
        raise ShipyardError(f"{why} needs {entry.name}, which is not installed; run {entry.install}")
