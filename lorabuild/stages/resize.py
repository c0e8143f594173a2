"""resize: each source image → an RGB working copy, EXIF-aware, longest side ≤ ``resize.max_side``.

Its own parameter sets the working size, so changing buckets never re-runs it.
Item = one image; key = image bytes + resize parameters. An image is decoded from the very
bytes its key is hashed from (read once): one rewritten during a build is stored under its
new bytes' key, never its new pixels under the old bytes' key.

Each entry also records its ``content``: a hash of the working copy's pixels. Later stages key
on that instead of on this stage's key, so a ``resize.max_side`` change re-encodes only the
images whose working copy comes out different (issue 24, item 7).
"""
from __future__ import annotations

from ..dataset import Dataset
from .base import Context, Item, StageError, StageRun
from .spec import Inputs, Stage, params_of

STAGE = "resize"
VERSION = 1
# 2: manifest entries hold each working copy's content (the task runs once more, keys unchanged)
MANIFEST = 2
PARAMS = ("resize.max_side", "resize.interpolation", "resize.background")


def plan(dataset: Dataset, params: dict, hashes) -> list[Item]:
    items = []
    for im in dataset.images:
        try:
            digest = hashes.sha256(im.path)
        except OSError as exc:
            raise StageError(f"{im.path}: cannot be read ({exc})") from None
        key = {"stage": STAGE, "v": VERSION, "src": digest, "params": params}
        items.append(Item(im.id, key, {"path": im.path}))
    return items


def _read(item: Item, hashes) -> tuple[Item, bytes]:
    """The image's bytes and the item keyed on exactly them (a new key if the file changed
    since the plan hashed it)."""
    from ..cache import FileChanged

    try:
        data, digest = hashes.read(item.data["path"])
    except FileChanged as exc:
        raise StageError(str(exc)) from None
    except OSError as exc:
        raise StageError(f"{item.data['path']}: cannot be read ({exc})") from None
    if digest != item.key["src"]:
        item = Item(item.id, {**item.key, "src": digest}, item.data)
    return item, data


def content_hash(img) -> str:
    """What a working copy is, whatever made it: its mode, size and pixels (not the PNG bytes,
    which another zlib could compress differently)."""
    import hashlib

    h = hashlib.sha256(f"{img.mode} {img.width}x{img.height}\n".encode("ascii"))
    h.update(img.tobytes())
    return "sha256:" + h.hexdigest()


def _add_content(store, h: str, info: dict) -> dict:
    """``info`` with the ``content`` of an entry made before entries recorded it, which is then
    written into its sidecar (key and checksum unchanged), so it is decoded once; None when the
    entry is damaged (it is removed, to be made again)."""
    import io

    from PIL import Image

    from ..cache import CorruptEntry, checked_read, read_json, write_json

    def decode(_path):
        with Image.open(io.BytesIO(data)) as im:
            return content_hash(im.convert("RGB"))

    try:
        data = store.read_verified(h)
        info = {**info, "content": checked_read(STAGE, store.path(h), decode)}
    except CorruptEntry as exc:
        store.discard(h, exc.reason)
        return None
    side = read_json(store.sidecar(h))
    if isinstance(side, dict):
        write_json(store.sidecar(h), {**side, "info": {**side.get("info", {}), "content": info["content"]}})
    return info


def _compute(item: Item, params: dict, store, data: bytes) -> dict:
    from ..buckets import working_size
    from ..images import RESAMPLE, load_rgb

    img = load_rgb(item.data["path"], tuple(params["background"]), data=data)
    orig = img.size
    size = working_size(*orig, params["max_side"])
    if size != orig:
        img = img.resize(size, RESAMPLE[params["interpolation"]])
    info = {"orig_size": list(orig), "size": list(img.size), "content": content_hash(img)}
    with store.put(item.hash, item.key, info) as tmp:
        img.save(tmp, format="PNG", compress_level=1)
    return info


def run(ctx: Context, dataset: Dataset, params: dict, on_bad_image: str = "error") -> dict:
    """Make the missing working copies. A bad image stops the stage naming the file, or with
    ``on_bad_image: skip`` is left out, and the warning is kept in the report."""
    from ..images import ImageError

    sr = StageRun(ctx, STAGE)
    store = ctx.store(STAGE, ".png")
    hashes = ctx.hashes()
    try:
        items = plan(dataset, params, hashes)
    finally:
        hashes.save()
    infos, bad, rekeyed = {}, set(), {}
    for planned in sr.split(items, store):
        try:
            item, data = _read(planned, hashes)
            if item.hash != planned.hash:  # rewritten since it was hashed: keyed on what was read
                rekeyed[planned.hash] = item
                if store.has(item.hash):
                    sr.reused += 1
                    continue
            with store.claim([item.hash]) as todo:  # another build may be making the same copy
                if not todo:
                    sr.reused += 1
                    continue
                infos[item.hash] = _compute(item, params, store, data)
        except ImageError as exc:
            if on_bad_image != "skip":
                raise StageError(str(exc)) from None
            sr.notes.append(f"skipped {exc}")
            print(f"warning: skipped {exc}", flush=True)
            bad.add(item.hash)
            continue
        sr.computed += 1
    hashes.save()
    entries, before = [], sr.previous()
    for item in (rekeyed.get(it.hash, it) for it in items):
        if item.hash in bad:
            continue
        info = infos.get(item.hash) or before.get(item.hash) or store.info(item.hash)
        damaged = False
        if info and "size" in info and "content" not in info:
            info = _add_content(store, item.hash, info)
            damaged = info is None
        if not info or "size" not in info:
            if not damaged:
                store.discard(item.hash, "missing sidecar")
            item, data = _read(item, hashes)
            info = _compute(item, params, store, data)
            sr.computed += 1
            sr.reused -= 1
        entries.append({"id": item.id, "hash": item.hash, "size": info["size"], "orig_size": info["orig_size"],
                        "content": info["content"], "source_hash": item.key["src"]})
    return sr.finish(entries)


def _task_run(ctx: Context, dataset: Dataset) -> dict:
    import sys

    for w in dataset.warnings:  # once per build, before any image is read
        print(f"warning: {w}", file=sys.stderr)
    return run(ctx, dataset, params_of(ctx.project, PARAMS), ctx.project.get("dataset.on_bad_image"))


TASK = Stage(STAGE, VERSION, "images → RGB working copies (EXIF-aware, longest side ≤ resize.max_side)",
             params=PARAMS + ("dataset.on_bad_image",), deps=Inputs.images, run=_task_run,
             extra=lambda project, cfg: {"manifest": MANIFEST})
