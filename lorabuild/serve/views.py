"""What the dashboard shows, as plain data, from the functions the CLI uses: ``status``
(:mod:`lorabuild.commands.status`), ``plan`` (:mod:`lorabuild.stages.preview`), ``validate``
(:mod:`lorabuild.config`), the dataset scan, the caption rules and the files the stages write."""
from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from ..cache import atomic_write, read_json
from ..captions import split_tags
from ..progress import read_live
from ..workspace import Workspace

LOCK_WAIT = 3.0  # seconds a write waits for a running stage of the project before it is refused
SAMPLE_NAME = re.compile(r"^(base|[es]\d{6})-(\d{2})-.*\.png$")


class ViewError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def project_names(root: Path) -> list[str]:
    return [f.stem for f in Workspace(root).project_files()]


def load(root: Path, name: str):
    """The project, or ViewError naming what is wrong (the errors `lorabuild validate` prints)."""
    from ..config import ProjectError, load_project

    path = Workspace(root).projects / f"{name}.yaml"
    if name not in project_names(root):
        raise ViewError(404, f"no project projects/{name}.yaml")
    try:
        return load_project(path, display=f"projects/{name}.yaml")
    except ProjectError as exc:
        raise ViewError(422, str(exc)) from None


def _tagged(root: Path, project) -> dict[str, str] | None:
    from ..stages.tag import captions_of, enabled

    if not enabled(project):
        return None
    manifest = read_json(Workspace(root).manifest(project.name, "tag"))
    return captions_of(manifest) if isinstance(manifest, dict) else None


def overview(root: Path, name: str) -> dict:
    """`lorabuild status` and `lorabuild plan` of one project, as their --json prints them."""
    from ..cache import FileHashes
    from ..dataset import DatasetError
    from ..stages.preview import build_plan
    from ..commands.status import project_status

    out = {"project": name, "status": project_status(root, name), "plan": None, "error": None}
    try:
        project = load(root, name)
        hashes = FileHashes(Workspace(root).cache / "hashes.json")
        out["plan"] = build_plan(project, hashes, _tagged(root, project))
        if Workspace(root).cache.is_dir():
            hashes.save()
    except ViewError as exc:
        out["error"] = str(exc)
    except DatasetError as exc:
        out["error"] = f"projects/{name}.yaml: dataset: {exc}"
    return out


def live(root: Path, name: str) -> dict | None:
    return read_live(Workspace(root).cache, name)


# --- samples ---------------------------------------------------------------------------

def samples(root: Path, name: str) -> dict:
    """The epoch × prompt grid of ``output/<name>/samples/``: rows in the sample stage's order
    (base, then by step), each cell with its A1111 settings text from the PNG itself."""
    from PIL import Image

    project = load(root, name)
    folder = Workspace(root).output_dir(project.output_name) / "samples"
    manifest = read_json(Workspace(root).manifest(name, "sample"), {}) or {}
    order = [i["id"] for i in manifest.get("items", [])]
    files = {p.stem: p for p in folder.glob("*.png") if SAMPLE_NAME.match(p.name)} if folder.is_dir() else {}
    rank = {i: n for n, i in enumerate(order)}
    lv = read_live(Workspace(root).cache, name) or {}
    # images the sample stage has not listed yet (rendered while training) go by their step
    spe = lv.get("steps_per_epoch")
    rows: dict[str, dict] = {}
    for stem in sorted(files, key=lambda s: (rank.get(s, len(rank)), _row_step(s.split("-")[0], spe), s)):
        row_id, col = stem.split("-")[0], int(stem.split("-")[1])
        try:
            with Image.open(files[stem]) as im:
                text = im.text.get("parameters", "")
        except OSError:
            continue  # being replaced right now: the next refresh shows it
        row = rows.setdefault(row_id, {"id": row_id, "label": _row_label(row_id), "cells": {}})
        row["cells"][col] = {"url": f"/files/{quote(Workspace(root).relative(files[stem]))}", "parameters": text,
                             "prompt": text.split("\n", 1)[0]}
    cols = sorted({c for r in rows.values() for c in r["cells"]})
    return {"project": name, "columns": cols, "rows": list(rows.values()),
            "grid": f"/files/{quote(Workspace(root).relative(folder / 'grid.png'))}" if (folder / "grid.png").is_file() else None,
            "stamp": max((p.stat().st_mtime for p in files.values()), default=0)}


