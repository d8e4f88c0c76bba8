"""One writer per release folder, and no leftovers of writers that died.

The lock is `filelock`'s (an OS file lock, `flock`): the kernel releases it when its process
dies, SIGKILL included, so a stale lock is simply free for the next run. It lives in Shipyard's
own folder (`shipyard_home()/locks`, named by the release path's hash), not beside the release,
so a release folder's parent holds nothing but releases; an owner file names the holder (pid,
host, start time, command) for the message a second run prints.
Temporary `.NAME.*.partial` folders beside the release can only belong to a run that held the
lock, so the next holder removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import OutputError
from pipeline.run.cache import shipyard_home


def _paths(out: Path) -> tuple[Path, Path]:
    name = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:32]
    folder = shipyard_home() / "locks"
    return folder / f"{name}.lock", folder / f"{name}.owner"


@contextmanager
def release_lock(out: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of release folder `out` for the block; a live holder makes this raise
    `OutputError` at once (or wait for it when `wait`)."""
    from filelock import FileLock, Timeout

    lock_path, owner_path = _paths(out)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"lock folder {lock_path.parent} cannot be created ({err.strerror}); set "
                          "SHIPYARD_CACHE_DIR to a writable folder") from None
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise OutputError(f"output {out} is being written by another run ({_holder(owner_path)}); wait for it, "
                          "pass --wait, or choose another --out") from None
    except PermissionError:
        raise OutputError(f"lock folder {lock_path.parent} is not writable; set SHIPYARD_CACHE_DIR to a writable "
                          "folder") from None
    try:
        owner_path.write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
        }))
        remove_stale_partials(out)
        yield
    finally:
        owner_path.unlink(missing_ok=True)
        lock.release()


def _holder(owner_path: Path) -> str:
    try:
        owner = json.loads(owner_path.read_text())
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary folders and files of earlier runs into `out` (call with the lock held)."""
    out = Path(out).resolve()
    removed = []
    # mkdtemp/mkstemp add 8 random characters: ".out.????????.partial" never matches ".out-v2.…".
    for path in out.parent.glob(f".{out.name}.????????.partial"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed
