"""What differs on Windows and is checked once per command: the console's encoding, the
260-character path limit, symlink privilege. No torch here (imported when doit loads the graph).
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

# The longest path lorabuild makes below the workspace root, a temp name included: a model
# install's temp folder, cache/models/single-file/.<16>.tmp-<pid>-<8>/text_encoder_2/model.safetensors
# (about 100), or a sample under output/<name>/samples/ (name up to 64, image id up to 60).
LONGEST_BELOW_ROOT = 140
MAX_PATH = 260


def safe_console() -> None:
    """Never fail on printing: a redirected or piped stdout on Windows uses the ANSI code page
    (cp1252), which has no ``→`` or ``≤``; unencodable characters become ``?`` instead."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):  # a stream already in use in a way that forbids it
                pass


def long_paths_enabled() -> bool | None:
    """Windows' LongPathsEnabled setting (None: not Windows, or unreadable)."""
    if sys.platform != "win32":
        return None
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return bool(winreg.QueryValueEx(key, "LongPathsEnabled")[0])
    except (ImportError, OSError):
        return None


def long_root_warning(root: Path) -> str | None:
    """A warning when paths under ``root`` can cross Windows' 260 characters (and long paths are off)."""
    if sys.platform != "win32" or long_paths_enabled():
        return None
    n = len(str(Path(root).resolve()))
    if n + 1 + LONGEST_BELOW_ROOT < MAX_PATH:
        return None
    return (f"the workspace path {root} is {n} characters long: files lorabuild writes under it can pass Windows' "
            f"{MAX_PATH}-character limit; move it to a shorter path (e.g. C:\\loras) or enable long paths "
            "(LongPathsEnabled=1 under HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem)")


def symlinks_allowed(folder: Path) -> bool:
    """Whether this process may make symlinks in ``folder`` (Windows: Developer Mode or admin)."""
    probe = Path(folder) / f".symlink-probe-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(Path(folder), probe, target_is_directory=True)
    except (OSError, NotImplementedError):
        return False
    try:
        os.unlink(probe)
    except OSError:
        pass
    return True


def output_clashes(names: list[tuple[str, str]]) -> dict[str, str]:
    """{project file: message} for projects whose output names are equal ignoring case
    (``names``: (project file, output name)): Windows and macOS file systems fold case, so
    ``Demo`` and ``demo`` would write one ``output/demo/`` folder."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for f, name in names:
        groups.setdefault(name.casefold(), []).append((f, name))
    out = {}
    for group in groups.values():
        if len({n for _, n in group}) > 1:  # the same spelling twice: validate.workspace_problems says so
            listed = ", ".join(f"{f} (output {n})" for f, n in group)
            for f, _ in group:
                out[f] = (f"{listed} write the same output folder on Windows and macOS, which ignore case; "
                          "give each project its own output.name")
    return out
