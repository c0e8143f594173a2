"""bucket: each working image → its aspect-ratio bucket, resize size and centre crop (kohya's rules).

Item = one image; key = the working image's size + the bucket parameters (nothing
else decides a bucket, so images of equal size share an entry).
"""
from __future__ import annotations

from .. import buckets
from ..cache import canonical_json
from .base import Context, Item, StageRun

STAGE = "bucket"
VERSION = 1
PARAMS = ("bucket.resolution", "bucket.min_reso", "bucket.max_reso", "bucket.step", "bucket.no_upscale")


def decide(w: int, h: int, params: dict, ladder: list[tuple[int, int]]) -> dict:
    """The bucket decision for a ``w``×``h`` image, as plain JSON data."""
    if params["no_upscale"]:
        f = buckets.no_upscale_fit(w, h, params["resolution"] ** 2, params["step"])
    else:
        f = buckets.fit(w, h, *buckets.select_bucket(w, h, ladder))
    return {
        "bucket": [f.crop[2] - f.crop[0], f.crop[3] - f.crop[1]],
        "resized": list(f.resized),
        "crop": list(f.crop),
        "scale": f.scale,
        "cropped_share": f.cropped_share,
        "ar_error": f.ar_error,
        "upscaled": f.upscaled,
    }


def run(ctx: Context, params: dict) -> dict:
    sr = StageRun(ctx, STAGE)
    store = ctx.store(STAGE, ".fit.json")
    resized = ctx.read_manifest("resize")["items"]
    ladder = buckets.make_buckets(params["resolution"] ** 2, params["min_reso"], params["max_reso"], params["step"])
    items = [
        Item(e["id"], {"stage": STAGE, "v": VERSION, "size": e["size"], "params": params}, e) for e in resized
    ]
    entries, histogram = [], {}
    for item in items:
        w, h = item.data["size"]
        d = store.info(item.hash) if store.has(item.hash) else None
        if d is not None and "bucket" in d:
            sr.reused += 1
        else:
            d = decide(w, h, params, ladder)
            with store.put(item.hash, item.key, d) as tmp:
                tmp.write_text(canonical_json(d), encoding="utf-8")
            sr.computed += 1
        label = f"{d['bucket'][0]}x{d['bucket'][1]}"
        histogram[label] = histogram.get(label, 0) + 1
        entries.append({"id": item.id, "hash": item.hash, "src": item.data["hash"], "orig_size": item.data["orig_size"], **d})
    return sr.finish(entries, buckets=dict(sorted(histogram.items())), ladder=[list(b) for b in ladder])
