"""The content-addressed stage cache, and where Shipyard keeps what outlives a run (crash logs).

Olive's cache and Bazel's action cache, reduced to what a release run needs: a stage's outputs
are stored under a key made of everything that shapes their bytes (the input artifact's
sha256, the stage's resolved options, a digest of the tokenized rows it reads, and the versions
of the tools that write them, Shipyard's own source included). A rerun with nothing changed
copies the entries into the release instead of recomputing them; changing one option changes
only the keys of the stages that read it.

Entries are written to a temporary folder and renamed into place, so a killed run never leaves
an entry half-written, and every file is checked against its recorded sha256 before reuse: a
damaged entry is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, ParamSpec

import numpy as np
from pydantic import BaseModel

from pipeline.artifacts import Artifact, StageResult, external_data_files, sha256_file
from pipeline.errors import OutputError
from pipeline.run.cache_size import DEFAULT_MAX_SIZE, configured_max_size
from pipeline.run.lock import guard, release, try_hold

P = ParamSpec("P")  # a stage's parameters: `call` is type-checked against the stage it calls
CACHE_FORMAT = 1
SWEEP_LOCK = ".sweep.lock"  # held shared while a partial entry is made, exclusive by a sweep


def shipyard_home() -> Path:
    """SHIPYARD_CACHE_DIR, else $XDG_CACHE_HOME/shipyard, else ~/.cache/shipyard."""
    configured = os.environ.get("SHIPYARD_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shipyard"


def write_crash_log(err: BaseException, argv: list[str]) -> Path:
    """Write the traceback of an unexpected error where the user can find it; returns the path.

    The file is created new under a random name (mkstemp: O_EXCL, mode 0600), so a name
    planted in a shared /tmp, or a symlink there, is never followed or overwritten."""
    text = f"shipyard {' '.join(argv[1:])}\n\n" + "".join(traceback.format_exception(err))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for folder in (shipyard_home() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"shipyard-crash-{stamp}-", suffix=".log", dir=folder)
            with os.fdopen(fd, "w") as log:
                log.write(text)
            return Path(name)
        except OSError:
            continue
    return Path("<no writable log folder>")


@cache
def source_digest() -> str:
    """sha256 of Shipyard's own source: an edited checkout must not reuse entries of the old code."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in ("pipeline", "calibration"):
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@cache
def keyed_versions() -> dict[str, str]:
    """The manifest's tool versions (every library that shapes an artifact), Shipyard's source
    digest, the cache layout's version and the CPU the kernels ran on."""
    from pipeline.release.manifest import cpu_kernel_features, tool_versions

    return {**tool_versions(), "shipyard-source": source_digest(), "cache-format": str(CACHE_FORMAT),
            "cpu": cpu_kernel_features()}


