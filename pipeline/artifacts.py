"""What stages produce: files with their hash, and per-stage results with their gates."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError
from pipeline.names import Kind, Precision
from pipeline.runtimes import ArtifactFormat, runtime


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def external_data_files(path: Path) -> list[Path]:
    """The external data files an ONNX graph file keeps its weights in (beside it), in the order
    the weights name them; [] for any other file or a graph with its weights inline. A model over
    protobuf's 2 GB limit has one: it is part of the artifact, hashed, cached and shipped with it."""
    path = Path(path)
    if path.suffix != ".onnx" or not path.is_file() or not _mentions(path, b"location"):
        return []  # every external reference names its file under the key "location": no parse needed
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names: dict[str, None] = {}
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.setdefault(next(e.value for e in tensor.external_data if e.key == "location"))
    return [path.parent / name for name in names]


def companion_files(path: Path, fmt: str) -> list[Path]:
    """The files an artifact of format `fmt` keeps beside its main file (`pipeline.runtimes`):
    ONNX external data, an OpenVINO IR's weights; part of the artifact wherever it goes."""
    how = runtime(fmt).companions
    if how == "onnx-external-data":
        return external_data_files(path)
    if how == "weights-bin":
        weights = Path(path).with_suffix(".bin")
        return [weights] if weights.is_file() else []
    return []


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain `needle` (a scan at memory speed, no parse)."""
    import mmap

    if path.stat().st_size == 0:
        return False
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(needle) >= 0


def kind_of(precision: str, from_pruned: bool) -> Kind:
    """The gate an artifact answers to: float models made from a pruned one take the pruned gate
    (pruning, not precision, dominates their error); INT8 ones always take the INT8 gate."""
    return "pruned" if from_pruned and precision != "int8" else precision  # type: ignore[return-value]


@dataclass
class Artifact:
    """A file a stage wrote, identified by its content. Its lineage, `from_pruned` (a pruned or
    recovered graph is the artifact or in its ancestry), is set once by the stage that makes it,
    from its source's; `kind` (fp32, pruned, fp16, int8), the gate that judges it, follows from
    that and its precision (`kind_of`)."""

    name: str
    path: Path
    format: ArtifactFormat  # its runtime's entry in `pipeline.runtimes`
    precision: Precision
    stage: str
    options: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    size_bytes: int = 0
    kind: str = ""
    from_pruned: bool = False
    # Its companion files (`companion_files`: ONNX external data, OpenVINO weights), by name beside `path` -> sha256.
    external_data: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.kind = self.kind or kind_of(self.precision, self.from_pruned)
        if not self.sha256 and self.path.exists():
            self.refresh()

    def refresh(self) -> None:
        """Re-read hashes and size (the main file's and its companions') from disk."""
        self.sha256 = sha256_file(self.path)
        data = companion_files(self.path, self.format)
        self.external_data = {p.name: sha256_file(p) for p in data}
        self.size_bytes = sum(p.stat().st_size for p in [self.path, *data])

    def files(self) -> list[Path]:
        """The artifact's files: the graph, IR or engine, then its companions."""
        return [self.path, *(self.path.parent / name for name in self.external_data)]


@dataclass
class StageResult:
    """One stage's outcome: its artifacts, its gate (if any) and how long it took."""

    stage: str
    artifacts: list[Artifact] = field(default_factory=list)
    passed: bool = True
    message: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # written beside the artifacts (a config.json)
    cached: bool = False  # reused from the stage cache, not recomputed


def check_writable_parent(path: Path) -> None:
    """Fail before any work if `path` cannot be created."""
    parent = Path(path).resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    try:  # a real probe: os.access says yes to root on /proc and read-only mounts
        if not existing.is_dir():
            raise NotADirectoryError
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        raise OutputError(f"output {path}: folder {existing} is not writable; choose another --out") from None


def check_output_file(path: Path, overwrite: bool) -> None:
    """Fail before any work if a stage's output file exists (without --overwrite) or can't be made:
    the rule `check_output_dir` applies to release folders, for the standalone stage commands."""
    if Path(path).is_dir():
        raise OutputError(f"output {path} is a folder; pass a file path as --out (e.g. {Path(path) / 'model.onnx'})")
    if Path(path).exists() and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite or choose another --out")
    check_writable_parent(path)


@contextmanager
def made_parents(path: Path) -> Iterator[list[Path]]:
    """Create the missing folders above `path` for the block and remove them again (those still
    empty) if it fails, so a failed command leaves no folder it made; yields the folders made."""
    missing = [p for p in Path(path).absolute().parents if not p.exists()][::-1]
    for folder in missing:
        folder.mkdir(exist_ok=True)
    try:
        yield missing
    except BaseException:
        for folder in reversed(missing):
            try:
                folder.rmdir()
            except OSError:  # something else wrote into it meanwhile: it stays
                break
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    check_writable_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are shared files
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail before any work if the release folder exists (without --overwrite) or can't be made."""
    path = Path(path)
    occupied = any(path.iterdir()) if path.is_dir() else path.exists()
    if occupied and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite or choose another --out")
    check_writable_parent(path)


@contextmanager
def atomic_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds
    (replacing an old one as `replace_dir` does)."""
    path = Path(path)
    restore_replaced(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def aside(path: Path) -> Path:
    """Where `replace_dir` parks the old `path` while the new one is renamed in (no exchange)."""
    return path.with_name(f".{path.name}.replaced")


def replace_dir(new: Path, path: Path) -> None:
    """Put folder `new` at `path`, so that a SIGKILL at any instant leaves a whole release there
    or restorable: where the kernel can swap two names in one step (Linux renameat2
    RENAME_EXCHANGE) `path` holds the old or the new folder at every instant, and the old one,
    now under `new`'s temporary name, is deleted after; elsewhere the old folder is renamed to
    `aside(path)`, the new one renamed into place, then the old one deleted, and a kill between
    the two renames is undone by `restore_replaced` before the next write."""
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new) if new.is_dir() else new.unlink()
        return
    parked = aside(path)
    if parked.exists():
        shutil.rmtree(parked)
    os.replace(path, parked)
    os.replace(new, path)
    shutil.rmtree(parked) if parked.is_dir() else parked.unlink()


def restore_replaced(path: Path) -> None:
    """Undo a replacement a kill interrupted: the old folder parked aside goes back to `path` if
    nothing is there, else (the new one made it) it is deleted."""
    parked = aside(Path(path))
    if not parked.exists():
        return
    if Path(path).exists():
        shutil.rmtree(parked) if parked.is_dir() else parked.unlink()
    else:
        os.replace(parked, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically (Linux renameat2 with RENAME_EXCHANGE, through libc,
    which Python's os module does not expose); False where the system or file system has none."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))
