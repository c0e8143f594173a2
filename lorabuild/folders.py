"""Folder installs and links that work on Windows without privileges.

- :func:`atomic_dir` gives a temp folder to write a model into and installs it when the block
  ends (one home for the pattern that a killed or concurrent run never sees a partial folder).
- :func:`install_dir` renames a finished temp folder into place. Windows refuses to rename a
  folder while any file in it is open, and Defender or the search indexer open every new file
  to scan it (a multi-GB checkpoint takes seconds), so it backs off and retries for about 15 s,
  as joblib's rename does on Windows, before giving up with a message naming what it installs.
- :func:`link_tree` makes ``dst`` show ``src``'s files: a symlink where allowed, else hard links
  per file (no privilege needed on NTFS, no bytes copied), a copy only across volumes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from .errors import ModelError

ATTEMPTS = 30
DELAY = 0.5  # seconds, the longest wait between two attempts


@contextlib.contextmanager
def atomic_dir(folder: Path, ok, what: str):
    """``with atomic_dir(folder, ok, what) as tmp:`` write into ``tmp`` (not created: the writer
    makes it); when the block ends without an error ``tmp`` is installed at ``folder``
    (:func:`install_dir`); whatever is left of ``tmp`` is removed in any case."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder)
    try:
        yield tmp
        install_dir(tmp, folder, ok, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_dir(tmp: Path, folder: Path, ok, what: str) -> None:
    """Rename ``tmp`` to ``folder``: keep a current one another process installed first (``ok``),
    set a stale one aside, wait out a scanner holding a file open."""
    last: OSError | None = None
    for attempt in range(ATTEMPTS):
        try:
            os.replace(tmp, folder)  # atomic: a half-written model is never visible
            return
        except OSError as exc:
            last = exc
            if ok(folder):
                return  # another process won the race: keep theirs (same bytes)
            if folder.exists() and _set_aside(folder, what):
                continue
        time.sleep(min(DELAY, 0.05 * 2 ** attempt))
    raise ModelError(f"could not install {what} at {folder} ({last}); another program (an antivirus scan, "
                     f"the search indexer) may be holding a file in {tmp} open: run the build again")


def _set_aside(folder: Path, what: str) -> bool:
    """Move an outdated or broken ``folder`` out of the way; False when a held file blocks it."""
    old = folder.with_name(f".{folder.name[:16]}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, old)
    except PermissionError:
        return False  # something holds a file in it: wait and retry
    except OSError as exc:
        raise ModelError(f"{folder} is an outdated or broken copy of {what} and cannot be replaced ({exc}); "
                         "delete it and run again") from None
    shutil.rmtree(old, ignore_errors=True)  # a leftover is found by `lorabuild gc`
    return True


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s files: a directory symlink, else a hard link per file."""
    try:
        os.symlink(src, dst, target_is_directory=True)
        return
    except OSError:  # no symlink privilege (Windows without Developer Mode)
        pass
    copied = 0
    for dirpath, _dirs, files in os.walk(src):
        here = dst / Path(dirpath).relative_to(src)
        here.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(dirpath) / name, here / name)
            except OSError:  # another volume, or a file system without hard links
                shutil.copyfile(Path(dirpath) / name, here / name)
                copied += (here / name).stat().st_size
    if copied > 1 << 20:
        print(f"lorabuild: {src} is on another drive than the cache, so {copied / 2**30:.2f} GiB were copied to "
              f"{dst} (no symlink privilege: enable Windows Developer Mode to link instead)", file=sys.stderr)


def temp_sibling(folder: Path) -> Path:
    """A temp folder beside ``folder``, short (MAX_PATH), named ``.*.tmp-<pid>-*`` for `lorabuild gc`."""
    return folder.with_name(f".{folder.name[-16:]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