def digest_of(value: Any) -> str:
    """sha256 of a JSON-able value (options, specs, fingerprints), keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def batches_digest(batches: Iterable[dict[str, np.ndarray]]) -> str:
    """sha256 of tokenized batches: names, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class StageCache:
    """Stage outputs by key, under `root/stages/<key>/`: the files and an `entry.json` recording
    each file's sha256 and the stage's record (its result, artifacts and figures)."""

    root: Path | None  # None: caching off (--no-cache)
    max_size: int | None = DEFAULT_MAX_SIZE  # bytes, least-recently-used entries removed past it
    hits: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)  # keys removed to stay under max_size

    @classmethod
    def at(cls, folder: Path | None, enabled: bool = True) -> StageCache:
        """The cache in `folder` (default: shipyard_home()), entries under its `stages/`; checked
        writable up front, capped at `configured_max_size()`."""
        if not enabled:
            return cls(None)
        max_size = configured_max_size()
        root = (Path(folder).expanduser() if folder is not None else shipyard_home()) / "stages"
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")
            probe.close()
        except OSError as err:
            raise OutputError(f"cache folder {root} is not writable ({err.strerror}); set SHIPYARD_CACHE_DIR, "
                              "pass --cache-dir DIR, or --no-cache") from None
        cache = cls(root, max_size)
        cache._remove_stale_partials()
        return cache

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def key(self, stage: str, inputs: dict[str, Any]) -> str:
        return digest_of({"stage": stage, "inputs": inputs, "tools": keyed_versions()})

    def load(self, stage: str, key: str, dest: Path) -> dict[str, Any] | None:
        """Copy a verified entry's files into `dest` and return its record, or None (a miss).

        An entry whose files do not match their recorded sha256 is deleted and reported as a miss.
        A hit marks the entry used now (its entry.json's mtime), for `prune`'s LRU order; loads
        hold the sweep lock shared, so a prune never deletes an entry while it is being copied."""
        if self.root is None:
            return None
        entry = self.root / key
        with guard(self.root / SWEEP_LOCK, exclusive=False):
            try:
                meta = json.loads((entry / "entry.json").read_text())
                files = meta["files"]
                if any(sha256_file(entry / name) != sha for name, sha in files.items()):
                    raise ValueError("a file differs from its recorded sha256")
            except (OSError, ValueError, KeyError, TypeError):
                if not entry.exists():  # no such entry: a miss
                    return None
                self.damaged.append(stage)  # unreadable, a file gone, or a file changed
                _delete_entry(entry)
                return None
            for name in files:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(entry / name, dest / name)
            try:
                os.utime(entry / "entry.json")
            except OSError:  # a read-only shared cache: LRU order is its owner's business
                pass
        self.hits.append(stage)
        return meta["record"]

    def entries(self) -> list[CacheEntry]:
        """Every finished entry, most recently used first."""
        if self.root is None:
            return []
        found = [CacheEntry.of(folder) for folder in self.root.iterdir()
                 if folder.is_dir() and not folder.name.startswith(".")]
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def prune(self, max_size: int | None = None, older_than: float | None = None) -> list[CacheEntry]:
        """Remove entries unused for more than `older_than` seconds, then the least recently used
        until the rest fit in `max_size` bytes; returns those removed. Waits for loads in progress."""
        if self.root is None:
            return []
        removed = []
        with guard(self.root / SWEEP_LOCK, exclusive=True, wait=True):
            total, now, full = 0, time.time(), False
            for entry in self.entries():  # newest first: keep the newest that fit
                full = full or (max_size is not None and total + entry.size > max_size)
                if full or (older_than is not None and now - entry.last_used > older_than):
                    removed.append(entry)
                else:
                    total += entry.size
            for entry in removed:
                _delete_entry(self.root / entry.key)
        return removed

    def store(self, key: str, files: dict[str, Path], record: dict[str, Any]) -> None:
        """Store `files` (name in the entry -> path) and `record` under `key`, atomically."""
        if self.root is None:
            return
        final = self.root / key
        if final.exists():
            return
        tmp, lock, fd = self._partial(key)
        try:
            hashes = {}
            for name, path in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / name)
                hashes[name] = sha256_file(tmp / name)
            (tmp / "entry.json").write_text(json.dumps({"files": hashes, "record": record}, default=str))
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.exists():  # not a concurrent writer that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            release(lock, fd)
        if self.max_size is not None:
            self.evicted += [entry.key for entry in self.prune(self.max_size)]

    def _partial(self, key: str) -> tuple[Path, Path, int]:
        """A new partial entry `.KEY.RANDOM.partial`, and its lock file held by this process.

        Both are made while the cache's sweep lock is held shared, so a sweep (which holds it
        exclusive) never sees a lock file that is not yet locked."""
        assert self.root is not None
        with guard(self.root / SWEEP_LOCK, exclusive=False):
            handle, name = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".partial.lock", dir=self.root)
            os.close(handle)
            lock = Path(name)
            fd = try_hold(lock)
            assert fd is not None, "a fresh lock file is free"
            tmp = lock.with_suffix("")
            tmp.mkdir()
        return tmp, lock, fd

    def _remove_stale_partials(self) -> None:
        """Remove the partial entries of writers that died: those whose lock file can be taken
        (the kernel freed it with its holder, in whatever PID namespace it ran). Skipped while
        another process is creating an entry; its next run sweeps."""
        if self.root is None:
            return
        with guard(self.root / SWEEP_LOCK, exclusive=True) as held:
            if not held:
                return
            for tmp in self.root.glob(".*.partial"):
                lock = tmp.with_name(tmp.name + ".lock")
                fd = try_hold(lock)  # a partial without its lock file is a dead writer's too
                if fd is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    release(lock, fd)
            for lock in self.root.glob(".*.partial.lock"):  # a writer that died after its rename
                fd = try_hold(lock)
                if fd is not None:
                    release(lock, fd)


@dataclass(frozen=True)
class CacheEntry:
    """One finished entry as `shipyard cache ls` shows it."""

    key: str
    stage: str
    size: int  # bytes
    last_used: float  # epoch seconds: stored, or last copied into a run

    @classmethod
    def of(cls, folder: Path) -> CacheEntry:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        meta = folder / "entry.json"
        try:
            record = json.loads(meta.read_text())["record"]
            stage = record.get("stage") or record.get("result", {}).get("stage") or "unnamed"
            last_used = meta.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            stage, last_used = "damaged", folder.stat().st_mtime
        return cls(folder.name, str(stage), size, last_used)


