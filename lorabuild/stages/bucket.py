"""bucket: each working image → its aspect-ratio bucket, resize size and centre crop (kohya's rules).

Also writes ``output/<name>/buckets/buckets.json`` (per image: original size, bucket,
resize size, crop box, scale, share cropped, aspect-ratio error, upscaled) and one
contact sheet per bucket, ``<W>x<H>.jpg``, so a user sees which image went where and
what was cut off.

Item = one image; key = the working image's size + the bucket parameters (nothing
else decides a bucket, so images of equal size share an entry).
"""
from __future__ import annotations

from pathlib import Path

from .. import buckets
from ..cache import atomic_path, canonical_json, read_json, write_json_if_changed
from .base import Context, Item, StageRun

STAGE = "bucket"
VERSION = 1
PARAMS = ("bucket.resolution", "bucket.min_reso", "bucket.max_reso", "bucket.step", "bucket.no_upscale")
# Not part of an item's key (it does not change a decision, only whether the image is used).
FILTER_PARAMS = ("bucket.small_images",)


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


def run(ctx: Context, params: dict, small_images: str = "upscale") -> dict:
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
            with store.claim([item.hash]):  # another build may be deciding the same size meanwhile
                d = store.info(item.hash) if store.has(item.hash) else None
                if d is not None and "bucket" in d:
                    sr.reused += 1
                else:
                    d = decide(w, h, params, ladder)
                    with store.put(item.hash, item.key, d) as tmp:
                        tmp.write_text(canonical_json(d), encoding="utf-8")
                    sr.computed += 1
        if small_images == "reject" and min(w, h) < params["min_reso"]:
            sr.notes.append(f"rejected {item.id} ({w}x{h}): a side is below bucket.min_reso ({params['min_reso']})")
            continue
        label = f"{d['bucket'][0]}x{d['bucket'][1]}"
        histogram[label] = histogram.get(label, 0) + 1
        entries.append({"id": item.id, "hash": item.hash, "src": item.data["hash"], "orig_size": item.data["orig_size"], **d})
    out = ctx.ws.output_dir(ctx.project.output_name) / "buckets"
    write_json_if_changed(out / "buckets.json", {"buckets": dict(sorted(histogram.items())), "images": entries})
    contact_sheets(ctx.store("resize", ".png"), entries, out)
    return sr.finish(entries, buckets=dict(sorted(histogram.items())), ladder=[list(b) for b in ladder])


SHEET_PAGE = 256  # images per contact sheet; a bigger bucket gets pages <bucket>-p2.jpg, …


def contact_sheets(resize_store, entries: list[dict], out: Path, thumb: int = 128, columns: int = 8) -> None:
    """One sheet per bucket (paged): every image in it, the kept region outlined, the cut-off part dimmed.

    A sheet is drawn again only when what it shows changed (its images, their fit), as
    ``sheets.json`` beside them records: adding one image redraws one page, not thousands of thumbnails.
    """
    import hashlib
    import json

    by_bucket: dict[str, list[dict]] = {}
    for e in entries:
        by_bucket.setdefault(f"{e['bucket'][0]}x{e['bucket'][1]}", []).append(e)
    pages: dict[str, list[dict]] = {}
    for label, group in by_bucket.items():
        for n, i in enumerate(range(0, len(group), SHEET_PAGE), 1):
            pages[label if n == 1 else f"{label}-p{n}"] = group[i : i + SHEET_PAGE]
    for old in out.glob("*.jpg"):
        if old.stem not in pages:
            old.unlink()
    drawn = read_json(out / "sheets.json", {}) or {}
    now = {}
    for name, group in pages.items():
        shown = [[e["id"], e["src"], e["resized"], e["crop"]] for e in group]
        now[name] = hashlib.sha256(json.dumps([thumb, columns, shown]).encode()).hexdigest()
        if drawn.get(name) != now[name] or not (out / f"{name}.jpg").is_file():
            _sheet(resize_store, group, out / f"{name}.jpg", thumb, columns)
    write_json_if_changed(out / "sheets.json", now)


def _sheet(resize_store, group: list[dict], path: Path, thumb: int, columns: int) -> None:
    from PIL import Image, ImageDraw

    rows = (len(group) + columns - 1) // columns
    sheet = Image.new("RGB", (min(len(group), columns) * thumb, rows * (thumb + 12)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, e in enumerate(group):
        with Image.open(resize_store.path(e["src"])) as im:
            im = im.convert("RGB").resize(tuple(e["resized"]))
        k = thumb / max(im.size)
        tile = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))))
        dim = Image.new("RGB", tile.size, "black")
        left, top, right, bottom = (round(c * k) for c in e["crop"])
        mask = Image.new("L", tile.size, 110)
        ImageDraw.Draw(mask).rectangle([left, top, right - 1, bottom - 1], fill=255)
        tile = Image.composite(tile, dim, mask)
        x, y = (i % columns) * thumb, (i // columns) * (thumb + 12)
        sheet.paste(tile, (x, y))
        draw.rectangle([x + left, y + top, x + right - 1, y + bottom - 1], outline=(255, 0, 0))
        draw.text((x + 2, y + thumb), Path(e["id"]).name[:20], fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=85)
