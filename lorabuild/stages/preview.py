"""``lorabuild plan NAME``: what the build is going to train on, without loading any model.

Per concept: folder, images, repeats, default caption, captions found vs defaulted;
the bucket histogram; kohya's step arithmetic; the most common tags; each concept's
share of an epoch; and every warning worth reading before an hour of training.
Image sizes come from file headers (no decoding), EXIF rotation included.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .. import buckets, multires
from ..captions import CaptionError, dataset_captions, split_tags
from ..dataset import IMAGE_EXTENSIONS, Dataset, from_project
from . import bucket as bucket_stage
from .spec import params_of
from ..train.plan import Sample, make_plan, project_samples

# EXIF orientations 5-8 rotate by 90°, so width and height swap.
_SWAPS = {5, 6, 7, 8}


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed, from the header alone; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in _SWAPS:
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001 - any unreadable file is reported, not raised
        return None


def build_plan(project, hashes=None, tagged: dict[str, str] | None = None) -> dict:
    """The plan as plain data (also printed by :func:`render`); ``tagged``: the captions
    the tag stage's last run gave (image id → text)."""
    ds: Dataset = from_project(project)
    warnings = list(ds.warnings)
    tagged = tagged or {}
    try:
        captions = dataset_captions(ds.images, project.section("captions"), tagged)
    except CaptionError as exc:
        warnings.append(str(exc))
        captions = {im.id: im.concept.tokens for im in ds.images}
    b = params_of(project, bucket_stage.TASK.params)  # what the bucket stage's task is keyed on
    sizes = {im.id: header_size(im.path) for im in ds.images}
    multi = multires.is_multi(project)
    res = multires.image_specs(project, ds) if multi else None  # None: one resolution, bucket.resolution
    regrown = _regrown(ds, sizes, b, project.get("resize.max_side"), res)
    samples, histogram, left = _placed(ds, sizes, b, project.get("resize.max_side"), res)
    tiny, unreadable, narrow, rejected, slivers = (left[k] for k in ("tiny", "unreadable", "narrow", "rejected", "slivers"))
    t = project.section("train")
    samples, val = project_samples(samples, t)
    held_out = [s for s in val if not s.is_val]
    if held_out:
        warnings.append(f"{len(held_out)} image(s) held out for validation (train.validation_split): "
                        f"{', '.join(s.id for s in held_out[:5])}")
    validation = {"images": len(val), "held_out": len(held_out), "val_images": len(val) - len(held_out)}
    from ..train.dist import launch_options

    tp = make_plan(samples, t["batch_size"], t["gradient_accumulation_steps"], t["epochs"], t["max_steps"],
                   launch_options(project).world) if samples else None

    concepts = []
    total = sum(s.repeats for s in samples) or 1
    for c in ds.concepts:
        ims = [im for im in ds.images if im.concept == c]
        concepts.append({
            "folder": str(c.folder), "images": len(ims), "repeats": 0 if c.is_val else c.repeats,
            "default_caption": c.tokens, "validation": c.is_val,
            "captions_found": sum(im.caption_path is not None for im in ims),
            "captions_defaulted": sum(im.caption_path is None and im.id not in tagged for im in ims),
            "captions_tagged": sum(im.id in tagged for im in ims),
            "share_of_epoch": 0.0 if c.is_val else round(len(ims) * c.repeats / total, 4),
        })
        if not c.is_val and c.repeats * t["epochs"] and not 100 <= c.repeats * t["epochs"] <= 200:
            warnings.append(f"{c.folder.name}: repeats × epochs = {c.repeats * t['epochs']}, far from the 100–200 that usually works")
    from ..train.optimizers import advice

    warnings += advice(t["optimizer"], t["learning_rate"])
    from ..extras import missing as missing_packages

    warnings += missing_packages(project.cfg)
    if project.get("latents.random_crop"):
        warnings.append("latents.random_crop is on: the latent cache is off and training encodes every image every epoch (slower)")
    missing = [im.id for im in ds.images if im.caption_path is None and im.id not in tagged]
    if missing:
        warnings.append(f"{len(missing)} image(s) have no caption file and use their folder's tokens: {', '.join(missing[:5])}")
    if tiny:
        warnings.append(f"{len(tiny)} image(s) are smaller than their bucket and will be upscaled: {', '.join(tiny[:5])}")
    if rejected:
        warnings.append(f"{len(rejected)} image(s) have a side below bucket.min_reso ({b['min_reso']}) and are left out "
                        f"(bucket.small_images: reject): {', '.join(rejected[:5])}")
    if slivers:
        warnings.append(f"{len(slivers)} image(s) would be cut to a sliver by their bucket and "
                        + ("are left out (dataset.on_bad_image: skip): " if project.get("dataset.on_bad_image") == "skip"
                           else "stop the bucket stage: ") + "; ".join(slivers[:3]))
    if narrow:
        warnings.append(f"{len(narrow)} image(s) fit no bucket under bucket.no_upscale and stop the bucket stage: "
                        + "; ".join(narrow[:3]))
    if regrown:
        warnings.append(regrown)
    if unreadable:
        warnings.append(f"{len(unreadable)} file(s) are not readable images: {', '.join(unreadable[:5])}")
    warnings += _orphan_captions(ds, project.get("dataset.caption_extension"))
    warnings += _other_caption_files(ds)
    if hashes is not None:
        warnings += _duplicates(ds, hashes)
    val_ids = {s.id for s in val}  # what training sees: validation images are not in the tag counts
    tags = Counter(t_ for i, c in captions.items() if i not in val_ids for t_ in set(split_tags(c)))
    from ..models import MODEL_OPTIONS, single_file_markers

    detected = single_file_markers(str(project.get("base_model")), project.root,
                                   {k: project.get(k) for k in MODEL_OPTIONS}) + _objective(project, warnings)
    return {
        "project": project.name,
        "base_model": detected,
        "concepts": concepts,
        "buckets": dict(sorted(histogram.items())),
        **({"resolutions": _per_resolution(left["resolution"])} if multi else {}),
        "steps": None if tp is None else {
            "images": tp.images, "samples_per_epoch": tp.samples_per_epoch, "batch_size": tp.batch_size,
            "gradient_accumulation_steps": tp.gradient_accumulation_steps, "effective_batch": tp.effective_batch,
            "batches_per_epoch": tp.batches_per_epoch, "steps_per_epoch": tp.steps_per_epoch,
            "epochs": tp.epochs, "total_steps": tp.total_steps, "processes": tp.processes,
            "last_epoch_steps": tp.total_steps - (tp.epochs - 1) * tp.steps_per_epoch,
        },
        "validation": validation,
        "top_tags": tags.most_common(20),
        "warnings": warnings,
    }


