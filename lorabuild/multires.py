"""Multi-resolution training: which (image, resolution) samples a project trains.

``bucket.resolution`` may be a list (ai-toolkit's resolution list; kohya sd-scripts PR#2269
gets the same from one ``[[datasets]]`` per resolution over the same folders), and a concept
may set its own ``bucket`` (kohya: a dataset's own ``resolution``). Each (image, resolution)
is one sample: it has its own bucket from that resolution's ladder (min_reso, max_reso and
step as set, unscaled, as a kohya dataset inherits them), its own latent, and its concept's
repeats. An entry's ``min_orig_resolution``/``max_orig_resolution`` (kohya PR#2273: the
original's sqrt(w×h), min exclusive, max inclusive) leave an image out of that resolution.

Sample ids: an image's first resolution keeps the image's own id, so a single-resolution
project's manifests and keys are what they were; each further one is ``<id>@<resolution>``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import NamedTuple

# keys of a concept's bucket override (the schema's dataset.concepts.bucket)
OVERRIDES = ("resolution", "min_orig_resolution", "max_orig_resolution")


class Res(NamedTuple):
    resolution: int
    min_orig: float  # exclusive
    max_orig: float | None  # inclusive; None = no limit


def specs(bucket: dict) -> list[Res]:
    """The resolutions a bucket section (project's, or merged with a concept's) trains at."""
    res = bucket["resolution"]
    lo, hi = bucket.get("min_orig_resolution", 0) or 0, bucket.get("max_orig_resolution")
    out = []
    for r in res if isinstance(res, (list, tuple)) else [res]:
        if isinstance(r, Mapping):
            out.append(Res(r["resolution"], r.get("min_orig_resolution", lo) or 0, r.get("max_orig_resolution", hi)))
        else:
            out.append(Res(r, lo, hi))
    return out


def keeps(spec: Res, orig_size) -> bool:
    """Whether an image of original size ``orig_size`` is trained at ``spec`` (kohya's check_orig_resolution)."""
    r = math.sqrt(orig_size[0] * orig_size[1])
    return spec.min_orig < r and (spec.max_orig is None or r <= spec.max_orig)


def is_multi(project) -> bool:
    """Whether the project uses any of this (a list, an orig-size rule or a concept override):
    otherwise every manifest stays exactly as a single-resolution build writes it."""
    b = project.section("bucket")
    return (isinstance(b["resolution"], list) or bool(b.get("min_orig_resolution")) or
            b.get("max_orig_resolution") is not None or
            bool(concept_buckets(project)) or bool(dir_buckets(project)))


def concept_buckets(project) -> dict:
    """{concept folder: its merged bucket section} for the concepts that override it."""
    base = project.section("bucket")
    out = {}
    for c in project.section("dataset")["concepts"]:
        if c.get("bucket"):
            out[project.resolve(c["path"])] = {**base, **c["bucket"]}
    return out


def dir_buckets(project) -> dict:
    """{dataset folder: its merged bucket section} for the ``dataset.dirs`` entries that override it
    (their concept folders are its sub-folders)."""
    base = project.section("bucket")
    return {project.resolve(d["path"]): {**base, **d["bucket"]} for d in project.section("dataset")["dirs"]
            if isinstance(d, dict) and d.get("bucket")}


def task_config(project) -> dict:
    """What decides a multi-resolution project's samples beyond bucket.PARAMS (for doit's up-to-date check)."""
    b = project.section("bucket")
    return {"orig": [b.get("min_orig_resolution"), b.get("max_orig_resolution")],
            "concepts": {str(k): {o: v[o] for o in OVERRIDES} for k, v in sorted(concept_buckets(project).items())},
            "dirs": {str(k): {o: v[o] for o in OVERRIDES} for k, v in sorted(dir_buckets(project).items())}}


def image_specs(project, dataset=None) -> tuple[list[Res], dict]:
    """(the project's resolutions, {image id: its concept's resolutions} where a concept overrides);
    ``dataset``: the project's, when already scanned."""
    base = specs(project.section("bucket"))
    over, dirs = concept_buckets(project), dir_buckets(project)
    if not over and not dirs:
        return base, {}
    from .dataset import from_project

    per = {}
    for im in (dataset or from_project(project)).images:
        b = over.get(im.concept.folder) or dirs.get(im.concept.folder.parent)  # a concept's own, else its folder's
        if b is not None:
            per[im.id] = specs(b)
    return base, per


def samples_of(image_id: str, orig_size, res: list[Res]) -> list[tuple[str, Res]]:
    """(sample id, resolution) of each resolution an image is trained at, in list order."""
    kept = [r for r in res if keeps(r, orig_size)]
    return [(image_id if i == 0 else f"{image_id}@{r.resolution}", r) for i, r in enumerate(kept)]


def with_samples(dataset, entries: list[dict]):
    """``dataset`` with one more image per extra-resolution sample (manifest entries naming
    their ``image``), so the training stage finds a concept and caption under each sample id."""
    by_id = {im.id: im for im in dataset.images}
    extra = [replace(by_id[e["image"]], id=e["id"]) for e in entries if e.get("image") and e["image"] in by_id]
    if not extra:
        return dataset
    return replace(dataset, images=dataset.images + tuple(extra))


def problems(bucket: dict, where: str, pos, problem) -> None:
    """Validation the schema cannot express: a resolution that is not a multiple of the step, or
    above max_reso (no bucket of that area fits the ladder), repeated, or min ≥ max."""
    res = bucket["resolution"]
    if not isinstance(res, list):  # one resolution: kohya's rules, as before (its side is cut to steps)
        return
    seen = set()
    for i, r in enumerate(res):
        at, field = ("resolution", i), f"{where}.resolution.{i}"
        spec = specs({**bucket, "resolution": r})[0]
        if spec.resolution % bucket["step"]:
            problem(pos(*at), field, f"{spec.resolution} is not a multiple of bucket.step ({bucket['step']})")
        if spec.resolution > bucket["max_reso"]:
            problem(pos(*at), field, f"{spec.resolution} is larger than bucket.max_reso ({bucket['max_reso']}): "
                                     "no bucket of that size fits; raise max_reso")
        if spec in seen:
            problem(pos(*at), field, f"{spec.resolution} is listed twice")
        seen.add(spec)
        if spec.max_orig is not None and spec.max_orig <= spec.min_orig:
            problem(pos(*at), field, f"max_orig_resolution ({spec.max_orig}) is not above min_orig_resolution "
                                     f"({spec.min_orig}): no image would train at {spec.resolution}")


def datasets_metadata(entries: list[dict], bucket: dict) -> list | None:
    """kohya's ``ss_datasets`` for a multi-resolution run: per resolution (as one kohya dataset
    each) its resolution, bucket settings, sample count and ``bucket_info``; None for a
    single-resolution run (whose manifest entries carry no resolution)."""
    if not any("resolution" in e for e in entries):
        return None
    groups: dict[int, dict] = {}
    for e in entries:
        g = groups.setdefault(e["resolution"], {})
        g[tuple(e["bucket"])] = g.get(tuple(e["bucket"]), 0) + 1
    return [{"resolution": [r, r], "enable_bucket": True, "min_bucket_reso": bucket["min_reso"],
             "max_bucket_reso": bucket["max_reso"], "bucket_no_upscale": bucket["no_upscale"],
             "num_train_images": sum(g.values()),
             "bucket_info": {"buckets": {str(i): {"resolution": list(b), "count": n}
                                         for i, (b, n) in enumerate(sorted(g.items()))}}}
            for r, g in sorted(groups.items())]
