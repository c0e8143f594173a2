"""doit glue: one task per (stage, project), each depending on exactly what its stage reads.

Loading this module and building the graph imports no torch: task creators only list
files and parameters (doit's docs: creators "should be used to create task metadata
only"); each stage's heavy work happens inside its action. Stages hand data on through
manifest files (file_dep/targets), never through doit's database, which a killed run
does not save.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from doit.tools import config_changed

from . import faults
from .config import Project, ProjectError, load_project
from .dataset import Dataset, DatasetError, from_project
from .limits import shared_outputs
from .stages.registry import BY_NAME, STAGES, inputs
from .winenv import output_clashes
from .workspace import Workspace, build_id

# Bumped when a stage's task wiring or output format changes, so doit re-runs it.
TASK_VERSION = 2


def run_stage(stage: str, root: str, project_file: str, config: dict | None = None):
    """The action of every task: run one stage of one project; a clear message on failure."""
    from doit.exceptions import TaskFailed

    from .cache import CorruptEntry
    from .captions import CaptionError
    from .stages.base import StageError, load_context

    ctx = None
    try:
        ctx = load_context(root, project_file)
        ctx.config = config or {}  # recorded in the stage's report, so `lorabuild status` can diff it
        with _project_lock(ctx.ws, ctx.project.name):
            _run(stage, ctx)
        return None
    except (ProjectError, DatasetError, StageError, CaptionError) as exc:
        return TaskFailed(str(exc))
    except CorruptEntry as exc:
        return TaskFailed(_forget_corrupt(Workspace(Path(root)), Path(project_file).stem, exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        return TaskFailed(faults.os_error(f"{stage}:{Path(project_file).stem}", Workspace(Path(root)), exc))
    except KeyboardInterrupt:
        faults.stopped(f"{stage}:{Path(project_file).stem}", ctx.memo.get("state_epoch") if ctx and stage == "train" else None)


def _forget_corrupt(ws: Workspace, project: str, exc) -> str:
    """Delete an unreadable entry and the manifest of the stage that made it, so the next
    build re-runs that stage, which recomputes exactly the missing entry."""
    for p in (exc.path, exc.path.with_name(exc.path.name.split(".", 1)[0] + ".json")):
        with contextlib.suppress(OSError):
            p.unlink()
    with contextlib.suppress(OSError):
        ws.manifest(project, exc.stage).unlink()
    return f"{exc}; it was removed: run the build again and only that entry is recomputed"


@contextlib.contextmanager
def _project_lock(ws: Workspace, name: str):
    """One stage of a project at a time across processes; a second build waits, saying so.

    Entries are content-addressed and written atomically, so builds of *different*
    projects that share images need no lock: they write identical bytes.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(ws.cache / "locks" / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"lorabuild: another build of '{name}' is running; waiting for it ({lock.lock_file})", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _run(stage: str, ctx) -> None:
    from .extras import missing
    from .stages.base import StageError
    from .stages.registry import BY_NAME

    p = ctx.project
    lacking = missing(p.cfg, stage)
    if lacking:  # before any work of this stage, and without a traceback
        raise StageError(f"{stage}:{p.name}: " + "; ".join(lacking))
    BY_NAME[stage].run(ctx, from_project(p))


def manifest_readable(path: str) -> bool:
    """doit ``uptodate``: a stage whose manifest is missing or unreadable (damaged, cut short) is
    out of date, so the next build re-runs it instead of every later stage failing on it while
    doit calls this one done. The stage then finds its entries in the cache."""
    from .cache import read_json

    return isinstance(read_json(path), dict)


def _failing(stage: str, name: str, message: str) -> dict:
    from doit.exceptions import TaskFailed

    def fail():
        return TaskFailed(message)

    return {"basename": stage, "name": name, "actions": [fail], "verbosity": 2, "uptodate": [False]}


def _warn_missing_packages(p: Project) -> None:
    """Before any stage runs (when doit loads the graph), not after every cache is built."""
    from .extras import installed, message, needs

    for n in needs(p.cfg):
        if not installed(n.module):
            print(f"warning: {p.name}: {message(n)} (the {n.stage} stage will stop at its start)", file=sys.stderr)


def _unresolvable(exc: Exception) -> Exception:
    """``exc`` when it says a path cannot be read or resolved (Python < 3.13's Path.resolve
    raises RuntimeError on a symlink loop); any other RuntimeError is a bug, raised again."""
    if isinstance(exc, RuntimeError) and "Symlink loop" not in str(exc):
        raise exc
    return exc


class Graph:
    """Every project of a workspace, loaded once per doit invocation."""

    def __init__(self, root: Path):
        self.ws = Workspace(root)
        self.ws.cache.mkdir(parents=True, exist_ok=True)
        self._loaded: list[tuple[Path, Project | None, Dataset | None, str]] | None = None

    def projects(self):
        """(file, project, dataset, error) for each project; a project that cannot be loaded
        has only its error, which fails its own tasks and leaves the others buildable."""
        if self._loaded is None:
            loaded = [self._load(f) for f in self.ws.project_files()]
            shared = shared_outputs([(str(f), p.name, p.output_name) for f, p, _, _ in loaded if p is not None])
            clashes = output_clashes([(str(f), p.output_name) for f, p, _, _ in loaded if p is not None])
            self._loaded = [(e[0], None, None, f"{e[0]}: output.name {shared[str(e[0])]}") if str(e[0]) in shared
                            else (e[0], None, None, f"{e[0].stem}: {clashes[str(e[0])]}") if str(e[0]) in clashes
                            else e for e in loaded]
        return self._loaded

    def _load(self, f: Path):
        try:
            p = load_project(f, memo_dir=self.ws.cache / "validated")
            ds = from_project(p)
            _warn_missing_packages(p)
            return (f, p, ds, "")
        except ProjectError as exc:
            return (f, None, None, f"{f.stem}: invalid project, nothing built:\n{exc}")
        except DatasetError as exc:
            return (f, None, None, f"{f}: dataset: {exc}")
        except (OSError, RuntimeError) as exc:  # a path that cannot be resolved (a symlink loop)
            return (f, None, None, f"{f}: {_unresolvable(exc)}")

    def tasks(self, stage: str):
        for f, p, ds, error in self.projects():
            if p is None:
                yield _failing(stage, f.stem, error)
            elif BY_NAME[stage].enabled(p):
                try:
                    yield self.task(stage, f, p, ds)
                except (OSError, RuntimeError) as exc:  # a model or weights path that cannot be resolved
                    yield _failing(stage, f.stem, f"{f}: {_unresolvable(exc)}")

    def task(self, stage: str, f: Path, p: Project, ds: Dataset) -> dict:
        """doit's task dict for one stage of one project, from the stage's declaration."""
        decl = BY_NAME[stage]
        t = inputs(self.ws, p, ds)
        config = {**decl.config(p), "task_version": TASK_VERSION}
        rel = self.ws.relative
        return {
            "basename": stage,
            "name": p.name,
            "doc": f"{decl.doc} [{f.name}]",
            "actions": [(run_stage, [stage, str(self.ws.root), str(f), config])],
            "file_dep": [rel(d) for d in decl.deps(t)],
            "targets": [rel(x) for x in [t.manifest(stage)] + decl.outputs(t)],
            "uptodate": [config_changed(config), (manifest_readable, [t.manifest(stage)])] + decl.waits(t),
            "verbosity": 2,
        }


def doit_config(root: Path) -> dict:
    from .winenv import long_root_warning, safe_console

    safe_console()  # task docs and messages hold "→" and "≤", which cp1252 cannot print
    warning = long_root_warning(root)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    from doit.exceptions import InvalidDodoFile

    try:  # cache/ a file, a damaged doit database: one line, not doit's traceback
        faults.check_workspace(Workspace(root))
    except faults.WorkspaceError as exc:
        raise InvalidDodoFile(str(exc)) from None
    faults.guard_doit_database()
    faults.quiet_interrupts()
    return {
        # sqlite3: the default dbm backend cannot be opened by two doit processes at once.
        "backend": "sqlite3",
        # Relative to the workspace (doit runs in dodo.py's folder), like every file_dep
        # and target, so a moved or copied workspace stays up to date.
        "dep_file": "cache/doit.sqlite3",
        "verbosity": 2,
        "default_tasks": ["train"],
    }


def make_task_creators(root: Path) -> dict:
    """``task_<stage>`` functions for a dodo module's globals."""
    build_id()
    graph = Graph(Path(root).resolve())
    creators = {}
    for decl in STAGES:
        def creator(stage=decl.name, doc=decl.doc):
            yield {"basename": stage, "name": None, "doc": doc}
            yield from graph.tasks(stage)

        creator.__doc__ = decl.doc
        creators[f"task_{decl.name}"] = creator
    return creators
