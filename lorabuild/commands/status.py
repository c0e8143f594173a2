"""``lorabuild status NAME``: each stage up to date or stale, and why — without loading a model.

*Whether* a stage is stale is asked of doit itself (its dependency database and file
checker, the same call ``doit info`` makes), so status agrees with what ``doit`` then
does. *Why* comes from lorabuild's own records: each stage's last report keeps the
parameters it ran with, so a change reads ``train.learning_rate: 0.0001 → 0.0002``; file
reasons are summarised as images or captions added, changed or removed.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from ..train import publish
from ..cache import read_json
from ..stages.registry import inputs, stages_of, upstream
from ..stages.spec import weight_files
from ..tasks import Graph, manifest_readable


def _diff(old, new, prefix: str = "") -> list[str]:
    """Dotted-key differences between two parameter dicts, as ``key: old → new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "(unset)"), new.get(k, "(unset)"), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


def _named(decl, config: dict) -> dict:
    """A task record with its keys as the project names them (``bucket.resolution``, not ``resolution``)."""
    return {decl.full_name(k): v for k, v in config.items()}


def _describe(paths: list[str], verb: str) -> list[str]:
    """``["2 images added", "the LoRA changed"]`` from doit's file reasons."""
    from ..dataset import IMAGE_EXTENSIONS

    kinds: dict[str, int] = {}
    for path in paths:
        suffix = Path(path).suffix.lower()
        if path.startswith("cache/manifests/"):
            kind = f"{Path(path).stem} manifest"
        elif path.startswith("output/"):
            kind = "trained LoRA"
        elif suffix in IMAGE_EXTENSIONS:
            kind = "images"
        elif suffix in (".safetensors", ".bin"):
            kind = "model weight files"
        elif suffix in (".onnx", ".csv"):
            kind = "tagger model files"
        else:
            kind = "caption files"
        kinds[kind] = kinds.get(kind, 0) + 1
    counted = ("images", "caption files", "model weight files", "tagger model files")
    return [f"{n} {k} {verb}" if k in counted else f"{k} {verb}"
            for k, n in sorted(kinds.items())]


def _project(root: Path, name: str):
    """(graph, its entry for project ``name``: file, project, dataset, error)."""
    graph = Graph(root)
    entry = next((e for e in graph.projects() if e[0].stem == name), None)
    if entry is None:
        raise KeyError(f"no project projects/{name}.yaml")
    return graph, entry


_CWD = threading.Lock()


def project_status(root: Path, name: str) -> dict:
    """Each stage's state and reasons. doit checks file_dep and targets as paths relative to the
    current folder, which is the workspace when doit runs but not always when this is asked
    (``lorabuild status`` from a subfolder, the dashboard): so it is asked from the workspace."""
    with _CWD:
        old = os.getcwd()
        os.chdir(root)
        try:
            return _project_status(Path(root), name)
        finally:
            os.chdir(old)


def _project_status(root: Path, name: str) -> dict:
    from doit.dependency import Dependency, MD5Checker, SqliteDB
    from doit.task import dict_to_task

    graph, (f, p, ds, error) = _project(root, name)
    if p is None:
        return {"project": name, "error": error, "stages": {}}
    tasks = {}
    stages_here = stages_of(p)
    t = inputs(graph.ws, p, ds)
    for decl in stages_here:
        d = graph.task(decl.name, f, p, ds)
        d = {k: v for k, v in d.items() if k != "basename"} | {"name": f"{decl.name}:{name}"}
        tasks[d["name"]] = dict_to_task(d)
    db = graph.ws.cache / "doit.sqlite3"
    dep = Dependency(SqliteDB, str(db), checker_cls=MD5Checker) if db.is_file() else None
    stages: dict[str, dict] = {}
    for decl in stages_here:
        stage = decl.name
        task = tasks[f"{stage}:{name}"]
        report = read_json(graph.ws.report(name, stage), {}) or {}
        why: list[str] = []
        if dep is None:
            state, why = "stale", ["never built here (no doit database)"]
        else:
            st = dep.get_status(task, tasks, get_log=True)
            state = {"up-to-date": "up to date", "run": "stale", "error": "error"}[st.status]
            r = st.reasons
            if r.get("uptodate_false"):
                old = report.get("config")
                locked = [f"{graph.ws.relative(f)} waits to replace a file that was open in another program"
                          for u, args, _ in task.uptodate[1:] if u is publish.up_to_date for f in publish.pending(*args)]
                own = graph.ws.manifest(name, stage)
                broken = [] if manifest_readable(str(own)) else [f"its manifest {graph.ws.relative(own)} is missing or unreadable"]
                why += broken + ((old and _diff(*(_named(decl, c) for c in (old, task.uptodate[0][0].config))))
                                 or locked or ([] if broken else ["parameters changed since the last build"]))
            added, removed = r.get("added_file_dep", []), r.get("removed_file_dep", [])
            changed = [x for x in r.get("changed_file_dep", []) if x not in added]
            why += _describe(added, "added") + _describe(removed, "removed") + _describe(changed, "changed")
            why += [f"output {target} is missing" for target in r.get("missing_target", [])]
            if st.status == "error":
                why.append(st.error_reason or "a dependency is missing")
        stale_up = [u for u in upstream(decl, t) if u in stages and stages[u]["state"] != "up to date"]
        if state == "up to date" and stale_up:
            state, why = "waits on upstream", [f"upstream {', '.join(stale_up)} stale: may re-run after it"]
        stages[stage] = {"state": state, "why": why, "last": {k: report.get(k) for k in ("build", "computed", "reused", "removed")}}
    return {"project": name, "stages": stages}


def rehash(root: Path, name: str) -> str:
    """``lorabuild status NAME --rehash``: forget what lorabuild and doit remember of NAME's input
    files, so the next build reads every image, caption and weight file again.

    Both decide "unchanged" from a file's size and mtime without reading it (lorabuild's sha256
    memo, doit's file checker), as make and rsync do: a file rewritten with the same size and
    mtime (a tool that restores mtimes, a coarse-clock filesystem) goes unnoticed until then.
    """
    from types import SimpleNamespace

    from doit.dependency import Dependency, MD5Checker, SqliteDB

    from ..cache import FileHashes
    from ..stages import tag

    graph, (f, p, ds, error) = _project(root, name)
    if p is None:
        return error
    files = [im.path for im in ds.images] + ds.caption_files()
    files += [Path(w) for w in weight_files(p, "unet", "vae", "text_encoder")]
    if tag.enabled(p):
        files += tag.model_files(p)
    if p.get("network.weights"):
        files.append(p.resolve(p.get("network.weights")))
    dropped = FileHashes(graph.ws.cache / "hashes.json").forget(files)
    db = graph.ws.cache / "doit.sqlite3"
    if db.is_file():  # doit's own record: its next run checks each stage's files by content
        dep = Dependency(SqliteDB, str(db), checker_cls=MD5Checker)
        for decl in stages_of(p):
            dep.remove_success(SimpleNamespace(name=f"{decl.name}:{name}"))
        dep.close()
    return (f"forgot the remembered hashes of {name}'s {len(files)} input files ({dropped} memo entries) and doit's "
            f"record of its stages: the next build re-reads them, and recomputes only what changed")


def render(status: dict) -> str:
    if status.get("error"):
        return status["error"]
    lines = [f"status of {status['project']}:"]
    for stage, s in status["stages"].items():
        lines.append(f"  {stage:8} {s['state']}" + (f": {'; '.join(s['why'])}" if s["why"] else ""))
    return "\n".join(lines)
