"""The platforms a release targets: GPU architectures, the TensorRT each runs, Jetson and its DLA.

Facts, decided here once: the recipe schema validates targets against them, the readiness check
picks its operator list by them, the engine builder refuses a host that does not match them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

# The TensorRT in the Dockerfile's base image; its operator list ships as data (trt/ops/).
TRT_VERSION = "10.15"
OPS_DIR = Path(__file__).parent / "trt" / "ops"

# Compute capability -> what NVIDIA calls the GPUs built on it (for messages and plans).
ARCHITECTURES = {
    "sm_75": "Turing (T4)", "sm_80": "Ampere (A100, A30)", "sm_86": "Ampere (A10, A40, RTX 30)",
    "sm_87": "Ampere embedded (Jetson AGX/NX Orin)", "sm_89": "Ada (L4, L40, RTX 40)",
    "sm_90": "Hopper (H100, H200)", "sm_100": "Blackwell (B200, GB200)", "sm_103": "Blackwell Ultra (B300, GB300)",
    "sm_120": "Blackwell (RTX PRO 6000, RTX 50)",
}
Arch = Literal["sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_120"]
# The TensorRT a target's engine is built with and runs on, where it is not the image's: Jetson Orin
# runs JetPack 6, whose TensorRT is 10.3 (engines do not load across TensorRT versions).
TRT_BY_ARCH = {"sm_87": "10.3"}
JETSON_ARCHS = ("sm_87",)
# TensorRT releases that build for the DLA on Jetson (10.8-11.4.0 dropped it; 11.4.1 restored it on JetPack 7.2.2).
DLA_TRT_VERSIONS = "TensorRT <= 10.7 (JetPack 6) or >= 11.4.1 (JetPack 7.2.2)"


def tensorrt_for(arch: str, default: str = TRT_VERSION) -> str:
    """The TensorRT (major.minor) a target of `arch` runs when its recipe names none: its
    platform's (JetPack's on Jetson), else `default` (the recipe's stages.build.trt_version)."""
    return TRT_BY_ARCH.get(arch, default)


def shipped_trt_versions() -> list[str]:
    """TensorRT versions whose ONNX operator list ships in pipeline/trt/ops/."""
    return sorted((p.stem for p in OPS_DIR.glob("*.json")), key=lambda v: tuple(int(x) for x in v.split(".")))


def trt_has_dla(version: str) -> bool:
    """Whether this TensorRT (x.y.z) builds engines for Jetson's DLA."""
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    return parts <= (10, 7, 99) or parts >= (11, 4, 1)
