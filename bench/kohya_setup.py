"""Install kohya-ss/sd-scripts at a pinned commit in its own virtual environment, outside the
repository, for bench/kohya_side.py (issue 26). Run once; later runs find it ready.

    python bench/kohya_setup.py --src PATH-OR-GIT-URL [--home DIR] [--commit SHA] [--torch SPEC ...]

``--src`` is a clone of kohya-ss/sd-scripts (a bare git directory or a work tree) or a git URL
(cloned bare into HOME); the tree at ``--commit`` is exported with ``git archive``, so a local
change in a work tree never leaks into the measurement. Its requirements.txt pins come from the
package index; torch and torchvision (``--torch``, default below: kohya imports torchvision)
from wherever pip is configured to look (PIP_FIND_LINKS, an extra index of local wheels).
Everything goes under HOME (default ~/.cache/lorabuild-bench/kohya, or LORABUILD_KOHYA_HOME).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"  # sd-scripts main, 2026-02-16
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
HOME = Path(os.environ.get("LORABUILD_KOHYA_HOME", Path.home() / ".cache" / "lorabuild-bench" / "kohya"))


class SetupError(Exception):
    """kohya could not be installed: the message says which step and why."""


def venv_python(home: Path) -> Path:
    scripts = "Scripts" if os.name == "nt" else "bin"
    return home / "venv" / scripts / ("python.exe" if os.name == "nt" else "python")


def _git(args: list[str], what: str) -> bytes:
    try:
        proc = subprocess.run(["git", *args], capture_output=True)
    except FileNotFoundError:
        raise SetupError(f"{what}: git is not installed") from None
    if proc.returncode != 0:
        raise SetupError(f"{what}: git {' '.join(args)} failed:\n{proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout


def _git_dir(src: str, home: Path) -> str:
    """The git directory to export from: ``src`` itself, its .git, or a bare clone of a URL."""
    p = Path(src).expanduser()
    if p.is_dir():
        return str(p / ".git") if (p / ".git").exists() else str(p)
    if "://" not in src and not src.startswith("git@"):
        raise SetupError(f"--src {src}: neither a folder nor a git URL")
    bare = home / "sd-scripts.git"
    if not bare.is_dir():
        _git(["clone", "--bare", "--quiet", src, str(bare)], f"cloning {src}")
    return str(bare)


def _missing(gd: str, commit: str, what: str) -> list[str]:
    """Files of ``commit`` whose contents this clone lacks (a partial mirror leaves out its largest
    binaries, e.g. Windows DLLs): left out of the export, unless the harness needs them."""
    listing = _git(["--git-dir", gd, "ls-tree", "-r", commit], what).decode()
    blobs = dict(line.split(" ", 2)[2].split("\t", 1) for line in listing.splitlines() if " blob " in line)
    check = subprocess.run(["git", "--git-dir", gd, "cat-file", "--batch-check"], input="\n".join(blobs) + "\n",
                           capture_output=True, text=True).stdout.splitlines()
    gone = {ln.split()[0] for ln in check if ln.endswith(" missing")}
    skip = [path for sha, path in blobs.items() if sha in gone]
    needed = [p for p in skip if p.endswith((".py", ".txt", ".toml", ".cfg"))]
    if needed:
        raise SetupError(f"{what}: this clone lacks files the install needs: {', '.join(needed[:10])}")
    if skip:
        print(f"kohya setup: this clone lacks {len(skip)} binary files, left out: {', '.join(skip[:5])}", flush=True)
    return skip


def export(src: str, commit: str, home: Path) -> Path:
    """kohya's tree at ``commit`` in HOME/src-<commit>, fresh from ``git archive``."""
    dest = home / f"src-{commit[:12]}"
    if (dest / "train_network.py").is_file():
        return dest
    gd = _git_dir(src, home)
    what = f"exporting {commit} from {src}"
    skip = _missing(gd, commit, what)
    data = _git(["--git-dir", gd, "archive", "--format=tar", commit, "--", ".", *(f":(exclude){p}" for p in skip)], what)
    tmp = home / f"src.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _pip(py: Path, args: list[str], cwd: Path, log: Path, what: str) -> None:
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ pip {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run([str(py), "-m", "pip", *args], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        errors = [ln for ln in tail if "ERROR" in ln or "error:" in ln] or tail[-8:]
        raise SetupError(f"{what} failed (pip exit {proc.returncode}; full log {log}):\n" + "\n".join(errors))


def ensure(src: str | None, home: Path = HOME, commit: str = COMMIT, torch: list[str] = TORCH) -> tuple[Path, Path]:
    """(kohya's python, kohya's source folder), installing them first if needed."""
    home.mkdir(parents=True, exist_ok=True)
    want = {"commit": commit, "torch": torch}
    ready = home / "ready.json"
    py, tree = venv_python(home), home / f"src-{commit[:12]}"
    if ready.is_file() and json.loads(ready.read_text()) == want and py.is_file() and tree.is_dir():
        return py, tree
    if not src:
        raise SetupError("kohya is not installed yet: pass --kohya-src (a clone of kohya-ss/sd-scripts: "
                         "a folder or a git URL), or set LORABUILD_KOHYA_SRC")
    tree = export(src, commit, home)
    log = home / "setup.log"
    if not py.is_file():
        proc = subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SetupError(f"creating the virtual environment {home / 'venv'} failed:\n{proc.stderr[-2000:]}")
    print(f"kohya setup: installing {' '.join(torch)} and {tree / 'requirements.txt'} into {home / 'venv'} "
          f"(log {log})", flush=True)
    # one resolve, so kohya's pins cannot move torch off the version asked for
    _pip(py, ["install", *torch, "-r", "requirements.txt"], tree, log, "installing kohya's requirements")
    ready.write_text(json.dumps(want))
    return py, tree


def versions(py: Path) -> str:
    """torch / diffusers / transformers / accelerate versions inside kohya's environment."""
    code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
            "('torch', 'torchvision', 'diffusers', 'transformers', 'accelerate')))")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() or f"unknown ({proc.stderr.strip()[-200:]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.environ.get("LORABUILD_KOHYA_SRC"), help="clone (folder) or git URL")
    ap.add_argument("--home", type=Path, default=HOME)
    ap.add_argument("--commit", default=COMMIT)
    ap.add_argument("--torch", nargs="+", default=TORCH, help="torch requirements (default: %(default)s)")
    args = ap.parse_args()
    try:
        py, tree = ensure(args.src, args.home, args.commit, args.torch)
    except SetupError as e:
        sys.exit(f"kohya setup: {e}")
    print(f"kohya setup: ready: {py} ({versions(py)}), source {tree}")


if __name__ == "__main__":
    main()