def _samples(ds: Dataset, sizes: dict, b: dict, res):
    """(image, sample id, size, bucket settings with its one resolution, ladder) of every sample,
    as the bucket stage makes them (lorabuild.multires); size None: unreadable."""
    ladders: dict[int, list] = {}
    for im in ds.images:
        size = sizes[im.id]
        if size is None:
            yield im, im.id, None, b, None
            continue
        if res is None:
            picked = [(im.id, b["resolution"])]
        else:
            picked = [(sid, r.resolution) for sid, r in multires.samples_of(im.id, size, res[1].get(im.id, res[0]))]
        for sid, r in picked:
            if r not in ladders:
                ladders[r] = buckets.make_buckets(r ** 2, b["min_reso"], b["max_reso"], b["step"])
            yield im, sid, size, {**b, "resolution": r}, ladders[r]


def _per_resolution(placed: list[tuple[int, str]]) -> dict:
    """{resolution: {"images", "buckets"}} of a multi-resolution plan, from each sample's
    (resolution, bucket label); validation images included, as in the bucket histogram."""
    out: dict = {}
    for res, label in placed:
        r = out.setdefault(str(res), {"images": 0, "buckets": Counter()})
        r["images"] += 1
        r["buckets"][label] += 1
    return {k: {"images": v["images"], "buckets": dict(sorted(v["buckets"].items()))}
            for k, v in sorted(out.items(), key=lambda kv: int(kv[0]))}


