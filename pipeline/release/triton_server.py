"""Serve a packaged repository with the `tritonserver` binary of the `nvidia-pytriton` wheel.

    python -m pipeline.release.triton_server REPO [--port 8000]   # serves until Ctrl-C

The wheel ships the server and its Python backend only, built for NumPy 1.x, and PyTriton's own
`Triton().bind()` does not start here, so this drives `tritonserver` directly, with what the wheel
leaves to its user (measured on this machine):

- the backend folder: `libtriton_python.so`, the stub built for the running Python minor version
  (`python_backend_stubs/3.X/`), and `triton_python_backend_utils.py` behind a wrapper that puts
  a NumPy 1.x folder, this environment's site-packages and Shipyard first on `sys.path` (the stub
  reads no PYTHONPATH, and imports NumPy before any model.py runs: with NumPy 2 every tensor it
  hands over is garbage);
- `LD_LIBRARY_PATH` holding the wheel's `nvidia_pytriton.libs`.

The NumPy 1.x folder is `pip install --target DIR "numpy<2"` (the README's test command makes
`~/.cache/shipyard/triton-numpy`). NVML and DCGM warnings on a CPU machine are harmless.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import ShipyardError

NUMPY_1 = Path.home() / ".cache" / "shipyard" / "triton-numpy"
WRAPPER = '''import sys
for _path in reversed({paths!r}):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import _triton_utils_impl as _impl
globals().update({{k: v for k, v in vars(_impl).items() if not k.startswith("__")}})
'''


def wheel() -> Path:
    """The `tritonserver` folder of the installed nvidia-pytriton wheel, or a one-line error."""
    spec = importlib.util.find_spec("pytriton")
    folder = Path(spec.origin).parent / "tritonserver" if spec and spec.origin else None
    if folder is None or not (folder / "bin" / "tritonserver").is_file():
        raise ShipyardError("no tritonserver binary: pip install --no-deps nvidia-pytriton==0.7.0 (the README's test "
                            "command does)")
    return folder


def numpy_1(folder: Path = NUMPY_1) -> Path:
    """The NumPy 1.x folder the stub needs, or a one-line error naming how to make it."""
    if not (folder / "numpy" / "__init__.py").is_file():
        raise ShipyardError(f"no NumPy 1.x for the Triton Python stub at {folder}: pip install --target {folder} "
                            '"numpy<2"')
    return folder


def backends(work: Path, numpy_dir: Path) -> Path:
    """A backend folder for the wheel's Python backend under `work` (module docstring)."""
    server = wheel()
    stub = server / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not stub.is_file():
        raise ShipyardError(f"the nvidia-pytriton wheel has no Python backend stub for Python "
                            f"{sys.version_info.major}.{sys.version_info.minor}")
    python = Path(work) / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    shutil.copy(server / "backends" / "python" / "libtriton_python.so", python)
    shutil.copy(server / "backends" / "python" / "triton_python_backend_utils.py", python / "_triton_utils_impl.py")
    shutil.copy(stub, python)
    paths = [str(numpy_dir), sysconfig.get_paths()["purelib"], str(Path(__file__).resolve().parents[2])]
    (python / "triton_python_backend_utils.py").write_text(WRAPPER.format(paths=paths))
    return python.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(repository: Path, port: int | None = None, numpy_dir: Path | None = None,
          timeout: float = 120.0) -> Iterator[str]:
    """Start tritonserver on loopback for `repository`; yield its HTTP address once every model is
    ready; stop it (and its stubs) on exit, whatever happens."""
    import urllib.request

    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="shipyard-triton-") as work:
        command = [str(wheel() / "bin" / "tritonserver"), "--model-repository", str(repository),
                   "--backend-directory", str(backends(Path(work), numpy_dir or numpy_1())),
                   "--http-address", "127.0.0.1", "--http-port", str(port), "--allow-grpc", "false",
                   "--allow-metrics", "false", "--exit-timeout-secs", "2"]
        libs = Path(wheel()).parents[1] / "nvidia_pytriton.libs"
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))}
        log = Path(work) / "server.log"
        with log.open("w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    if process.poll() is not None:
                        raise ShipyardError(f"tritonserver exited ({process.returncode}): {log.read_text()[-400:]}")
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as reply:
                            if reply.status == 200:
                                break
                    except OSError:
                        pass
                    if time.monotonic() > deadline:
                        raise ShipyardError(f"tritonserver not ready after {timeout:.0f} s: {log.read_text()[-400:]}")
                    time.sleep(0.5)
                yield f"127.0.0.1:{port}"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    try:
        with serve(args.repository, args.port) as address:
            print(f"serving {args.repository} at http://{address} (Ctrl-C stops it)", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except ShipyardError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
