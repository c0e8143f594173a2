"""bucket: each working image → its aspect-ratio bucket, resize size and centre crop (kohya's rules).

Also writes ``output/<name>/buckets/buckets.json`` (per image: original size, bucket,
resize size, crop box, scale, share cropped, aspect-ratio error, upscaled) and one
contact sheet per bucket, ``<W>x<H>.jpg``, so a user sees which image went where and
what was cut off.

Item = one image; key = the working image's size + the bucket parameters (nothing
else decides a bucket, so images of equal size share an entry). With several resolutions
(lorabuild.multires) an item is one (image, resolution) sample, keyed with that one
resolution: the key a single-resolution project at it has.
"""
from __future__ import annotations

from pathlib import Path

from .. import buckets, multires
from ..cache import atomic_path, canonical_json, read_json, write_json_if_changed
from .base import Context, Item, StageError, StageRun
from .spec import Stage, params_of

STAGE = "bucket"
VERSION = 1
PARAMS = ("bucket.resolution", "bucket.min_reso", "bucket.max_reso", "bucket.step", "bucket.no_upscale")
# Not part of an item's key (it does not change a decision, only whether the image is used).
FILTER_PARAMS = ("bucket.small_images", "dataset.on_bad_image")
# An image of which less than this share would be left after the centre crop (a 4000×1 strip
# in a 1024×256 bucket keeps 0.1%) is a bad image: kohya would train on the sliver, scaled up
# hundreds of times; here it stops the stage naming it, or is left out with on_bad_image: skip.
MIN_KEPT = 0.1


DECISION = ("bucket", "resized", "crop", "scale", "cropped_share", "ar_error", "upscaled")  # what decide() returns


def fit_of(w: int, h: int, params: dict, ladder: list[tuple[int, int]]) -> buckets.Fit:
    """The fit of a ``w``×``h`` image: kohya's ``bucket_no_upscale`` rule, or the nearest bucket of the ladder."""
    if params["no_upscale"]:
        return buckets.no_upscale_fit(w, h, params["resolution"] ** 2, params["step"])
    return buckets.fit(w, h, *buckets.select_bucket(w, h, ladder))


def decide(w: int, h: int, params: dict, ladder: list[tuple[int, int]]) -> dict:
    """The bucket decision for a ``w``×``h`` image, as plain JSON data."""
    f = fit_of(w, h, params, ladder)
    return {
        "bucket": [f.crop[2] - f.crop[0], f.crop[3] - f.crop[1]],
        "resized": list(f.resized),
        "crop": list(f.crop),
        "scale": f.scale,
        "cropped_share": f.cropped_share,
        "ar_error": f.ar_error,
        "upscaled": f.upscaled,
    }


def rejected(w: int, h: int, params: dict, small_images: str) -> bool:
    """Whether a ``w``×``h`` working copy is left out: ``bucket.small_images: reject`` and a side
    below ``bucket.min_reso``."""
    return small_images == "reject" and min(w, h) < params["min_reso"]


def sample_items(project, params: dict, resized: list[dict]) -> tuple[list[Item], bool]:
    """(one item per (image, resolution) sample, whether the project is multi-resolution).
    A sample's key holds its one resolution: the same key a single-resolution project at that
    resolution has, so adding a resolution decides (and encodes) only the new samples."""
    multi = multires.is_multi(project)
    base, per = multires.image_specs(project) if multi else ([None], {})
    items = []
    for e in resized:
        if not multi:
            items.append(Item(e["id"], {"stage": STAGE, "v": VERSION, "size": e["size"], "params": params}, e))
            continue
        for sid, spec in multires.samples_of(e["id"], e["orig_size"], per.get(e["id"], base)):
            key = {"stage": STAGE, "v": VERSION, "size": e["size"], "params": {**params, "resolution": spec.resolution}}
            items.append(Item(sid, key, {**e, "image": e["id"], "resolution": spec.resolution}))
    return items, multi


