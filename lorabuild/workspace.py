"""A workspace: the folder holding ``dodo.py``, ``projects/``, ``cache/`` and ``output/``."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def projects(self) -> Path:
        return self.root / "projects"

    def manifest(self, project: str, stage: str) -> Path:
        return self.cache / "manifests" / project / f"{stage}.json"

    def report(self, project: str, stage: str) -> Path:
        return self.cache / "reports" / project / f"{stage}.json"

    def output_dir(self, output_name: str) -> Path:
        return self.output / output_name

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` relative to the workspace, POSIX style (doit compares paths as strings).

        A plain path under the root is cut by string: the task graph asks this for every
        image and caption on each ``doit`` run, and ``os.path.relpath`` (absolutising and
        splitting both paths) cost ~0.1 s per 15,000 paths. Anything else (``..``, ``.``,
        doubled separators, another root) takes the general way.
        """
        s = os.fspath(path)
        prefix = self._prefix
        if prefix and s.startswith(prefix):
            rest = s[len(prefix):]
            if rest and f"{os.sep}." not in os.sep + rest and os.sep * 2 not in rest:
                return rest.replace(os.sep, "/")
        try:
            return Path(os.path.relpath(path, self.root)).as_posix()
        except ValueError:  # another drive on Windows
            return Path(path).as_posix()

    @cached_property
    def _prefix(self) -> str | None:
        """The root with a trailing separator, when it is absolute (the fast path's test)."""
        root = os.fspath(self.root)
        return os.path.join(root, "") if os.path.isabs(root) else None

    def project_files(self) -> list[Path]:
        return sorted(self.projects.glob("*.yaml"))


def build_id() -> str:
    """Identifies one doit invocation; set once per process tree so every stage shares it."""
    bid = os.environ.get("LORABUILD_BUILD")
    if not bid:
        bid = uuid.uuid4().hex[:12]
        os.environ["LORABUILD_BUILD"] = bid
    return bid


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` that has a ``dodo.py`` or a ``projects/``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dodo.py").is_file() or (folder / "projects").is_dir():
            return folder
    return here
