"""What killed or interrupted runs leave in ``cache/`` besides entries, for ``lorabuild gc``.

- ``.*.tmp-*`` files and folders anywhere in the cache: atomic writes (cache.py) and model
  installs (folders.py) whose process died, or whose cleanup Windows refused (a converted
  checkpoint still mapped when its temp folder was deleted);
- ``.*.old-*`` folders: outdated models set aside and not deleted;
- ``cache/jobs/<id>/``: the hand-off folders of multi-process runs.

A build running meanwhile owns some of them. Each running stage holds its project's lock
(``cache/locks/<project>.lock``), so while any is held only what is older than a day goes
(a write in progress touches its file; a day is far beyond any single write), and job folders
stay (a multi-process training can run for days without touching its folder). With no build
running, anything older than an hour goes.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

BUSY_AGE = 24 * 3600  # seconds
IDLE_AGE = 3600


def build_running(cache: Path) -> bool:
    """True while any project's lock is held (a build of this workspace is in a stage)."""
    from filelock import FileLock, Timeout

    for path in sorted((cache / "locks").glob("*.lock")):
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
    return False


def _age(path: Path, now: float) -> float:
    """Seconds since anything in ``path`` last changed."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                except OSError:
                    pass
    return now - newest


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return path.lstat().st_size


def find(cache: Path, now: float | None = None) -> tuple[list[Path], list[Path], bool]:
    """(leftovers to remove, leftovers kept because a build may own them, a build is running)."""
    now = time.time() if now is None else now
    busy = build_running(cache)
    min_age = BUSY_AGE if busy else IDLE_AGE
    candidates: list[Path] = []
    for dirpath, dirs, files in os.walk(cache):
        for name in list(dirs) + files:
            if name.startswith(".") and (".tmp-" in name or ".old-" in name):
                candidates.append(Path(dirpath) / name)
        dirs[:] = [d for d in dirs if not (d.startswith(".") and (".tmp-" in d or ".old-" in d))]
    remove, keep = [], []
    for p in sorted(candidates):
        (remove if _age(p, now) > min_age else keep).append(p)
    jobs = sorted(p for p in (cache / "jobs").glob("*") if p.is_dir()) if (cache / "jobs").is_dir() else []
    for p in jobs:
        (keep if busy or _age(p, now) <= IDLE_AGE else remove).append(p)
    return remove, keep, busy


def remove(paths: list[Path], dry_run: bool) -> tuple[int, int]:
    """Delete ``paths`` (unless ``dry_run``); returns (how many went, bytes freed)."""
    count = freed = 0
    for p in paths:
        try:
            size = _size(p)
            if not dry_run:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        except OSError as exc:  # held open (Windows) or already gone
            print(f"gc: could not remove {p} ({exc.strerror or exc}); it is kept")
            continue
        count += 1
        freed += size
    return count, freed
