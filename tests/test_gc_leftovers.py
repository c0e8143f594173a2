"""`lorabuild gc` removes what killed runs leave (temp files and folders, job folders), and
keeps what a running build may still own."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from filelock import FileLock
from conftest import init_workspace


def _gc(root, *args):
    return subprocess.run([sys.executable, "-m", "lorabuild", "gc", *args], cwd=root, capture_output=True, text=True)


def _aged(path, hours: float, size: int = 0, folder: bool = False):
    if folder:
        (path / "unet").mkdir(parents=True)
        (path / "unet" / "w.safetensors").write_bytes(b"x" * size)
        files = [path / "unet" / "w.safetensors", path / "unet", path]
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        files = [path]
    t = time.time() - hours * 3600
    for f in files:
        os.utime(f, (t, t))
    return path


def test_gc_removes_leaked_temp_files_and_folders(tmp_path):
    root = tmp_path / "ws"
    init_workspace(root)
    cache = root / "cache"
    old = [
        _aged(cache / "models" / "single-file" / ".0123456789abcdef.tmp-999-1a2b3c4d", 30, 1 << 20, folder=True),
        _aged(cache / "models" / ".tiny-sd1.old-5e6f7a8b", 2, 10, folder=True),
        _aged(cache / "objects" / "train" / "ab" / ".cdef0123.tmp-999-1a2b3c4d.safetensors", 2, 1000),
        _aged(cache / "jobs" / "0123456789ab" / "payload.json", 3).parent,
    ]
    t = time.time() - 3 * 3600
    os.utime(old[-1], (t, t))
    fresh = _aged(cache / "objects" / "latents" / "cd" / ".ef012345.tmp-999-5e6f7a8b.safetensors", 0.1, 10)
    dry = _gc(root, "--dry-run")
    assert dry.returncode == 0 and "would remove 4 leftover temp files and folders (1.0 MiB)" in dry.stdout, dry.stdout
    assert all(p.exists() for p in old)

    # a build is running (it holds its project's lock): only what is older than a day goes, no job folder
    lock = FileLock(str(cache / "locks" / "demo.lock"))
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    with lock:
        busy = _gc(root)
    assert busy.returncode == 0, busy.stderr
    assert "removed 1 leftover" in busy.stdout and "kept 4 (a build is running" in busy.stdout, busy.stdout
    assert not old[0].exists() and all(p.exists() for p in old[1:])

    idle = _gc(root)
    assert "removed 3 leftover" in idle.stdout and "kept 1 (less than an hour old" in idle.stdout, idle.stdout
    assert not any(p.exists() for p in old[1:3]) and not (cache / "jobs" / "0123456789ab").exists()
    assert fresh.exists()
