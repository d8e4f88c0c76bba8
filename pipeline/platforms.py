"""The platform table: GPU architectures, TensorRT releases and the platforms that run them.

Data, decided here once: the recipe schema validates targets against it (a target may name a
`platform` preset), the readiness check picks its operator list by it, the engine builder refuses
a host that does not match it, `shipyard targets` prints it, and a test checks the Dockerfile,
the `trt` extras, the schema text and the CI example against it. Each row names its source; a
fact this table infers rather than reads is marked "inferred" there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OPS_DIR = Path(__file__).parent / "trt" / "ops"

# Compute capability -> what NVIDIA calls the GPUs built on it (for messages and plans).
ARCHITECTURES = {
    "sm_75": "Turing (T4)", "sm_80": "Ampere (A100, A30)", "sm_86": "Ampere (A10, A40, RTX 30)",
    "sm_87": "Ampere embedded (Jetson AGX/NX Orin)", "sm_89": "Ada (L4, L40S, RTX 40)",
    "sm_90": "Hopper (H100, H200)", "sm_100": "Blackwell (B200, GB200)", "sm_103": "Blackwell Ultra (B300, GB300)",
    "sm_110": "Blackwell embedded (Jetson AGX Thor)", "sm_120": "Blackwell (RTX PRO 6000, RTX 50)",
    "sm_121": "Blackwell (DGX Spark, GB10)",
}
# The same keys, as the type pydantic and mypy read (tests/test_platforms.py holds them equal).
Arch = Literal["sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_110", "sm_120", "sm_121"]
JETSON_ARCHS = ("sm_87", "sm_110")
# The first TensorRT that builds for an architecture (older ones for every other): Blackwell
# from 10.8; Thor (sm_110 since CUDA 13) and GB10 with the CUDA 13 builds of 10.13 (inferred
# from JetPack 7.0 shipping 10.13 for Thor).
FIRST_TRT_FOR_ARCH = {"sm_100": "10.8", "sm_103": "10.8", "sm_120": "10.8", "sm_110": "10.13", "sm_121": "10.13"}


@dataclass(frozen=True)
class TrtRelease:
    """One TensorRT line (major.minor) Shipyard checks graphs for and builds with."""

    version: str
    cuda: str  # the CUDA its builds target (its wheels come as -cu12 and -cu13)
    # TensorRT 11 made strong typing the only mode: no precision builder flags, no INT8
    # calibrator; precision is in the graph (Q/DQ, float16 tensors), which readiness checks.
    strongly_typed_only: bool
    wheel: str  # the pip requirement of its Python bindings (the trt extras, the Dockerfile)
    source: str


TRT_RELEASES: dict[str, TrtRelease] = {
    "10.3": TrtRelease("10.3", "12.x (12.6 on JetPack 6)", False, "tensorrt-cu12==10.3.*",
                       "TensorRT 10.3 release notes; JetPack 6.0-6.2 ship it for good (issue #33)"),
    "10.13": TrtRelease("10.13", "12.x, 13.x (13.0 on JetPack 7)", False, "tensorrt-cu13==10.13.*",
                        "TensorRT 10.13 release notes; JetPack 7.0/7.1 ship it (issue #33)"),
    "10.15": TrtRelease("10.15", "12.x, 13.x", False, "tensorrt-cu13==10.15.*",
                        "TensorRT 10.15 release notes; the NGC container 26.02"),
    "10.16": TrtRelease("10.16", "12.x, 13.x (13.2 on JetPack 7.2)", False, "tensorrt-cu13==10.16.*",
                        "TensorRT 10.16 release notes: the last 10.x line; JetPack 7.2 ships 10.16.2 (issue #33)"),
    "11.4": TrtRelease("11.4", "12.x, 13.x", True, "tensorrt-cu13==11.4.*",
                       "TensorRT 11.4 release notes; 11.4.1 is the first 11.x on Jetson, JetPack 7.2.2+, with DLA "
                       "on AGX Orin (issue #33)"),
    "11.5": TrtRelease("11.5", "13.5", True, "tensorrt-cu13==11.5.*",
                       "TensorRT 11.5 release notes (2026-11-18): CUDA 13.5, ONNX opset 25 (issue #33)"),
}
# The TensorRT a target without platform or trt_version runs (stages.build.trt_version's default).
TRT_VERSION = "11.5"
# Polygraphy as it ships with TensorRT 11 (it serves 10.x too): installed beside every line.
POLYGRAPHY = "polygraphy==0.53.6"
# TensorRT releases that build for the DLA on Jetson (10.8-11.4.0 dropped it; 11.4.1 restored it on JetPack 7.2.2).
DLA_TRT_VERSIONS = "TensorRT <= 10.7 (JetPack 6) or >= 11.4.1 (JetPack 7.2.2)"


def _at_least(version: str, floor: str) -> bool:
    return tuple(int(p) for p in version.split(".")) >= tuple(int(p) for p in floor.split("."))


@dataclass(frozen=True)
class Platform:
    """A deployment platform preset: its architecture, the TensorRT it runs (each with what
    provides it), its CUDA, its DLA, where its engines are built and the CI runner labels."""

    name: str
    arch: Arch
    gpus: str
    trt: dict[str, str]  # TensorRT (major.minor) -> what provides it there; the first is the default
    cuda: str
    dla: bool  # the platform has DLA cores (usable where its TensorRT builds for them)
    builds_on: str
    runner: tuple[str, ...]
    source: str

    @property
    def default_trt(self) -> str:
        return next(iter(self.trt))


# Server and desktop GPUs run the image of any TensorRT line from 10.13 (the Dockerfile's TRT
# build argument) or its wheel; newest first, so the default is the newest.
_SERVER_TRT = {v: f"the Dockerfile's image (TRT={v}) or pip {r.wheel}"
               for v, r in reversed(TRT_RELEASES.items()) if _at_least(v, "10.13")}
_SERVER_SOURCE = ("inferred: TensorRT 10.x/11.x support matrices list Ampere to Blackwell (Blackwell from 10.8); the "
                  "versions are the lines with an operator list here")


def _server(name: str, arch: Arch, gpus: str, since: str = "10.13") -> Platform:
    versions = {v: how for v, how in _SERVER_TRT.items() if _at_least(v, since)}
    return Platform(name, arch, gpus, versions, "13.x (the image's or the wheel's)", False,
                    "the Dockerfile's image on a GPU of this architecture", ("self-hosted", "gpu", arch),
                    _SERVER_SOURCE)


_JETPACK_7_2 = {"10.16": "JetPack 7.2 (10.16.2)", "11.4": "JetPack 7.2.2+ (11.4.1)"}


def _jetson(name: str, arch: Arch, gpus: str, jetpack: str, trt: dict[str, str], cuda: str, dla: bool,
            source: str) -> Platform:
    """A Jetson on JetPack `jetpack`: its engines are built on the device with JetPack's TensorRT."""
    return Platform(name, arch, gpus, trt, cuda, dla, f"JetPack {jetpack}'s TensorRT on the device (aarch64)",
                    ("self-hosted", "jetson", f"jetpack-{jetpack}"), source)


