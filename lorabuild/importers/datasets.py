"""A kohya dataset config (``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]``) → concepts.

sd-scripts looks an option up in the subset, then its dataset, then ``[general]``, then the
command line. Subsets become ``dataset.concepts`` (their caption options per concept); what
a project holds once (resolution, batch size, buckets, flip, random crop) comes from the first
dataset, and a dataset that wants another value is listed, not merged.
"""
from __future__ import annotations

from .options import SIMPLE, Result, is_off, map_option, to_bool

# subset options → a concept's captions options
CAPTIONS = {"shuffle_caption": "shuffle", "keep_tokens": "keep_tokens", "caption_dropout_rate": "dropout",
            "caption_tag_dropout_rate": "tag_dropout", "keep_tokens_separator": "keep_tokens_separator",
            "caption_dropout_every_n_epochs": "dropout_every_n_epochs", "caption_prefix": "prepend",
            "caption_suffix": "append", "enable_wildcard": "wildcards"}
# options a project has once: (kohya name, converter key in SIMPLE)
ONCE = {"resolution": "resolution", "batch_size": "train_batch_size", "min_bucket_reso": "min_bucket_reso",
        "max_bucket_reso": "max_bucket_reso", "bucket_reso_steps": "bucket_reso_steps",
        "bucket_no_upscale": "bucket_no_upscale", "validation_split": "validation_split",
        "validation_seed": "validation_seed", "flip_aug": "flip_aug", "random_crop": "random_crop"}
CONCEPT = {"image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension", "alpha_mask"}


def _convert(key: str, value):
    dotted, conv = SIMPLE[ONCE[key]]
    return dotted, conv(value)