def _placed(ds: Dataset, sizes: dict, b0: dict, max_side: int, res=None) -> tuple[list[Sample], Counter, dict[str, list]]:
    """(samples, bucket histogram, the images left out or warned about by kind), each image put
    in its bucket by the bucket stage's own rules, from the working copy's size resize.max_side
    gives it, as the stage does; ``res``: a multi-resolution project's (lorabuild.multires.image_specs)."""
    samples, histogram = [], Counter()
    left: dict[str, list] = {k: [] for k in ("tiny", "unreadable", "narrow", "rejected", "slivers", "resolution")}
    for im, sid, size, b, ladder in _samples(ds, sizes, b0, res):  # b: with the sample's one resolution
        if size is None:
            left["unreadable"].append(im.id)
            continue
        work = buckets.working_size(*size, max_side)
        if bucket_stage.rejected(*work, b, b["small_images"]):
            left["rejected"].append(f"{im.id} ({work[0]}x{work[1]})")
            continue
        try:
            d = bucket_stage.decide(*work, b, ladder)
        except buckets.TooNarrow as exc:
            left["narrow"].append(f"{im.id}: {exc}")
            continue
        if 1 - d["cropped_share"] < bucket_stage.MIN_KEPT:  # the stage stops on it, or leaves it out
            left["slivers"].append(f"{im.id}: {1 - d['cropped_share']:.1%} of it fits bucket "
                                   f"{d['bucket'][0]}x{d['bucket'][1]}")
            continue
        if d["upscaled"] and not b["no_upscale"] and work == size:  # shrunk ones: _regrown's warning
            left["tiny"].append(f"{im.id} ({size[0]}x{size[1]})")
        histogram["{}x{}".format(*d["bucket"])] += 1
        samples.append(Sample(sid, tuple(d["bucket"]), im.concept.repeats, im.concept.is_reg, im.concept.is_val,
                              "" if sid == im.id else im.id))
        left["resolution"].append((b["resolution"], "{}x{}".format(*d["bucket"])))
    return samples, histogram, left


def _regrown(ds: Dataset, sizes: dict, b0: dict, max_side: int, res=None) -> str | None:
    """A warning for the images that resize.max_side shrinks below what their bucket then needs, so
    they are enlarged again from a copy that threw those pixels away (or, with no_upscale, put in
    a smaller bucket than their original allows), with the max_side that would keep every pixel;
    for each resolution a multi-resolution image is trained at (its largest bucket decides)."""
    hit, need = [], 0
    for im, sid, size, b, ladder in _samples(ds, sizes, b0, res):
        if size is None or buckets.working_size(*size, max_side) == size:
            continue
        work = buckets.working_size(*size, max_side)
        try:
            f = bucket_stage.fit_of(*work, b, ladder)
            if b["no_upscale"]:
                fo = bucket_stage.fit_of(*size, b, ladder)
                lost = (f.crop[2] - f.crop[0]) * (f.crop[3] - f.crop[1]) < (fo.crop[2] - fo.crop[0]) * (fo.crop[3] - fo.crop[1])
            else:
                fo = buckets.fit(*size, f.crop[2] - f.crop[0], f.crop[3] - f.crop[1])
                lost = f.upscaled
        except buckets.TooNarrow:
            continue  # reported on its own
        if lost:
            hit.append(f"{sid} ({size[0]}x{size[1]} → {work[0]}x{work[1]} → bucket {f.crop[2] - f.crop[0]}x"
                       f"{f.crop[3] - f.crop[1]})")
            need = max(need, min(max(size), max(fo.resized)))
    if not hit:
        return None
    return (f"{len(hit)} image(s) are shrunk to resize.max_side ({max_side}) below what their bucket needs "
            f"(bucket.resolution {b0['resolution']}, bucket.max_reso {b0['max_reso']}) and lose detail their original "
            f"has: {', '.join(hit[:3])}; resize.max_side: {need} keeps every pixel they need")


