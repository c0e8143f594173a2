"""kohya options (sd-scripts' names, as :mod:`lorabuild.importers.read` gives them) → a project document:
each option through :mod:`lorabuild.importers.options`'s table, a dataset config's subsets through
:mod:`lorabuild.importers.datasets`, then the defaults kohya would use and lorabuild's section order.
Above both, so the dataset reader uses the option table without the two importing each other.
"""
from __future__ import annotations

import re

from . import flow
from .datasets import add_datasets
from .options import NEUTRAL, Result, is_off, map_option


def convert(cfg: dict, dataset_cfg: dict | None = None) -> tuple[dict, list[str], list[str]]:
    """(project document, unmapped options, notes); :func:`convert_full` also says where each field came from."""
    r = convert_full(cfg, dataset_cfg)
    return r.doc, r.unmapped, r.notes


def convert_full(cfg: dict, dataset_cfg: dict | None = None) -> Result:
    r = Result()
    flat: dict = {}
    for k, v in cfg.items():  # kohya also accepts its config keys grouped in TOML tables
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    flat = {k.replace("-", "_"): v for k, v in flat.items()}
    module = str(flat.get("network_module", "networks.lora"))
    flat = flow.map_flow(r, flat, is_off)  # FLUX.1 / SD 3.5: the objective's options read together
    for key, value in flat.items():
        if isinstance(value, str) and re.search(r"\$\{?\w", value):
            r.unmapped.append(f"{key} = {value!r} (a script variable that is not set)")
        elif key in NEUTRAL and NEUTRAL[key] == value:
            if key != "_script":  # the launched script is not an option
                r.not_needed.append(f"{key} {value}")
        elif is_off(key, value):
            r.off.append(key)
        else:
            try:
                map_option(r, key, value, module)
            except (ValueError, KeyError, TypeError) as exc:
                why = str(exc) if isinstance(exc, ValueError) and " " in str(exc) else "not understood"
                r.unmapped.append(f"{key} = {value!r} ({why})")
    _length(r)
    flow.finish(r)
    if dataset_cfg:
        for dotted in ("dataset.dirs", "dataset.reg_dirs"):  # sd-scripts ignores them with a dataset config
            if r.get(dotted):
                source, dirs = r.sources.pop(dotted), r.doc["dataset"].pop(dotted.split(".")[1])
                r.unmapped.append(f"{source} = {dirs[0]!r} (sd-scripts ignores it when a dataset config is given)")
        add_datasets(r, dataset_cfg)
    if "base_model" not in r.doc:
        r.set("base_model", "builtin:tiny-sd1", "no pretrained_model_name_or_path given")
        r.notes.append("no base model (pretrained_model_name_or_path) in the config: base_model is lorabuild's tiny "
                       "random test model, builtin:tiny-sd1; set it to your model's file or folder")
    r.doc.setdefault("dataset", {})
    if not r.doc["dataset"].get("dirs") and not r.doc["dataset"].get("concepts"):
        r.notes.append("no dataset found (train_data_dir or a dataset config): fill in dataset.dirs")
    r.doc = ordered(r.doc)
    return r


def _length(r: Result) -> None:
    train = r.doc.get("train", {})
    if "epochs" in train and "max_steps" in train:  # kohya: max_train_epochs overrides max_train_steps
        r.notes.append(f"max_train_epochs overrides max_train_steps in kohya: train.max_steps "
                       f"{train.pop('max_steps')} dropped")
        r.sources.pop("train.max_steps", None)
    elif "epochs" not in train and "max_steps" not in train:
        r.set("train.max_steps", 1600, "max_train_steps' default (neither length is given)")
        r.notes.append("neither max_train_epochs nor max_train_steps: train.max_steps is kohya's default, 1600")


ORDER = ("base_model", "model_type", "prediction_type", "vae", "text_encoders", "allow_pickle", "dataset", "captions",
         "resize", "bucket", "latents", "textemb", "network", "train", "sample", "output")


def ordered(doc: dict) -> dict:
    return {k: doc[k] for k in ORDER if k in doc}