def _row_step(row_id: str, steps_per_epoch: int | None) -> float:
    if row_id == "base":
        return -1
    n = int(row_id[1:])
    if row_id[0] == "s":
        return n
    return n * steps_per_epoch + 0.5 if steps_per_epoch else float("inf")  # an epoch's row after its last step's


def _row_label(row_id: str) -> str:
    if row_id == "base":
        return "base model"
    return f"{'epoch' if row_id[0] == 'e' else 'step'} {int(row_id[1:])}"


# --- dataset and captions ------------------------------------------------------------------

def dataset(root: Path, name: str) -> dict:
    from ..dataset import DatasetError, from_project

    project = load(root, name)
    try:
        ds = from_project(project)
    except DatasetError as exc:
        raise ViewError(422, f"projects/{name}.yaml: dataset: {exc}") from None
    facts = _caption_facts(root, project, ds.images)
    tags: Counter = Counter()
    concepts = []
    for c in ds.concepts:
        images = [_image_entry(name, im, facts) for im in ds.images if im.concept == c]
        for e in images:
            tags.update(set(split_tags(e["caption_seen"] or "")))
        concepts.append({"folder": c.folder.name, "repeats": c.repeats, "tokens": c.tokens, "validation": c.is_val,
                         "images": images})
    return {"project": name, "concepts": concepts, "tags": tags.most_common(), "problem": facts["problem"],
            "tagger": facts["tagger"]}


def _caption_facts(root: Path, project, images) -> dict:
    """What each image's entry needs beside its files: the captions the training sees, the
    bucket fits, and the tagger's last results (the same readers the build uses)."""
    from ..captions import CaptionError, dataset_captions

    tagged = _tagged(root, project) or {}
    try:
        seen, problem = dataset_captions(images, project.section("captions"), tagged), None
    except CaptionError as exc:
        seen, problem = {}, str(exc)
    fits = {e["id"]: e for e in (read_json(Workspace(root).output_dir(project.output_name) / "buckets" / "buckets.json",
                                           {}) or {}).get("images", [])}
    return {"tagged": tagged, "seen": seen, "problem": problem, "fits": fits, **_tagger_facts(root, project)}


def _tagger_facts(root: Path, project) -> dict:
    """The tag stage's suggestions per image, with the one line the page shows about them."""
    from ..stages import tag

    name, none = project.name, {"suggestions": {}, "settings": None}
    if not tag.enabled(project):
        return {**none, "tagger": {"state": "off", "line": f"projects/{name}.yaml has no tagger section: add one "
                                   "(tagger: model: FOLDER) to see a WD14 tagger's suggestions beside each caption"}}
    manifest = read_json(Workspace(root).manifest(name, "tag"))
    if not isinstance(manifest, dict):
        return {**none, "tagger": {"state": "not run", "line": f"the tagger has not run yet: build tag:{name} "
                                   f"(or lorabuild tag {name}) to see its suggestions beside each caption"}}
    settings = project.section("tagger")
    return {"suggestions": tag.suggestions(Workspace(root).cache, manifest), "settings": settings,
            "tagger": {"state": "ran", "mode": settings["mode"],
                       "line": f"tagger suggestions from the last tag:{name} run (mode {settings['mode']}); "
                               "✓ marks a tag already in the caption, a click adds one to the caption file"}}


def _image_entry(name: str, im, facts: dict) -> dict:
    from ..captions import read_caption

    raw = None
    if im.caption_path is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            raw = read_caption(im.caption_path)
    fit, seen = facts["fits"].get(im.id), facts["seen"].get(im.id)
    return {
        "id": im.id, "url": f"/dataset/{quote(name)}/{quote(im.id)}", "caption_file": raw,
        "caption_seen": seen, "default": raw is None and im.id not in facts["tagged"],
        "tagger": facts["tagged"].get(im.id), "fit": fit,
        "suggestions": _marked(facts["suggestions"].get(im.id), raw if raw is not None else seen, facts["settings"]),
        "flags": ([f"upscaled ×{fit['scale']:.2f}"] if fit and fit.get("upscaled") else [])
        + ([f"crop loses {fit['cropped_share']:.0%}"] if fit and fit.get("cropped_share", 0) > 0.1 else []),
    }