def _delete_entry(entry: Path) -> None:
    """Remove a finished entry: renamed first to a partial's name (one step, so a kill never
    leaves half an entry under its key), which the next sweep removes if this one cannot."""
    doomed = entry.with_name(f".{entry.name[:16]}.{os.urandom(4).hex()}.partial")
    try:
        os.replace(entry, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def call_identity(value: Any, work: Path) -> Any:
    """What a stage's cache key records of one argument it is called with: an artifact's content
    and kind, a spec's settings, batches' bytes, a file's or folder's content (a path inside the
    work folder: its name there), a task's options. An argument of another kind is a bug here,
    not a silent miss: a key that leaves out what a stage read serves stale output."""
    from pipeline.release.manifest import folder_sha256

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Artifact):
        return {"artifact": value.sha256, "name": value.name, "kind": value.kind, "precision": value.precision,
                "from_pruned": value.from_pruned,
                **({"external_data": value.external_data} if value.external_data else {})}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        if value.resolve().is_relative_to(work.resolve()):
            return {"in_work": str(value.resolve().relative_to(work.resolve()))}
        if value.is_file():
            data = {p.name: sha256_file(p) for p in external_data_files(value)}
            return {"file": sha256_file(value), **({"external_data": data} if data else {})}
        return {"folder": folder_sha256(value)} if value.is_dir() else {"missing": str(value)}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(b, dict) and all(isinstance(a, np.ndarray) for a in b.values()) for b in value):
            return {"batches": batches_digest(value)}
        return [call_identity(v, work) for v in value]
    if isinstance(value, dict):
        return {str(k): call_identity(v, work) for k, v in value.items()}
    identity = getattr(value, "cache_identity", None)
    if callable(identity):
        return call_identity(identity(), work)
    if is_dataclass(value) and not isinstance(value, type):
        return repr(value)  # frozen option records: Task, TypedVariant
    raise TypeError(f"no cache identity for a {type(value).__name__} argument; give it cache_identity()")


class CachedStages:
    """Runs a stage, or copies its outputs from the cache when its inputs are unchanged."""

    def __init__(self, cache: StageCache, work: Path) -> None:
        self.cache, self.work = cache, work

    def run(self, stage: str, inputs: dict[str, Any], produce: Callable[[], StageResult],
            extra: Callable[[StageResult], dict] = lambda result: {}) -> tuple[StageResult, dict]:
        key = self.cache.key(stage, inputs)
        record = self.cache.load(stage, key, self.work)
        if record is not None:
            return self._result(record), record["extra"]
        result = produce()
        files = {str(p.relative_to(self.work)): p for p in [f for a in result.artifacts for f in a.files()] + result.files}
        made: dict[str, Any] = extra(result)
        record = {"result": {k: getattr(result, k) for k in ("stage", "passed", "message", "seconds", "details")},
                  "artifacts": [{**{k: getattr(a, k) for k in ("name", "format", "precision", "stage", "options",
                                                                   "kind", "from_pruned")}, "path": str(a.path.relative_to(self.work))}
                                for a in result.artifacts],
                  "files": [str(p.relative_to(self.work)) for p in result.files], "extra": made}
        self.cache.store(key, files, json.loads(json.dumps(record, default=str)))
        return result, made

    def call(self, stage: str, fn: Callable[P, StageResult], *args: P.args, **kwargs: P.kwargs
             ) -> tuple[StageResult, dict]:
        """`fn(*args, **kwargs)`, or its outputs from the cache: the key is derived from what `fn` is
        called with (`call_identity` of each argument), so a stage that gains a parameter cannot be
        served an entry made without it."""
        return self.run(stage, self.identity(fn, *args, **kwargs), lambda: fn(*args, **kwargs))

    def identity(self, fn: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The cache key's inputs for calling `fn` with these arguments (`call_identity` of each)."""
        return {"fn": f"{fn.__module__}.{fn.__qualname__}",
                "args": [call_identity(a, self.work) for a in args],
                "kwargs": {k: call_identity(v, self.work) for k, v in sorted(kwargs.items())}}

    def _result(self, record: dict) -> StageResult:
        artifacts = [Artifact(**{**a, "path": self.work / a["path"]}) for a in record["artifacts"]]
        return StageResult(**record["result"], artifacts=artifacts, files=[self.work / f for f in record["files"]],
                           cached=True)