PLATFORMS: dict[str, Platform] = {p.name: p for p in (
    _jetson("jetson-orin-jp6", "sm_87", "Jetson AGX/NX/Nano Orin", "6", {"10.3": "JetPack 6.0-6.2"}, "12.6", True,
            "JetPack 6 release notes: TensorRT 10.3, fixed for the JetPack 6 line (issue #33)"),
    _jetson("jetson-orin-jp7.2", "sm_87", "Jetson AGX/NX/Nano Orin", "7.2", _JETPACK_7_2, "13.2", True,
            "JetPack 7.2 release notes; TensorRT 11 on Jetson from 11.4.1 on JetPack 7.2.2 (issue #33)"),
    _jetson("jetson-thor-jp7", "sm_110", "Jetson AGX Thor", "7", {"10.13": "JetPack 7.0/7.1"}, "13.0", False,
            "JetPack 7.0/7.1 release notes: Thor, CUDA 13.0, TensorRT 10.13 (issue #33)"),
    _jetson("jetson-thor-jp7.2", "sm_110", "Jetson AGX Thor", "7.2", _JETPACK_7_2, "13.2", False,
            "JetPack 7.2 release notes (issue #33)"),
    _server("a100", "sm_80", "A100, A30"),
    _server("h100", "sm_90", "H100"),
    _server("h200", "sm_90", "H200"),
    _server("l4", "sm_89", "L4"),
    _server("l40s", "sm_89", "L40S"),
    _server("b200", "sm_100", "B200, GB200"),
    _server("rtx-5090", "sm_120", "GeForce RTX 5090"),
    _server("dgx-spark", "sm_121", "DGX Spark (GB10)"),
)}