def _marked(tags: list | None, caption: str | None, settings: dict | None) -> list[dict] | None:
    """The tagger's tags for one image, each marked whether ``caption`` (the caption file, else
    what the training sees) has it already, compared as the tagger compares tags."""
    from ..wd14 import normal

    if tags is None:
        return None
    have = {normal(t, settings) for t in split_tags(caption or "")}
    return [{"tag": t, "score": c, "in_caption": normal(t, settings) in have} for t, c in tags]


def dataset_roots(root: Path, name: str) -> tuple[Path, list[Path]]:
    """(project folder, its dataset folders): what ``/dataset/<name>/`` may serve."""
    from ..dataset import DatasetError, from_project

    project = load(root, name)
    try:
        return project.root, [c.folder for c in from_project(project).concepts]
    except DatasetError as exc:
        raise ViewError(422, str(exc)) from None


@contextlib.contextmanager
def project_lock(root: Path, name: str):
    """The lock a build holds on each stage of the project (lorabuild/tasks.py): a write waits
    briefly for it, then is refused rather than change a file a running stage reads."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(Workspace(root).cache / "locks" / f"{name}.lock"))
    try:
        lock.acquire(timeout=LOCK_WAIT)
    except Timeout:
        raise ViewError(409, f"a build of {name} is running a stage right now; try again when it has finished") from None
    try:
        yield
    finally:
        lock.release()


def write_caption(root: Path, name: str, image_id: str, text: str, expected: str | None) -> dict:
    """Write one image's caption file atomically, if nobody changed it since ``expected`` was read."""
    from ..captions import read_caption
    from ..dataset import from_project

    project = load(root, name)
    im = next((i for i in from_project(project).images if i.id == image_id), None)
    if im is None:
        raise ViewError(404, f"no image {image_id} in {name}'s dataset")
    path = im.caption_path or im.path.with_suffix(im.concept.caption_extension)
    folder = im.concept.folder.resolve()
    if path.exists() and not path.resolve().is_relative_to(folder):  # a symlinked caption pointing out
        raise ViewError(403, f"{path.name} points outside {im.concept.folder.name}/: not written")
    if not isinstance(text, str) or len(text) > 100_000 or "\0" in text:
        raise ViewError(400, "a caption is text (no NUL), at most 100,000 characters")
    with project_lock(root, name):
        current = read_caption(path) if path.is_file() else None
        if current != expected:
            raise ViewError(409, f"{image_id}'s caption changed since the page read it (now {current!r}): reload")
        with atomic_write(path, "w") as fh:
            fh.write(text.strip() + "\n")
    im = next(i for i in from_project(project).images if i.id == image_id)  # now with its caption file
    return {"id": image_id, "caption_file": text.strip(),
            "image": _image_entry(name, im, _caption_facts(root, project, [im]))}


# --- the project editor ---------------------------------------------------------------------

def yaml_text(root: Path, name: str) -> dict:
    if name not in project_names(root):
        raise ViewError(404, f"no project projects/{name}.yaml")
    raw = (Workspace(root).projects / f"{name}.yaml").read_bytes()
    return {"text": raw.decode("utf-8-sig", "replace"), "sha": hashlib.sha256(raw).hexdigest()}


def validate_text(root: Path, name: str, text: str) -> list[dict]:
    """`lorabuild validate` of unsaved text: it is checked as a file beside the project (relative
    dataset paths resolve the same), a hidden temp file whose name doit's glob skips."""
    from ..config import check

    projects = Workspace(root).projects
    tmp = projects / f".{name}.{uuid.uuid4().hex[:8]}.check"
    try:
        tmp.write_bytes(text.encode("utf-8"))
        _, problems = check(tmp, f"projects/{name}.yaml")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return [p._asdict() for p in problems]


def save_yaml(root: Path, name: str, text: str, sha: str) -> dict:
    """Save the text exactly as typed (comments and all) once it validates."""
    problems = validate_text(root, name, text)
    if problems:
        raise ViewError(422, "not saved: " + "; ".join(f"line {p['line']}:{p['col']}: {p['message']}" for p in problems))
    path = Workspace(root).projects / f"{name}.yaml"
    with project_lock(root, name):
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            raise ViewError(409, f"projects/{name}.yaml changed on disk since the editor loaded it: reload it first")
        with atomic_write(path, "wb") as fh:
            fh.write(text.encode("utf-8"))
    return yaml_text(root, name)
