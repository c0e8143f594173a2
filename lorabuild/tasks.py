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

from . import blocks, faults, models, multires, publish
from .config import Project, ProjectError, load_project
from .dataset import Dataset, DatasetError, from_project
from .dist import launch_options
from .limits import shared_outputs
from .winenv import output_clashes
from .workspace import Workspace, build_id

STAGES = ("resize", "tag", "bucket", "latents", "textemb", "train", "sample")
DOCS = {
    "resize": "images → RGB working copies (EXIF-aware, longest side ≤ resize.max_side)",
    "tag": "images → WD14 tags from the project's tagger (only projects with a tagger section)",
    "bucket": "working copies → kohya aspect-ratio buckets, resize sizes and crops",
    "latents": "bucketed images → VAE latents (content-addressed)",
    "textemb": "distinct captions → text-encoder embeddings (when they can be cached)",
    "train": "latents + captions → the LoRA: output/<name>/<name>.safetensors",
    "sample": "the LoRA + sample.prompts → images and a grid in output/<name>/samples/",
}
# Bumped when a stage's task wiring or output format changes, so doit re-runs it.
TASK_VERSION = 2


def _params(project: Project, keys: tuple[str, ...]) -> dict:
    return {k.rsplit(".", 1)[-1]: _plain(project.get(k)) for k in keys}