def _tables(value, what: str, r: Result) -> list[dict]:
    """The tables of an array of tables; anything else in it is listed."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, dict):
            r.unmapped.append(f"{what} = {v!r} (not a table: [[{what}]] holds tables of options)")
    return [v for v in items if isinstance(v, dict)]


def add_datasets(r: Result, cfg: dict) -> None:
    general = cfg.get("general", {})
    if not isinstance(general, dict):
        r.unmapped.append(f"general = {general!r} (not a table: [general] holds options)")
        general = {}
    datasets = _tables(cfg.get("datasets", []), "datasets", r)
    for key in cfg:
        if key not in ("general", "datasets"):
            r.unmapped.append(f"{key} = {cfg[key]!r} (a dataset config has [general] and [[datasets]] only)")
    for key, value in general.items():  # the project-wide layer, under every dataset
        if key in ONCE or key in CAPTIONS or key == "caption_extension":
            try:
                _layer(r, key, value, f"[general] {key}")
            except (ValueError, TypeError):
                r.unmapped.append(f"[general] {key} = {value!r} (not understood)")
        elif key in CONCEPT or key in ORIG:
            continue  # read per subset / per dataset below
        elif is_off(key, value):
            r.off.append(f"[general] {key}")
        else:
            r.unmapped.append(f"[general] {key} = {value!r} (no equivalent in lorabuild)")
    once: dict = {}  # dotted → (value, which dataset set it)
    own: list[dict] = []  # per dataset: its concepts' bucket override (its resolution, its orig-size limits)
    for i, d in enumerate(datasets):
        own.append(_orig_limits(d, general, i, r))
        start = len(r.doc.get("dataset", {}).get("concepts", []))
        for key in ONCE:
            if key not in d and key not in general:
                continue
            value = d.get(key, general.get(key))
            try:
                dotted, conv = _convert(key, value)
            except (ValueError, TypeError):
                r.unmapped.append(f"datasets[{i}] {key} = {value!r} (not understood)")
                continue
            if key == "resolution" and dotted in once and once[dotted][0] != conv:
                own[i]["resolution"] = conv  # a dataset's own resolution: its concepts' bucket (multi-resolution)
                continue
            if dotted not in once:
                once[dotted] = (conv, i)
                r.set(dotted, conv, f"[[datasets]] {key}" if key in d else f"[general] {key}")
            elif once[dotted][0] != conv:
                first, j = once[dotted]
                r.unmapped.append(f"datasets[{i}] {key} = {value!r} (a project has one {dotted}; its concepts are "
                                  f"imported with datasets[{j}]'s {first!r}: make a second project to train them "
                                  "at this value)")
        for key, value in d.items():
            if key not in ONCE and key not in CAPTIONS and key not in CONCEPT and key not in ORIG and key != "subsets":
                r.unmapped.append(f"datasets[{i}] {key} = {value!r} (no equivalent in lorabuild)")
        for s in _tables(d.get("subsets", []), "datasets.subsets", r):
            try:
                _subset(r, {k: v for k, v in d.items() if k in CAPTIONS or k in CONCEPT}, s, general)
            except (ValueError, TypeError) as exc:
                r.unmapped.append(f"subset {s.get('image_dir', s)!r}: not understood ({exc}); left out")
        if own[i]:
            for c in r.doc.get("dataset", {}).get("concepts", [])[start:]:
                c["bucket"] = dict(own[i])
    _merge_resolutions(r, once.get("bucket.resolution", (None, 0))[0])


# kohya PR#2273: per dataset, which original sizes it trains (see lorabuild.multires)
ORIG = ("min_orig_resolution", "max_orig_resolution")


def _orig_limits(d: dict, general: dict, i: int, r: Result) -> dict:
    """A dataset's min/max_orig_resolution, as its concepts' bucket override."""
    out = {}
    for key in ORIG:
        value = d.get(key, general.get(key))
        if value is None:
            continue
        try:
            out[key] = float(value)
        except (ValueError, TypeError):
            r.unmapped.append(f"datasets[{i}] {key} = {value!r} (not understood)")
    return out


def _merge_resolutions(r: Result, project_res) -> None:
    """Concepts of one folder listed by several datasets (kohya's multi-resolution datasets, sd-scripts
    PR#2269) → one concept trained at each dataset's resolution (a ``bucket.resolution`` list)."""
    concepts = r.doc.get("dataset", {}).get("concepts", [])
    merged: list[dict] = []
    by_path: dict[str, dict] = {}
    for c in concepts:
        b = c.get("bucket", {})
        entry = {"resolution": b.get("resolution", project_res), **{k: b[k] for k in ORIG if k in b}}
        entry = entry["resolution"] if len(entry) == 1 else entry
        rest = {k: v for k, v in c.items() if k != "bucket"}
        first = by_path.get(c["path"])
        if first is None or {k: v for k, v in first.items() if k not in ("bucket", "_res")} != rest or project_res is None:
            by_path.setdefault(c["path"], c)
            merged.append(c)
            c["_res"] = [entry]
            continue
        first["_res"].append(entry)
    for c in merged:
        res = c.pop("_res")
        if len(res) > 1:
            c["bucket"] = {"resolution": res}
    if concepts:
        r.doc["dataset"]["concepts"] = merged
    lists = [c.get("bucket") for c in merged]
    if len(merged) > 0 and all(b and list(b) == ["resolution"] and b == lists[0] for b in lists):
        for c in merged:  # every folder at the same resolutions: the project's list (ai-toolkit's form)
            del c["bucket"]
        r.set("bucket.resolution", lists[0]["resolution"], "[[datasets]] resolution (one dataset per resolution)")


def _layer(r: Result, key: str, value, source: str) -> None:
    if key in ONCE:
        return  # per dataset, below
    if is_off(key, value) and key != "caption_extension":
        r.off.append(source)
        return
    map_option(r, key, value, "networks.lora")
    dotted = SIMPLE[key][0]
    r.sources[dotted] = source


def _subset(r: Result, dataset: dict, s: dict, general: dict) -> None:
    if "image_dir" not in s:
        r.unmapped.append(f"subset without image_dir: {s} (a fine-tuning subset with metadata_file? lorabuild reads "
                          "images and their caption files from a folder)")
        return
    where = f"subset {s['image_dir']}"
    eff = {**{k: v for k, v in general.items() if k in ("caption_extension", "alpha_mask")}, **dataset, **s}
    concept: dict = {"path": str(s["image_dir"]), "repeats": int(eff.get("num_repeats", 1))}
    if eff.get("class_tokens"):
        concept["trigger"] = str(eff["class_tokens"])
    if to_bool(eff.get("is_reg", False)):
        concept["is_reg"] = True
    if "caption_extension" in s or "caption_extension" in dataset:
        if eff["caption_extension"] != r.get("dataset.caption_extension"):
            concept["caption_extension"] = str(eff["caption_extension"])
    if "alpha_mask" in eff:
        if to_bool(eff["alpha_mask"]):
            r.set("train.masked_loss", True, f"{where}: alpha_mask")
        elif r.get("train.masked_loss"):
            r.notes.append(f"{where}: alpha_mask = false, but train.masked_loss masks every image that has an alpha "
                           "channel (remove the alpha from images that should count everywhere)")
    caps = {}
    for k, v in {**{k: v for k, v in dataset.items() if k in CAPTIONS}, **{k: v for k, v in s.items() if k in CAPTIONS}}.items():
        dotted, conv = SIMPLE[k]
        caps[CAPTIONS[k]] = conv(v)
    if caps:
        concept["captions"] = caps
    for k, v in s.items():
        if k in CAPTIONS or k in CONCEPT:
            continue
        if k in ONCE:
            try:
                dotted, conv = _convert(k, v)
            except (ValueError, TypeError):
                r.unmapped.append(f"{where}: {k} = {v!r} (not understood)")
                continue
            if r.get(dotted) is None and "dataset.concepts" not in r.sources:
                r.set(dotted, conv, f"{where}: {k}")
            elif r.get(dotted) != conv and not (is_off(k, v) and r.get(dotted) is None):
                r.unmapped.append(f"{where}: {k} = {v!r} (one {dotted} for the whole project, which is "
                                  f"{r.get(dotted)!r})")
        elif is_off(k, v):
            r.off.append(f"{where}: {k}")
        else:
            r.unmapped.append(f"{where}: {k} = {v!r} (no equivalent in lorabuild)")
    r.doc.setdefault("dataset", {}).setdefault("concepts", []).append(concept)
    r.sources["dataset.concepts"] = "[[datasets.subsets]] image_dir, num_repeats, class_tokens, is_reg"
