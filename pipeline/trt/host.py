"""Which TensorRT and GPU this machine has, and whether an engine built here runs on a target.

Below the stages so that runners (an engine runner needs the same check) and the build stage share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ShipyardError
from pipeline.platforms import DLA_TRT_VERSIONS, trt_has_dla
from pipeline.recipe import TargetSpec

DOCKER_HINT = ("engine builds run on a GPU host: docker run --gpus all ... shipyard-trt (see docs/tensorrt.md)")


class BuildUnavailable(ShipyardError):
    """This machine cannot build the engine (no TensorRT, no CUDA device, wrong architecture)."""


@dataclass(frozen=True)
class BuildEnvironment:
    trt_version: str
    gpu_name: str
    arch: str  # of the local GPU, e.g. "sm_80"
    cuda: str = ""  # the CUDA runtime torch was built with (the engine runner's)
    driver: str = ""  # the NVIDIA driver


def build_environment() -> BuildEnvironment:
    """The local TensorRT and GPU, or `BuildUnavailable` naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildUnavailable(f"TensorRT is not installed here (no 'tensorrt' module); {DOCKER_HINT}") from None
    try:
        import torch

        if not torch.cuda.is_available():
            raise BuildUnavailable(f"TensorRT {trt.__version__} is installed but no CUDA device is visible; {DOCKER_HINT}")
        major, minor = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
    except ImportError:
        raise BuildUnavailable("torch is not installed; the engine runner allocates GPU buffers with it") from None
    return BuildEnvironment(trt_version=trt.__version__, gpu_name=name, arch=f"sm_{major}{minor}",
                            cuda=str(torch.version.cuda or ""), driver=nvidia_gpu()[1] or "")


def nvidia_gpu() -> tuple[str | None, str | None]:
    """The first GPU's name and the NVIDIA driver version, from nvidia-smi (None, None without one)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                name, driver = (part.strip() for part in out[0].split(",", 1))
                return name, driver
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return None, None


def check_target_arch(target: TargetSpec, env: BuildEnvironment) -> None:
    """Refuse a build that would produce an engine the target GPU cannot run."""
    local_trt = ".".join(env.trt_version.split(".")[:2])
    if local_trt != target.tensorrt:
        raise BuildUnavailable(
            f"target {target.name} runs TensorRT {target.tensorrt} but this is TensorRT {env.trt_version}: "
            f"engines do not load across TensorRT versions and the graph was checked against {target.tensorrt}'s "
            f"parser; build where TensorRT {target.tensorrt} is installed or set the target's trt_version: "
            f"{local_trt}")
    local = int(env.arch.removeprefix("sm_"))
    wanted = int(target.arch.removeprefix("sm_"))
    if target.hardware_compatibility == "ampere_plus":
        if local < 80:
            raise BuildUnavailable(f"target {target.name}: hardware_compatibility ampere_plus engines are built on "
                                   f"sm_80 or newer; this GPU ({env.gpu_name}) is {env.arch}")
    elif local != wanted:
        raise BuildUnavailable(
            f"target {target.name} is {target.arch} but this GPU ({env.gpu_name}) is {env.arch}: the engine would "
            f"not run there; build on a {target.arch} host (shipyard plan fans out per target) or set "
            "hardware_compatibility: ampere_plus")
    if target.dla_core is not None and not trt_has_dla(env.trt_version):
        raise BuildUnavailable(f"target {target.name}: dla_core needs {DLA_TRT_VERSIONS}; this is TensorRT "
                               f"{env.trt_version}; drop dla_core or build with JetPack's TensorRT")
