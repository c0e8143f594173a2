"""What every stage shares: its context, per-item bookkeeping, the manifest and the report.

A stage's ``run(ctx)`` lists its items (each with a key dict), asks the stage's
:class:`~lorabuild.cache.Store` which are present, computes the others, then calls
:meth:`StageRun.finish`, which writes the manifest (what this project uses now) and
the report (``{"build", "computed", "reused", "removed"}``) and prints one line.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache import FileHashes, Store, changed_since, key_hash, read_json, write_json, write_json_if_changed
from ..config import Project
from ..errors import StageError  # noqa: F401 - its home is errors.py; every stage imports it from here
from ..workspace import Workspace, build_id

# seconds this process has spent loading frozen models (stages/runtime.py adds to it), so a
# stage's report can tell its own work from model loading
MODEL_LOAD = {"seconds": 0.0}


@dataclass
class Item:
    id: str
    key: dict
    data: dict = field(default_factory=dict)  # stage-specific inputs and manifest fields

    @functools.cached_property
    def hash(self) -> str:  # a key is not changed once its item is made
        return key_hash(self.key)


@dataclass
class Context:
    ws: Workspace
    project: Project
    config: dict = field(default_factory=dict)  # the parameters doit keyed this run on
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # what one stage run resolves once

    @property
    def name(self) -> str:
        return self.project.name

    def manifest_path(self, stage: str) -> Path:
        return self.ws.manifest(self.name, stage)

    def read_manifest(self, stage: str) -> dict:
        data = read_json(self.manifest_path(stage))
        if not isinstance(data, dict):
            raise StageError(f"{self.manifest_path(stage)} is missing or unreadable: run the {stage} stage first")
        return data

    def hashes(self) -> FileHashes:
        return FileHashes(self.ws.cache / "hashes.json", observed=self.memo.setdefault("observed", {}))

    def check_inputs(self) -> None:
        """Stop if a file this stage hashed into its keys (model weights, a tagger, a starting LoRA)
        has changed since: what was loaded may not be what the key names, so nothing is stored."""
        changed = changed_since(self.memo.get("observed", {}))
        if changed:
            raise StageError(f"{changed} changed while the build was running: nothing more is stored under its "
                             "old identity; run the build again")

    def store(self, stage: str, ext: str) -> Store:
        return Store(self.ws.cache, stage, ext)


def load_context(root: str | Path, project_file: str | Path) -> Context:
    """The context a stage runs in: the workspace at ``root`` and its project, loaded and validated
    (a doit action, a torchrun rank and a test each start from the files alone)."""
    from ..config import load_project

    ws = Workspace(Path(root))
    return Context(ws, load_project(Path(project_file), memo_dir=ws.cache / "validated"))


class StageRun:
    """Counts one stage run and writes its manifest and report."""

    def __init__(self, ctx: Context, stage: str):
        self.ctx = ctx
        self.stage = stage
        self.computed = 0
        self.reused = 0
        self.started = time.perf_counter()
        self._load_before = MODEL_LOAD["seconds"]
        self.notes: list[str] = []
        self._previous: dict | None = None

    def _previous_doc(self) -> dict:
        if self._previous is None:
            doc = read_json(self.ctx.manifest_path(self.stage), {})
            self._previous = doc if isinstance(doc, dict) else {}
        return self._previous

    def previous(self) -> dict[str, dict]:
        """The last run's manifest entries by key hash. A reused entry's facts (sizes, a bucket
        decision) come from this one file instead of one sidecar read per entry; the store
        still decides what is present."""
        return {e["hash"]: e for e in self._previous_doc().get("items", []) if isinstance(e, dict) and "hash" in e}

    def split(self, items: list[Item], store: Store) -> list[Item]:
        """Return the items whose entry is missing, once per key; count the rest as reused.

        Items with equal keys (the same image twice) share one entry and are computed once.
        Presence only: checksums are checked where entries are read (train checks every latent
        and embedding before it trains), so adding one image reads no other entry.
        """
        missing: dict[str, Item] = {}
        for it in items:
            if it.hash in missing or store.has(it.hash):
                self.reused += 1
            else:
                missing[it.hash] = it
        return list(missing.values())

    def compute(self, missing: list[Item], store: Store, here) -> None:
        """Compute the missing entries and count them: ``here()`` in this process (it returns how
        many it computed; the rest another build computed meanwhile, so they are reused), or,
        with ``train.processes`` > 1, shared out over that many processes through torchrun
        (:mod:`lorabuild.train.worker`), each computing every n-th key: the counts are their sum."""
        from ..train.dist import LaunchError, cache_launch, run_ranks

        launch = cache_launch(self.ctx.project)
        if launch is None or len(missing) < 2:
            done = here()
        else:
            try:
                results = run_ranks(self.stage, self.ctx.ws.cache, self.ctx.ws.root, self.ctx.project.file, launch,
                                    [it.hash for it in missing])
            except LaunchError as exc:
                raise exc.for_stage(f"{self.stage}:{self.ctx.name}") from None
            absent = [it.id for it in missing if not store.has(it.hash)]
            if absent:
                raise StageError(f"{self.stage}:{self.ctx.name}: the processes finished without computing "
                                 f"{len(absent)} entries (e.g. {absent[0]})")
            shares = [r["computed"] for r in sorted(results, key=lambda r: r["rank"])]
            done = sum(shares)
            self.notes.append(f"computed by {launch.nproc} processes: {' + '.join(map(str, shares))}")
        self.computed += done
        self.reused += len(missing) - done

    def finish(self, entries: list[dict], **extra: Any) -> dict:
        """Write the manifest (``entries``: one dict per item, each with an ``id``) and the report."""
        path = self.ctx.manifest_path(self.stage)
        old_ids = {e.get("id") for e in self._previous_doc().get("items", []) if isinstance(e, dict)}
        new_ids = {e["id"] for e in entries}
        removed = len(old_ids - new_ids)
        write_json_if_changed(path, {"stage": self.stage, "project": self.ctx.name, "items": entries, **extra})
        report = {
            "build": build_id(),
            "stage": self.stage,
            "computed": self.computed,
            "reused": self.reused,
            "removed": removed,
            "items": len(entries),
            "seconds": round(time.perf_counter() - self.started, 3),
            "model_load_seconds": round(MODEL_LOAD["seconds"] - self._load_before, 3),  # included in seconds
            "notes": self.notes,
            "config": self.ctx.config,
        }
        write_json(self.ctx.ws.report(self.ctx.name, self.stage), report)
        note = f" ({'; '.join(self.notes)})" if self.notes else ""
        print(
            f"{self.stage}:{self.ctx.name}: {len(entries)} items: computed {self.computed}, "
            f"reused {self.reused}, removed {removed}{note}",
            flush=True,
        )
        return report