def platform_error(name: str, arch: str | None, trt_version: str | None, dla: bool) -> str | None:
    """Why a target naming platform `name` (with an explicit arch, TensorRT and DLA use) cannot
    exist, in one line naming the platform's real options; None when it can."""
    if name not in PLATFORMS:
        return f"unknown platform {name!r}; known: {', '.join(PLATFORMS)} (shipyard targets lists them)"
    platform = PLATFORMS[name]
    if arch is not None and arch != platform.arch:
        return f"platform {name} is {platform.arch} ({platform.gpus}), not {arch}; drop arch or change platform"
    if trt_version is not None and trt_version not in platform.trt:
        offered = "; ".join(f"{v} ({how})" for v, how in platform.trt.items())
        elsewhere = [f"{p.name} ({p.trt[trt_version]})" for p in PLATFORMS.values()
                     if p.arch == platform.arch and trt_version in p.trt]
        hint = f"; TensorRT {trt_version} on {platform.arch} is on {', '.join(elsewhere)}" if elsewhere else ""
        return f"platform {name} runs TensorRT {offered}, not {trt_version}{hint}"
    version = trt_version or platform.default_trt
    if dla and not platform.dla:
        return f"platform {name} ({platform.gpus}) has no DLA; drop dla_core"
    if dla and not trt_has_dla(version + (".1" if version == "11.4" else "")):
        return f"dla_core: TensorRT {version} does not build for the DLA ({DLA_TRT_VERSIONS}); choose another trt_version"
    return None


def arch_error(arch: str, trt_version: str) -> str | None:
    """Why TensorRT `trt_version` cannot build for `arch`; None when it can."""
    first = FIRST_TRT_FOR_ARCH.get(arch)
    if first and not _at_least(trt_version, first):
        return f"TensorRT {trt_version} does not build for {arch} ({ARCHITECTURES[arch]}); it needs TensorRT {first} or newer"
    return None


def tensorrt_for(arch: str, default: str = TRT_VERSION) -> str:
    """The TensorRT (major.minor) a target of `arch` that names no platform and no version runs:
    Jetson's through its first platform preset (Orin: JetPack 6's 10.3), else `default` (the
    recipe's stages.build.trt_version)."""
    jetson = next((p for p in PLATFORMS.values() if p.arch == arch and arch in JETSON_ARCHS), None)
    return jetson.default_trt if jetson else default


def requirements(trt_version: str) -> list[str]:
    """The pip requirements of a TensorRT line's bindings and Polygraphy (the Dockerfile installs
    these through `shipyard targets --requirements`; the `trt`/`trt10` extras pin the same)."""
    if trt_version not in TRT_RELEASES:
        raise KeyError(f"no TensorRT {trt_version!r} in the platform table; known: {', '.join(TRT_RELEASES)}")
    return [TRT_RELEASES[trt_version].wheel, POLYGRAPHY]


def shipped_trt_versions() -> list[str]:
    """TensorRT versions whose ONNX operator list ships in pipeline/trt/ops/."""
    return sorted((p.stem for p in OPS_DIR.glob("*.json")), key=lambda v: tuple(int(x) for x in v.split(".")))


def trt_has_dla(version: str) -> bool:
    """Whether this TensorRT (x.y.z) builds engines for Jetson's DLA."""
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    return parts <= (10, 7, 99) or parts >= (11, 4, 1)
