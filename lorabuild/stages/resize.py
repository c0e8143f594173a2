"""resize: each source image → an RGB working copy, EXIF-aware, longest side ≤ ``resize.max_side``.

Its own parameter sets the working size, so changing buckets never re-runs it.
Item = one image; key = image bytes + resize parameters.
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


def _compute(item: Item, params: dict, store) -> dict:
    from ..images import RESAMPLE, load_rgb

    from ..buckets import working_size

    img = load_rgb(item.data["path"], tuple(params["background"]))
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
    infos, bad = {}, set()
    for item in sr.split(items, store):
        try:
            with store.claim([item.hash]) as todo:  # another build may be making the same copy
                if not todo:
                    sr.reused += 1
                    continue
                infos[item.hash] = _compute(item, params, store)
        except ImageError as exc:
            if on_bad_image != "skip":
                raise StageError(str(exc)) from None
            sr.notes.append(f"skipped {exc}")
            print(f"warning: skipped {exc}", flush=True)
            bad.add(item.hash)
            continue
        sr.computed += 1
    entries, before = [], sr.previous()
    for item in items:
        if item.hash in bad:
            continue
        info = infos.get(item.hash) or before.get(item.hash) or store.info(item.hash)
        if not info or "size" not in info:
            store.discard(item.hash, "missing sidecar")
            info = _compute(item, params, store)
            sr.computed += 1
            sr.reused -= 1
        entries.append({"id": item.id, "hash": item.hash, "size": info["size"], "orig_size": info["orig_size"]})
    return sr.finish(entries)
