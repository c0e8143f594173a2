"""tag: each image → WD14 tags from a local ONNX tagger; they become captions before textemb.

Present only when the project has a ``tagger`` section. Item = one image the mode tags
(``missing``: those without a caption file; ``merge``/``replace``: all); key = image bytes
+ the tagger's identity (sha256 of ``model.onnx`` and ``selected_tags.csv``) + the settings
that shape its tag list (thresholds, rating, exclude_tags, underscores). ``additional_tags``
and ``mode`` only combine stored tags with caption files, so editing the trigger word runs
no model. The manifest holds each tagged image's caption text: :func:`tagged_captions`
lays it over the caption files for textemb and train, and ``lorabuild tag --write`` writes
it beside the images. Nothing is written beside the images by a build. An image is decoded
from the bytes its key is hashed from (read once), as in resize.
"""
from __future__ import annotations

import json
import posixpath
from pathlib import Path

from ..captions import CaptionError, read_caption, split_tags
from ..wd14 import MODEL_FILE, TAGS_FILE, TaggerError, combine, folder_problem
from .base import Context, Item, StageError, StageRun
from .spec import Inputs, Stage

STAGE = "tag"
VERSION = 1
KEY_PARAMS = ("general_threshold", "character_threshold", "rating", "exclude_tags", "underscores_to_spaces")


def enabled(project) -> bool:
    return project.cfg.get("tagger") is not None


def model_folder(project) -> Path:
    return project.resolve(project.get("tagger.model"))


def model_files(project) -> list[Path]:
    folder = model_folder(project)
    return [folder / MODEL_FILE, folder / TAGS_FILE]


def caption_file(im) -> str:
    """Where an image's caption file is, or would be written: beside it, named like its id
    (relative to the project folder, so a moved workspace keeps valid manifests)."""
    name = im.caption_path.name if im.caption_path else im.path.stem + im.concept.caption_extension
    return posixpath.join(posixpath.dirname(im.id), name)


def existing_tags(im) -> list[str] | None:
    """The tags of an image's caption file, None when it has none."""
    if im.caption_path is None:
        return None
    try:
        return split_tags(read_caption(im.caption_path))
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionError(f"{im.caption_path}: not a UTF-8 text caption ({exc})") from None


def plan(dataset, settings: dict, model_id: dict, hashes) -> list[Item]:
    items = []
    for im in dataset.images:
        if settings["mode"] == "missing" and im.caption_path is not None:
            continue
        try:
            digest = hashes.sha256(im.path)
        except OSError as exc:
            raise StageError(f"{im.path}: cannot be read ({exc})") from None
        key = {"stage": STAGE, "v": VERSION, "src": digest, "model": model_id,
               "params": {k: settings[k] for k in KEY_PARAMS}}
        items.append(Item(im.id, key, {"image": im}))
    return items


def _stored(store, h: str) -> list | None:
    """An entry's ``[[tag, confidence], …]``; None when missing or unreadable (then it is dropped)."""
    from ..cache import read_json

    if not store.has(h):
        return None
    data = read_json(store.path(h))
    if isinstance(data, dict) and isinstance(data.get("tags"), list):
        return data["tags"]
    store.discard(h, "not a tag list")
    return None


def _tag(items: list[Item], ctx: Context, settings: dict, store, sr: StageRun, hashes) -> dict[str, Item]:
    """Run the model over ``items`` in batches and store each image's tags. Returns the items
    whose image was rewritten since the plan hashed it, by their planned hash: each is keyed
    on the bytes that were read and tagged."""
    import numpy as np

    from ..cache import FileChanged
    from ..images import ImageError, load_rgb
    from ..wd14 import Tagger, preprocess, select

    tagger = Tagger(model_folder(ctx.project), ctx.project.get("device"))
    sr.notes.append(f"onnxruntime {tagger.provider}")
    bs = tagger.fixed_batch or settings["batch_size"]
    rekeyed: dict[str, Item] = {}
    for i in range(0, len(items), bs):
        chunk, arrays = [], []
        for it in items[i:i + bs]:
            path = it.data["image"].path
            try:
                data, digest = hashes.read(path)
            except FileChanged as exc:
                raise StageError(str(exc)) from None
            except OSError as exc:
                raise StageError(f"{path}: cannot be read ({exc})") from None
            if digest != it.key["src"]:
                rekeyed[it.hash] = it = Item(it.id, {**it.key, "src": digest}, it.data)
            try:
                arrays.append(preprocess(load_rgb(path, data=data), tagger.size))
            except ImageError as exc:
                if ctx.project.get("dataset.on_bad_image") != "skip":
                    raise StageError(str(exc)) from None
                sr.notes.append(f"skipped {exc}")
                continue
            chunk.append(it)
        if not chunk:
            continue
        probs = tagger.predict(np.stack(arrays))
        ctx.check_inputs()  # the tagger model run is the one its identity names
        for it, p in zip(chunk, probs):
            tags = select(p, tagger.labels, settings)
            with store.put(it.hash, it.key, {"n": len(tags)}) as tmp:
                tmp.write_text(json.dumps({"tags": tags}, ensure_ascii=False), encoding="utf-8")
        sr.computed += len(chunk)
    return rekeyed