def run(ctx: Context, params: dict, small_images: str = "upscale", on_bad_image: str = "error") -> dict:
    sr = StageRun(ctx, STAGE)
    store = ctx.store(STAGE, ".fit.json")
    resized = ctx.read_manifest("resize")["items"]
    items, multi = sample_items(ctx.project, params, resized)
    ladders: dict[int, list] = {}
    entries, histogram, before, regrown = [], {}, sr.previous(), []
    for item in items:
        w, h = item.data["size"]
        kp = item.key["params"]  # with this sample's one resolution
        ladder = ladders.get(kp["resolution"])
        if ladder is None:
            ladder = ladders[kp["resolution"]] = buckets.make_buckets(
                kp["resolution"] ** 2, kp["min_reso"], kp["max_reso"], kp["step"])
        if rejected(w, h, params, small_images):
            sr.notes.append(f"rejected {item.id} ({w}x{h}): a side is below bucket.min_reso ({params['min_reso']})")
            continue
        d = _decision(sr, store, item, before, ladder)
        if 1 - d["cropped_share"] < MIN_KEPT:
            bad = (f"{item.id} ({item.data['orig_size'][0]}x{item.data['orig_size'][1]}): only "
                   f"{1 - d['cropped_share']:.1%} of it would fit its bucket {d['bucket'][0]}x{d['bucket'][1]}")
            if on_bad_image != "skip":
                raise StageError(f"{bad}: crop the image, or set dataset.on_bad_image: skip to leave it out")
            sr.notes.append(f"skipped {bad}")
            print(f"warning: skipped {bad}", flush=True)
            continue
        if d["upscaled"] and max(item.data["orig_size"]) > max(w, h):
            regrown.append(f"{item.id} ({item.data['orig_size'][0]}x{item.data['orig_size'][1]} → {w}x{h} → "
                           f"{d['bucket'][0]}x{d['bucket'][1]})")
        label = f"{d['bucket'][0]}x{d['bucket'][1]}"
        histogram[label] = histogram.get(label, 0) + 1
        entries.append({"id": item.id, "hash": item.hash, "src": item.data["hash"], "orig_size": item.data["orig_size"],
                        "content": item.data["content"], "source_hash": item.data["source_hash"], **d,
                        **({"resolution": item.data["resolution"]} if multi else {}),
                        **({"image": item.data["image"]} if item.id != item.data.get("image", item.id) else {})})
    if regrown:  # the working copy threw away pixels its bucket then asks for (`lorabuild plan` says how to keep them)
        note = (f"{len(regrown)} image(s) were shrunk to resize.max_side ({ctx.project.get('resize.max_side')}) and are "
                f"enlarged again to their bucket: {', '.join(regrown[:3])}")
        sr.notes.append(note)
        print(f"warning: {note}", flush=True)
    out = ctx.ws.output_dir(ctx.project.output_name) / "buckets"
    per_res = resolutions(entries) if multi else {}
    write_json_if_changed(out / "buckets.json", {"buckets": dict(sorted(histogram.items())),
                                                 **({"resolutions": per_res} if multi else {}), "images": entries})
    contact_sheets(ctx.store("resize", ".png"), entries, out)
    if multi:
        return sr.finish(entries, buckets=dict(sorted(histogram.items())), resolutions=per_res,
                         ladder={str(r): [list(b) for b in lad] for r, lad in sorted(ladders.items())})
    ladder = buckets.make_buckets(params["resolution"] ** 2, params["min_reso"], params["max_reso"], params["step"])
    return sr.finish(entries, buckets=dict(sorted(histogram.items())), ladder=[list(b) for b in ladder])


def _decision(sr: StageRun, store, item: Item, before: dict, ladder: list) -> dict:
    """The item's bucket decision: as the last run listed it, else from its entry, else decided
    now (and stored); counted as reused or computed."""
    d = None
    if store.has(item.hash):  # the decision as the last run listed it, else from the entry
        last = before.get(item.hash, {})
        d = {k: last[k] for k in DECISION} if all(k in last for k in DECISION) else store.info(item.hash)
    if d is not None and "bucket" in d:
        sr.reused += 1
        return d
    with store.claim([item.hash]):  # another build may be deciding the same size meanwhile
        d = store.info(item.hash) if store.has(item.hash) else None
        if d is not None and "bucket" in d:
            sr.reused += 1
            return d
        try:
            d = decide(*item.data["size"], item.key["params"], ladder)
        except buckets.TooNarrow as exc:
            raise StageError(f"{item.id}: bucket.no_upscale: its working copy {exc}; remove the image or "
                             "turn bucket.no_upscale off (bucket.small_images: reject leaves out images with "
                             "a side below bucket.min_reso)") from None
        with store.put(item.hash, item.key, d) as tmp:
            tmp.write_text(canonical_json(d), encoding="utf-8")
        sr.computed += 1
    return d


def resolutions(entries: list[dict]) -> dict:
    """{resolution: {"images": n, "buckets": {"WxH": n}}} of a multi-resolution bucket manifest."""
    out: dict = {}
    for e in entries:
        r = out.setdefault(str(e["resolution"]), {"images": 0, "buckets": {}})
        label = f"{e['bucket'][0]}x{e['bucket'][1]}"
        r["images"] += 1
        r["buckets"][label] = r["buckets"].get(label, 0) + 1
    return {k: {"images": v["images"], "buckets": dict(sorted(v["buckets"].items()))}
            for k, v in sorted(out.items(), key=lambda kv: int(kv[0]))}


SHEET_PAGE = 64  # images per contact sheet (8 × 8); a bigger bucket gets pages <bucket>-p2.jpg, …
LABEL = 16  # px under each thumbnail for its name: a cell is 128 × 144, whole JPEG blocks


