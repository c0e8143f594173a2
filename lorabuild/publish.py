"""Copy finished cache entries into ``output/``, where another program may hold them open.

ComfyUI, A1111 and Forge memory-map a loaded LoRA; on Windows ``os.replace`` onto a mapped file,
or ``unlink`` of it, fails with ``PermissionError`` for as long as the UI keeps it
(safetensors#164, #574). So a file whose bytes would not change is left alone, and a locked one
is not fatal: the new bytes go beside it as ``<stem>.new<suffix>`` with a warning naming both
paths. The entry stays in the cache, and the pending ``.new`` file makes the stage's doit task
out of date (:func:`pending`), so the next build publishes normally once the UI lets go.
No torch here: :func:`up_to_date` runs when doit checks the task graph.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from .cache import atomic_path

HINT = "close the LoRA in the UI that loaded it (or restart the UI) and build again"


def side_path(dst: Path) -> Path:
    """Where the new bytes go while ``dst`` is locked: ``demo.safetensors`` -> ``demo.new.safetensors``."""
    return dst.with_name(f"{dst.stem}.new{dst.suffix}")


def same_bytes(src: Path, dst: Path, hashes=None) -> bool:
    """True when ``dst`` already holds ``src``'s bytes: sizes first, then sha256 (memoised by
    ``hashes``, a :class:`~lorabuild.cache.FileHashes`, so an unchanged pair is not re-read)."""
    try:
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            return False
        if hashes is not None:
            return hashes.sha256(dst) == hashes.sha256(src)
        with open(src, "rb") as a, open(dst, "rb") as b:
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def _warn(notes: list | None, text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)
    if notes is not None:
        notes.append(text)


def publish(src: Path, dst: Path, hashes=None, notes: list | None = None, write=None) -> Path:
    """Put ``src``'s bytes at ``dst`` (or, with ``write(tmp)``, what it writes) and return the
    path that holds them: ``dst``, or its side file when ``dst`` is locked."""
    dst = Path(dst)
    side = side_path(dst)
    if write is None and same_bytes(Path(src), dst, hashes):
        remove(side, None)
        return dst
    write = write or (lambda tmp: shutil.copyfile(src, tmp))
    try:
        with atomic_path(dst) as tmp:
            write(tmp)
    except PermissionError as exc:
        try:
            with atomic_path(side) as tmp:
                write(tmp)
        except PermissionError:
            _warn(notes, f"{dst} and {side} are both open in another program ({exc.strerror}); "
                         f"they were left as they were, and the new file is kept in the cache: {HINT}")
            return dst
        _warn(notes, f"{dst} is open in another program ({exc.strerror}), so the new file was written "
                     f"beside it as {side}: {HINT}, and it replaces {dst.name}")
        return side
    remove(side, None)
    return dst


def remove(path: Path, notes: list | None = None) -> bool:
    """Delete ``path`` if it exists; a locked one is kept with a warning (pruning never fails a build)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        _warn(notes, f"{path} is open in another program ({exc.strerror}) and was not deleted; "
                     "delete it yourself once the program lets it go")
        return False


def pending(folder: Path, pattern: str = "*") -> list[Path]:
    """The side files a locked publish left in ``folder`` (``pattern`` narrows them to one output)."""
    with contextlib.suppress(OSError):
        return sorted(p for p in Path(folder).glob(f"{pattern}.new.*") if p.is_file())
    return []


def up_to_date(folder: str, pattern: str = "*") -> bool:
    """doit ``uptodate`` item: out of date while a locked publish is waiting to be redone."""
    return not pending(Path(folder), pattern)
