"""Windows behaviours simulated on Linux, for the paths where lorabuild must not break there.

- a file "held open" by a loader (ComfyUI/A1111 memory-map a LoRA): ``os.replace``/``os.rename``
  onto it and ``os.unlink``/``os.remove`` of it raise ``PermissionError`` [WinError 5], as
  Windows does while a mapping exists (safetensors#164, #574);
- no symlink privilege (no Developer Mode, not admin): ``os.symlink`` raises ``OSError``
  [WinError 1314].

:func:`install` patches the running process; :func:`doit` runs doit in a child process with the
same patches, so the real CLI is exercised. Both are used by the normal suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = "LORABUILD_TEST_WINSIM"


def install(held=(), no_symlink: bool = False, monkeypatch=None) -> None:
    """Patch ``os`` so that the files in ``held`` behave as open on Windows, and (with
    ``no_symlink``) so that symlinks cannot be made; through pytest's ``monkeypatch`` when
    given (undone after the test), else for the rest of the process."""
    setattr_ = monkeypatch.setattr if monkeypatch is not None else setattr
    held_set = {os.path.realpath(p) for p in held}
    real_replace, real_rename, real_unlink = os.replace, os.rename, os.unlink

    def locked(path) -> bool:
        return os.path.realpath(os.fspath(path)) in held_set

    def denied(path):
        return PermissionError(13, "Access is denied", os.fspath(path))

    def replace(src, dst, *a, **kw):
        if locked(dst) or locked(src):
            raise denied(dst)
        return real_replace(src, dst, *a, **kw)

    def rename(src, dst, *a, **kw):
        if locked(dst) or locked(src):
            raise denied(dst)
        return real_rename(src, dst, *a, **kw)

    def unlink(path, *a, **kw):
        if locked(path):
            raise denied(path)
        return real_unlink(path, *a, **kw)

    if held_set:
        for name, fn in (("replace", replace), ("rename", rename), ("unlink", unlink), ("remove", unlink)):
            setattr_(os, name, fn)
    if no_symlink:
        def symlink(src, dst, *a, **kw):
            raise OSError(22, "A required privilege is not held by the client", os.fspath(dst))

        setattr_(os, "symlink", symlink)


def install_from_env() -> None:
    spec = json.loads(os.environ.get(ENV) or "{}")
    if spec:
        install(spec.get("held", ()), spec.get("no_symlink", False))


_SCRIPT = (
    "import sys\n"
    "sys.path.insert(0, {tests!r})\n"
    "import winsim\n"
    "winsim.install_from_env()\n"
    "from doit.doit_cmd import DoitMain\n"
    "from doit.cmd_base import DodoTaskLoader\n"
    "sys.exit(DoitMain(DodoTaskLoader()).run(sys.argv[1:]))\n"
)


def doit(root: Path, *args: str, build: str, held=(), no_symlink: bool = False) -> subprocess.CompletedProcess:
    """``doit ARGS`` in ``root`` under the simulated Windows behaviours (not checked: the caller asserts)."""
    env = {**os.environ, "LORABUILD_BUILD": build,
           ENV: json.dumps({"held": [str(p) for p in held], "no_symlink": no_symlink})}
    script = _SCRIPT.format(tests=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env, capture_output=True, text=True)


POSIX_ONLY_MODULES = ("resource", "fcntl", "termios", "pwd", "grp")


def pretend_windows() -> None:
    """``sys.platform`` reads "win32" and the POSIX-only modules cannot be imported, as on Windows.
    The libraries the tests import are imported first, as they are (torch checks the platform on
    import to load its DLLs)."""
    import importlib.abc

    for name in ("torch", "diffusers", "transformers", "safetensors.torch", "PIL.Image", "yaml", "hypothesis",
                 "jsonschema", "filelock", "doit", "watchdog.observers", "numpy"):
        try:
            __import__(name)
        except ImportError:
            pass

    class NoPosix(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in POSIX_ONLY_MODULES:
                raise ModuleNotFoundError(f"No module named '{name}' (simulated Windows)", name=name)
            return None

    for name in POSIX_ONLY_MODULES:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, NoPosix())
    sys.platform = "win32"


def pytest_configure(config):
    """As a pytest plugin (``-p winsim``, with tests/ on PYTHONPATH): collect and run as on Windows."""
    pretend_windows()
