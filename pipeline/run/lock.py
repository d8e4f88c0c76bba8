"""One writer per release folder whatever path names it, and no leftovers of writers that died.

A lock is an OS file lock (`flock`) on a file that lives with what it guards: `.NAME.lock` in
the release folder's real parent (symlinks resolved), so a symlinked path, or a container that
bind-mounts the folder's parent at another path, meets the same file and so the same lock; a
lock keyed by a path string under $HOME could not. The kernel releases a lock when its holder
dies, SIGKILL included, and across PID namespaces: a lock that can be taken is a lock whose
owner is gone, which is the only liveness test used here (a pid means nothing in another
container). The lock file also names the holder (pid, host, start time, command) for the
message a second run prints, and is unlinked by its holder before release; a run that finds the
file replaced after it took the lock takes the new one (the usual flock-and-unlink protocol).

Temporary `.NAME.*.partial` folders beside the release can only belong to a run that held the
lock, so the next holder removes them. The stage cache's half-written entries follow the same
rule (`try_hold`, `guard`): each has a lock file its writer holds, and only an entry whose
lock can be taken is removed.

Written on `fcntl` rather than `filelock`: `filelock` truncates the file when it opens it, which
would erase the holder's name while the holder runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.artifacts import made_parents
from pipeline.errors import OutputError


def lock_path(out: Path) -> Path:
    """The lock file of release folder `out`: beside the folder its path resolves to."""
    real = Path(out).resolve()
    return real.with_name(f".{real.name}.lock")


def try_hold(path: Path, wait: bool = False) -> int | None:
    """Open and lock `path` (created if missing); the open descriptor while it is held, None
    when another process holds it (at once, unless `wait`)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder we waited for unlinked the file we locked: lock the current one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release(path: Path, fd: int) -> None:
    """Unlink the lock file `path` held through `fd`, then free it."""
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextmanager
def guard(path: Path, exclusive: bool, wait: bool = False) -> Iterator[bool]:
    """Hold the permanent lock file `path` for the block: shared (waiting for an exclusive
    holder), or exclusive (waiting only when `wait`); yields whether it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)) if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextmanager
def release_lock(out: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of release folder `out` for the block; a live holder makes this raise
    `OutputError` at once (or wait for it when `wait`). Folders above `out` that do not exist yet
    are made, and removed again if the block fails (`made_parents`), as for every output."""
    path = lock_path(out)
    with made_parents(path):
        try:
            fd = try_hold(path, wait)
        except OSError as err:
            raise OutputError(f"output {out}: its lock {path} cannot be created ({err.strerror}); choose a "
                              "writable --out") from None
        if fd is None:
            raise OutputError(f"output {out} is being written by another run ({_holder(path)}); wait for it, "
                              "pass --wait, or choose another --out")
        try:
            os.write(fd, json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv), "folder": str(Path(out).resolve()),
            }).encode())
            remove_stale_partials(out)
            yield
        finally:
            release(path, fd)


def _holder(path: Path) -> str:
    try:
        owner = json.loads(path.read_text())
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