def contact_sheets(resize_store, entries: list[dict], out: Path, thumb: int = 128, columns: int = 8) -> None:
    """One sheet per bucket (paged): every image in it, the kept region outlined, the cut-off part dimmed.

    A sheet is drawn again only when what it shows changed (its images, their fit), as
    ``sheets.json`` beside them records; and then only its new cells are drawn from the working
    copies: a cell already on a sheet (same image, same fit) is copied from there. Adding one
    image redraws one page and one thumbnail, not thousands.
    """
    import hashlib
    import json

    by_bucket: dict[str, list[dict]] = {}
    for e in entries:  # a multi-resolution sample's sheets are named for its resolution too: 768-512x1024.jpg
        prefix = f"{e['resolution']}-" if "resolution" in e else ""
        by_bucket.setdefault(f"{prefix}{e['bucket'][0]}x{e['bucket'][1]}", []).append(e)
    pages: dict[str, list[dict]] = {}
    for label, group in by_bucket.items():
        for n, i in enumerate(range(0, len(group), SHEET_PAGE), 1):
            pages[label if n == 1 else f"{label}-p{n}"] = group[i : i + SHEET_PAGE]
    drawn = read_json(out / "sheets.json", {}) or {}
    cell = [thumb, thumb + LABEL, columns]
    old_cells = {}  # a cell's identity → (sheet, index) on a sheet drawn before
    for name, rec in drawn.items():
        if isinstance(rec, dict) and rec.get("cell") == cell and (out / f"{name}.jpg").is_file():
            for i, shown in enumerate(rec.get("shown", [])):
                old_cells[json.dumps(shown)] = (name, i)
    now, todo = {}, []
    for name, group in pages.items():
        shown = [[e["id"], e["src"], e["resized"], e["crop"]] for e in group]
        digest = hashlib.sha256(json.dumps([cell, shown]).encode()).hexdigest()
        now[name] = {"hash": digest, "cell": cell, "shown": shown}
        before = drawn.get(name)
        if not isinstance(before, dict) or before.get("hash") != digest or not (out / f"{name}.jpg").is_file():
            todo.append((name, group, [old_cells.get(json.dumps(x)) for x in shown]))
    sources = _open_sheets(out, {src[0] for _, _, found in todo for src in found if src})  # before any is rewritten
    for name, group, found in todo:
        _sheet(resize_store, group, out / f"{name}.jpg", thumb, columns, found, sources)
    for old in out.glob("*.jpg"):
        if old.stem not in pages:
            old.unlink()
    write_json_if_changed(out / "sheets.json", now)


def _open_sheets(out: Path, names: set[str]) -> dict:
    """The sheets cells are copied from, read into memory; one that cannot be read is skipped
    (its cells are drawn anew)."""
    from PIL import Image

    opened = {}
    for name in names:
        try:
            with Image.open(out / f"{name}.jpg") as im:
                opened[name] = im.convert("RGB")
        except OSError:
            pass
    return opened


def _sheet(resize_store, group: list[dict], path: Path, thumb: int, columns: int, found: list, sources: dict) -> None:
    from PIL import Image, ImageDraw

    rows = (len(group) + columns - 1) // columns
    height = thumb + LABEL
    sheet = Image.new("RGB", (min(len(group), columns) * thumb, rows * height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (e, src) in enumerate(zip(group, found)):
        x, y = (i % columns) * thumb, (i // columns) * height
        if src is not None and src[0] in sources:
            sx, sy = (src[1] % columns) * thumb, (src[1] // columns) * height
            sheet.paste(sources[src[0]].crop((sx, sy, sx + thumb, sy + height)), (x, y))
            continue
        with Image.open(resize_store.path(e["src"])) as im:
            im = im.convert("RGB").resize(tuple(e["resized"]))
        k = thumb / max(im.size)
        tile = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))))
        dim = Image.new("RGB", tile.size, "black")
        left, top, right, bottom = (round(c * k) for c in e["crop"])
        right, bottom = max(right, left + 1), max(bottom, top + 1)  # a crop thinner than a pixel here stays visible
        mask = Image.new("L", tile.size, 110)
        ImageDraw.Draw(mask).rectangle([left, top, right - 1, bottom - 1], fill=255)
        tile = Image.composite(tile, dim, mask)
        sheet.paste(tile, (x, y))
        draw.rectangle([x + left, y + top, x + right - 1, y + bottom - 1], outline=(255, 0, 0))
        draw.text((x + 2, y + thumb + 2), Path(e["id"]).name[:20], fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=85)


def _task_run(ctx: Context, dataset) -> dict:
    p = ctx.project
    return run(ctx, params_of(p, PARAMS), p.get("bucket.small_images"), p.get("dataset.on_bad_image"))


TASK = Stage(STAGE, VERSION, "working copies → kohya aspect-ratio buckets, resize sizes and crops",
             params=PARAMS + FILTER_PARAMS, deps=lambda t: [t.manifest("resize")], run=_task_run,
             # a multi-resolution project's orig-size rules and concepts' overrides (absent: the record as it was)
             extra=lambda p, cfg: {"multires": multires.task_config(p)} if multires.is_multi(p) else {})