def _orphan_captions(ds: Dataset, ext: str) -> list[str]:
    out = []
    for c in ds.concepts:
        stems = {p.stem for p in c.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        orphans = [p.name for p in c.folder.glob(f"*{ext}") if p.stem not in stems]
        if orphans:
            out.append(f"{c.folder.name}: caption file(s) without an image: {', '.join(sorted(orphans)[:5])}")
    return out


# caption extensions in common use (kohya's default is .caption, most guides write .txt)
CAPTION_EXTENSIONS = (".txt", ".caption")


def _other_caption_files(ds: Dataset) -> list[str]:
    """Caption files beside the images under another common extension than the one read."""
    out = []
    for c in ds.concepts:
        stems = {p.stem for p in c.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        for ext in CAPTION_EXTENSIONS:
            if ext == c.caption_extension.lower():
                continue
            found = sorted(p.name for p in c.folder.glob(f"*{ext}") if p.stem in stems)
            if found:
                out.append(f"{c.folder.name}: {len(found)} caption file(s) end in {ext} ({', '.join(found[:3])}), "
                           f"but captions are read from {c.caption_extension} files: set dataset.caption_extension: "
                           f"{ext} (or the concept's caption_extension) to use them")
    return out


def _duplicates(ds: Dataset, hashes) -> list[str]:
    seen: dict[str, str] = {}
    dups = []
    for im in ds.images:
        h = hashes.sha256(im.path)
        if h in seen:
            dups.append(f"{im.id} = {seen[h]}")
        else:
            seen[h] = im.id
    return [f"{len(dups)} duplicate image(s) by content: {'; '.join(dups[:5])}"] if dups else []


def _objective(project, warnings: list) -> list[str]:
    """A flow model's family and objective as it will train (a built-in or a diffusers folder; read
    from its configs, nothing loaded); nothing for the DDPM families, whose plan reads as before."""
    from ..families import builtin_family, family_of
    from ..flow import FlowSettings
    from ..models import model_info, noise_schedule

    spec = str(project.get("base_model"))
    try:
        if spec.startswith("builtin:"):
            fam, sched = builtin_family(spec.removeprefix("builtin:")), {}
        else:
            folder = project.resolve(spec)
            if not (folder / "model_index.json").is_file():
                return []
            fam, sched = family_of(model_info(folder)), noise_schedule(folder)
        if fam is None or fam.objective(sched) != "flow":
            return []
        s = FlowSettings.of(project.section("train"), fam.flow_defaults)
    except Exception as exc:  # the stages say what is wrong with the model or the settings, with context
        warnings.append(str(exc))
        return []
    only = {"logit_mean": "logit_normal", "logit_std": "logit_normal", "mode_scale": "mode"}  # their sampler's
    settings = ", ".join(f"{k} {v}" for k, v in s.keyed().items() if only.get(k, s.timestep_sampling) == s.timestep_sampling)
    return [f"{fam.title}, trained with rectified flow (target noise − image): {settings}"]


def render(plan: dict) -> str:
    lines = [f"plan for {plan['project']}:"] + [f"  base model: {d}" for d in plan.get("base_model", [])]
    lines.append("  concepts:")
    for c in plan["concepts"]:
        if c.get("validation"):
            lines.append(f"    {c['folder']}: {c['images']} validation images; caption default '{c['default_caption']}'; "
                         f"captions found {c['captions_found']}, defaulted {c['captions_defaulted']}")
            continue
        lines.append(
            f"    {c['folder']}: {c['images']} images × {c['repeats']} repeats = {c['share_of_epoch']:.0%} of an epoch; "
            f"caption default '{c['default_caption']}'; captions found {c['captions_found']}, defaulted {c['captions_defaulted']}"
            + (f", tagged {c['captions_tagged']}" if c.get("captions_tagged") else "")
        )
    lines.append("  buckets: " + ", ".join(f"{k}: {v}" for k, v in plan["buckets"].items()))
    for r, v in (plan.get("resolutions") or {}).items():  # a multi-resolution project: each resolution's own
        lines.append(f"    at {r}: {v['images']} images; " + ", ".join(f"{k}: {n}" for k, n in v["buckets"].items()))
    s = plan["steps"]
    if s:
        lines.append(
            f"  steps: {s['samples_per_epoch']} samples per epoch, batch {s['batch_size']} × "
            + (f"processes {s['processes']} × " if s.get("processes", 1) > 1 else "") + "accumulation "
            f"{s['gradient_accumulation_steps']} → {s['steps_per_epoch']} steps per epoch × {s['epochs']} epochs = "
            f"{s['total_steps']} steps"
            + (f" (max_steps: epoch {s['epochs']} stops after {s['last_epoch_steps']} of its steps)"
               if s["last_epoch_steps"] < s["steps_per_epoch"] else "")
        )
    v = plan.get("validation") or {}
    if v.get("images"):
        lines.append(f"  validation: {v['images']} images, never trained on, their loss measured after every epoch ("
                     f"{v['val_images']} from val_dirs/is_val concepts, {v['held_out']} held out by validation_split)")
    lines.append("  top tags: " + ", ".join(f"{t} ({n})" for t, n in plan["top_tags"]))
    for w in plan["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