def _plain(value):
    """Deep-thaw frozen config values into JSON-able lists and dicts."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    return value


# what names the base model: a change reruns the stages that load it (they reuse what its
# identity, a content hash, says is unchanged)
MODEL = ("base_model",) + models.MODEL_OPTIONS


def stages_of(project: Project) -> tuple[str, ...]:
    """The stages a project has: ``tag`` only with a ``tagger`` section."""
    from .stages import tag

    return STAGES if tag.enabled(project) else tuple(s for s in STAGES if s != "tag")


def _weights(project: Project, ws: Workspace, *components: str) -> list[str]:
    """Weight files of a real base model (and a separate VAE) as file_deps; a builtin model has
    none to watch. A single file is named as it is (converting it is the stage's work, not
    the task graph's)."""
    out = []
    spec = str(project.get("base_model"))
    vae = project.get("vae")
    if vae and "vae" in components:
        vpath = project.resolve(vae)
        out += [str(vpath)] if vpath.is_file() else [str(f) for f in models.weight_files(vpath, "")] + [
            str(f) for f in models.weight_files(vpath, "vae")]
        components = tuple(c for c in components if c != "vae")
    if spec.startswith("builtin:"):
        return out
    path = project.resolve(spec)
    if path.is_file():
        return out + [str(path)]
    if not path.is_dir():
        return out  # the stage's action reports it
    # SDXL's second text encoder is read wherever the first is (a folder without one lists nothing)
    parts = [p for c in components for p in ((c, "text_encoder_2") if c == "text_encoder" else (c,))]
    return out + [str(f) for c in parts for f in models.weight_files(path, c)]


def _context(root: str, project_file: str):
    from .stages.base import Context

    ws = Workspace(Path(root))
    project = load_project(Path(project_file), memo_dir=ws.cache / "validated")
    return Context(ws, project)


def run_stage(stage: str, root: str, project_file: str, config: dict | None = None):
    """The action of every task: run one stage of one project; a clear message on failure."""
    from doit.exceptions import TaskFailed

    from .cache import CorruptEntry
    from .captions import CaptionError
    from .stages.base import StageError

    ctx = None
    try:
        ctx = _context(root, project_file)
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
    from .stages import bucket, latents, resize, sample, tag, textemb, train

    from .extras import missing
    from .stages.base import StageError

    p = ctx.project
    lacking = missing(p.cfg, stage)
    if lacking:  # before any work of this stage, and without a traceback
        raise StageError(f"{stage}:{p.name}: " + "; ".join(lacking))
    dataset = from_project(p)
    if stage == "resize":
        for w in dataset.warnings:
            print(f"warning: {w}", file=sys.stderr)
        resize.run(ctx, dataset, _params(p, resize.PARAMS), p.get("dataset.on_bad_image"))
    elif stage == "tag":
        tag.run(ctx, dataset)
    elif stage == "bucket":
        bucket.run(ctx, _params(p, bucket.PARAMS), p.get("bucket.small_images"), p.get("dataset.on_bad_image"))
    elif stage == "latents":
        latents.run(ctx, _params(p, latents.PARAMS))
    elif stage == "textemb":
        textemb.run(ctx, dataset, _params(p, textemb.PARAMS))
    elif stage == "train":
        train.run(ctx, dataset)
    elif stage == "sample":
        sample.run(ctx)


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
            elif stage in stages_of(p):
                try:
                    yield self._task(stage, f, p, ds)
                except (OSError, RuntimeError) as exc:  # a model or weights path that cannot be resolved
                    yield _failing(stage, f.stem, f"{f}: {_unresolvable(exc)}")

    def _task(self, stage: str, f: Path, p: Project, ds: Dataset) -> dict:
        from .stages import bucket, latents, resize, sample, tag, textemb, train

        m = lambda s: str(self.ws.manifest(p.name, s))  # noqa: E731
        lora = str(self.ws.output_dir(p.output_name) / f"{p.output_name}.safetensors")
        captions = [str(c) for c in ds.caption_files()]
        v = {"task_version": TASK_VERSION}
        tagged = [m("tag")] if tag.enabled(p) else []  # the tagger's captions, when there is one
        if stage == "resize":
            keys = resize.PARAMS + ("dataset.on_bad_image",)
            deps, cfg = [str(im.path) for im in ds.images], {**_params(p, keys), "v": resize.VERSION,
                                                             "manifest": resize.MANIFEST}
        elif stage == "tag":
            deps = [str(im.path) for im in ds.images] + captions + [str(f) for f in tag.model_files(p)]
            cfg = {**_params(p, ("tagger", "dataset", "device")), "v": tag.VERSION}
        elif stage == "bucket":
            deps, cfg = [m("resize")], {**_params(p, bucket.PARAMS + bucket.FILTER_PARAMS), "v": bucket.VERSION}
            if multires.is_multi(p):  # its orig-size rules and concepts' overrides (absent: cfg as it was)
                cfg["multires"] = multires.task_config(p)
        elif stage == "latents":
            deps = [m("bucket")] + _weights(p, self.ws, "vae")
            cfg = {**_params(p, latents.PARAMS + MODEL + ("device",)), "v": latents.VERSION}
        elif stage == "textemb":
            deps = [m("resize")] + tagged + captions + _weights(p, self.ws, "text_encoder")
            keys = textemb.PARAMS + MODEL + ("captions", "network.train_text_encoder", "dataset")
            cfg = {**_params(p, keys), "v": textemb.VERSION}
        elif stage == "train":
            deps = [m("latents"), m("textemb")] + tagged + captions + _weights(p, self.ws, "unet", "text_encoder")
            if p.get("network.weights"):
                deps.append(str(p.resolve(p.get("network.weights"))))
            cfg = {**{s: _plain(p.section(s)) for s in train.SECTIONS}, **_params(p, train.EXTRA_PARAMS + MODEL + train.SAMPLE_PARAMS + ("device",)), "v": train.VERSION}
            cfg["network"] = blocks.keyed(cfg["network"])  # unset new options leave an existing build up to date
            world = launch_options(p).world
            if world > 1:  # `lorabuild train --nproc/--nnodes` changes the global batch, so the LoRA it trains
                cfg["world"] = world
        else:
            deps = [lora, m("train")] + _weights(p, self.ws, "unet", "vae", "text_encoder")
            if p.get("sample.prompt_file"):
                deps.append(str(p.resolve(p.get("sample.prompt_file"))))
            cfg = {**_params(p, ("sample", "network", "device", "textemb.clip_skip", "textemb.max_token_length") + MODEL),
                   "v": sample.VERSION}
        targets = [m(stage)]
        if stage == "train":
            targets.append(lora)
        rel = self.ws.relative
        config = {**cfg, **v}
        # a publish that found its output locked (publish.py) leaves the task out of date until redone
        out_dir = self.ws.output_dir(p.output_name)
        waiting = {"train": [(publish.up_to_date, (str(out_dir), f"{p.output_name}*"))],
                   "sample": [(publish.up_to_date, (str(out_dir / "samples"),))]}.get(stage, [])
        return {
            "basename": stage,
            "name": p.name,
            "doc": f"{DOCS[stage]} [{f.name}]",
            "actions": [(run_stage, [stage, str(self.ws.root), str(f), config])],
            "file_dep": [rel(d) for d in deps],
            "targets": [rel(t) for t in targets],
            "uptodate": [config_changed(config), (manifest_readable, [m(stage)])] + waiting,
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
    for stage in STAGES:
        def creator(stage=stage):
            yield {"basename": stage, "name": None, "doc": DOCS[stage]}
            yield from graph.tasks(stage)

        creator.__doc__ = DOCS[stage]
        creators[f"task_{stage}"] = creator
    return creators
