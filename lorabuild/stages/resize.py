"""resize: each source image → an RGB working copy, EXIF-aware, longest side ≤ ``resize.max_side``.

Its own parameter sets the working size, so changing buckets never re-runs it.
Item = one image; key = image bytes + resize parameters. An image is decoded from the very
bytes its key is hashed from (read once): one rewritten during a build is stored under its
new bytes' key, never its new pixels under the old bytes' key.
"""
from __future__ import annotations

from ..dataset import Dataset
from .base import Context, Item, StageError, StageRun

STAGE = "resize"
VERSION = 1
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


def _compute(item: Item, params: dict, store, data: bytes) -> dict:
    from ..images import RESAMPLE, load_rgb

    from ..buckets import working_size

    img = load_rgb(item.data["path"], tuple(params["background"]), data=data)
    orig = img.size
    size = working_size(*orig, params["max_side"])
    if size != orig:
        img = img.resize(size, RESAMPLE[params["interpolation"]])
    info = {"orig_size": list(orig), "size": list(img.size)}
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
        if not info or "size" not in info:
            store.discard(item.hash, "missing sidecar")
            item, data = _read(item, hashes)
            info = _compute(item, params, store, data)
            sr.computed += 1
            sr.reused -= 1
        entries.append({"id": item.id, "hash": item.hash, "size": info["size"], "orig_size": info["orig_size"]})
    return sr.finish(entries)
