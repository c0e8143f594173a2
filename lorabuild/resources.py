"""Where the files that ship with lorabuild live: the schema, the demo project, model configs.

In a source checkout they are the top-level ``schemas/`` and ``projects/`` folders; an
installed wheel carries copies under ``lorabuild/_bundled/`` (see ``setup.py``).
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"


def _top_level(name: str) -> Path:
    for candidate in (PACKAGE_DIR.parent / name, PACKAGE_DIR / "_bundled" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lorabuild installation is missing its '{name}' folder")


def schema_path() -> Path:
    return _top_level("schemas") / "project.schema.json"


def projects_dir() -> Path:
    """The shipped ``projects/`` folder (demo.yaml and its images)."""
    return _top_level("projects")


def constraints_file() -> Path | None:
    """``constraints/ci.txt``, the library versions CI passed with (a wheel carries a copy); None if absent."""
    for candidate in (PACKAGE_DIR.parent / "constraints" / "ci.txt", PACKAGE_DIR / "_bundled" / "constraints" / "ci.txt"):
        if candidate.is_file():
            return candidate
    return None