def run(ctx: Context, dataset) -> dict:
    settings = ctx.project.section("tagger")
    problem = folder_problem(model_folder(ctx.project))
    if problem:
        raise StageError(f"tagger.model: {problem}")
    sr = StageRun(ctx, STAGE)
    hashes = ctx.hashes()
    try:
        onnx_file, tags_file = model_files(ctx.project)
        model_id = {"onnx": hashes.sha256(onnx_file), "tags": hashes.sha256(tags_file)}
        items = plan(dataset, settings, model_id, hashes)
    finally:
        hashes.save()
    store = ctx.store(STAGE, ".tags.json")
    missing = {it.hash: it for it in sr.split(items, store)}
    for it in items:  # an unreadable entry is a miss (recounted as computed)
        if it.hash not in missing and _stored(store, it.hash) is None:
            missing[it.hash] = it
            sr.reused -= 1
    rekeyed: dict[str, Item] = {}
    if missing:
        try:
            rekeyed = _tag(list(missing.values()), ctx, settings, store, sr, hashes)
        except TaggerError as exc:
            raise StageError(f"tag:{ctx.name}: {exc}") from None
        finally:
            hashes.save()
    entries, untagged = [], 0
    for it in (rekeyed.get(it.hash, it) for it in items):
        stored = _stored(store, it.hash)
        if stored is None:
            continue  # a bad image left out (on_bad_image: skip)
        im = it.data["image"]
        tags = [t for t, _ in stored]
        caption = combine(existing_tags(im), tags, settings)
        untagged += caption is None
        entries.append({"id": it.id, "hash": it.hash, "tags": tags, "caption": None if caption is None else ", ".join(caption),
                        "caption_file": caption_file(im), "has_caption_file": im.caption_path is not None})
    if untagged:
        sr.notes.append(f"{untagged} image(s) with no tag above the thresholds keep their caption")
    return sr.finish(entries, mode=settings["mode"], model=model_id)


def captions_of(manifest: dict) -> dict[str, str]:
    """Image id → caption text from a tag manifest, for the images whose caption the tagger sets."""
    return {e["id"]: e["caption"] for e in manifest.get("items", []) if e.get("caption") is not None}


def tagged_captions(ctx: Context) -> dict[str, str]:
    """The tagger's captions for textemb and train ({} for a project without a tagger)."""
    return captions_of(ctx.read_manifest(STAGE)) if enabled(ctx.project) else {}


def suggestions(cache_root: Path, manifest: dict) -> dict[str, list[list]]:
    """Image id → ``[[tag, confidence], …]`` the last tag run gave it (highest first), for the
    dashboard. Read only: an unreadable entry is left for the next build to recompute, and the
    manifest's tags are given without confidences when their entry is gone."""
    from ..cache import Store, read_json

    store = Store(cache_root, STAGE, ".tags.json")
    out = {}
    for e in manifest.get("items", []):
        data = read_json(store.path(e["hash"])) if e.get("hash") else None
        stored = data.get("tags") if isinstance(data, dict) else None
        names = e.get("tags") or []
        if (isinstance(stored, list) and all(isinstance(t, list) and len(t) == 2 for t in stored)
                and [t for t, _ in stored] == names):
            out[e["id"]] = [[t, c] for t, c in stored]
        else:
            out[e["id"]] = [[t, None] for t in names]
    return out


def _deps(t: Inputs) -> list[str]:
    return t.images() + t.captions() + [str(f) for f in model_files(t.project)]


TASK = Stage(STAGE, VERSION, "images → WD14 tags from the project's tagger (only projects with a tagger section)",
             params=("tagger", "dataset", "device"), deps=_deps, run=run, enabled=enabled)
