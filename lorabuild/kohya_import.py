"""``lorabuild import-kohya``: a kohya sd-scripts setup → an equivalent project YAML.

Reads a training config (``--config_file`` TOML, flat keys as sd-scripts writes them), or
a saved command line (``accelerate launch train_network.py --network_dim 32 …``, shell or
Windows line continuations allowed), and optionally a dataset config (``[[datasets]]`` /
``[[datasets.subsets]]``). Every option it knows is mapped; every other one is listed in
the YAML's header and on the terminal, so nothing is dropped silently.
"""
from __future__ import annotations

import ast
import math
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from .prompts import SAMPLER_ALIASES, SAMPLER_NAMES


def _precision(v: str) -> str:
    return {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[str(v)]


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "")


def _raw_kv(v) -> dict[str, str]:
    """kohya's ``["conv_dim=4", "betas=0.9,0.99"]`` → ``{"conv_dim": "4", "betas": "0.9,0.99"}``."""
    items = v if isinstance(v, list) else shlex.split(str(v))
    return {k.strip(): val for k, _, val in (str(item).partition("=") for item in items)}


def _kv_list(v) -> dict:
    """kohya's ``["conv_dim=4", "betas=0.9,0.99"]`` → ``{"conv_dim": 4, "betas": [0.9, 0.99]}``."""
    out = {}
    for k, val in _raw_kv(v).items():
        parts = [yaml.safe_load(p) for p in val.split(",")]
        out[k] = parts[0] if len(parts) == 1 else parts
    return out


def _numbers(v: str, conv) -> list:
    """A kohya block list ``"1,,0.5"``: an empty entry is 0, as sd-scripts parses lr weights."""
    return [conv(x) if x.strip() else conv(0) for x in v.split(",")]


def _patterns(v: str) -> list[str]:
    """kohya reads exclude/include_patterns with ``ast.literal_eval``: a list literal or one string."""
    try:
        value = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        value = v
    return [str(p) for p in value] if isinstance(value, (list, tuple)) else [str(value)]


def _lr_weight(v: str):
    return _numbers(v, float) if "," in v or not re.match(r"^[a-z_]+", v) else v


# kohya network_args → (network field, converter of kohya's string)
NETWORK_ARGS = {
    "conv_dim": ("conv_dim", int), "conv_rank": ("conv_dim", int), "conv_alpha": ("conv_alpha", float),
    "loraplus_lr_ratio": ("loraplus_lr_ratio", float), "loraplus_unet_lr_ratio": ("loraplus_unet_lr_ratio", float),
    "loraplus_text_encoder_lr_ratio": ("loraplus_text_encoder_lr_ratio", float),
    "block_dims": ("block_dims", lambda v: _numbers(v, int)), "block_alphas": ("block_alphas", lambda v: _numbers(v, float)),
    "conv_block_dims": ("conv_block_dims", lambda v: _numbers(v, int)),
    "conv_block_alphas": ("conv_block_alphas", lambda v: _numbers(v, float)),
    "down_lr_weight": ("down_lr_weight", _lr_weight), "up_lr_weight": ("up_lr_weight", _lr_weight),
    "mid_lr_weight": ("mid_lr_weight", lambda v: _numbers(v, float)),
    "block_lr_zero_threshold": ("block_lr_zero_threshold", float),
    "rank_dropout": ("rank_dropout", float), "module_dropout": ("module_dropout", float),
    "exclude_patterns": ("exclude_patterns", _patterns), "include_patterns": ("include_patterns", _patterns),
}


def _sampler(v: str) -> str:
    name = SAMPLER_ALIASES.get(str(v).lower(), str(v).lower())
    return name if name in SAMPLER_NAMES else "euler_a"


def _resolution(v) -> int:
    w, h = (int(x) for x in (str(v).split(",") * 2)[:2])
    return int(math.sqrt(w * h))


# kohya key → (our dotted key, converter)
SIMPLE = {
    "pretrained_model_name_or_path": ("base_model", str),
    "vae": ("vae", str),
    "v2": ("model_type", lambda v: "sd2" if _bool(v) else "auto"),
    "v_parameterization": ("prediction_type", lambda v: "v_prediction" if _bool(v) else "auto"),
    "output_name": ("output.name", str),
    "save_precision": ("output.save_precision", _precision),
    "training_comment": ("output.comment", str),
    "network_dim": ("network.dim", int),
    "network_alpha": ("network.alpha", float),
    "network_dropout": ("network.dropout", float),
    "network_weights": ("network.weights", str),
    "loraplus_lr_ratio": ("network.loraplus_lr_ratio", float),
    "loraplus_unet_lr_ratio": ("network.loraplus_unet_lr_ratio", float),
    "loraplus_text_encoder_lr_ratio": ("network.loraplus_text_encoder_lr_ratio", float),
    "learning_rate": ("train.learning_rate", float),
    "unet_lr": ("train.unet_lr", float),
    "text_encoder_lr": ("train.text_encoder_lr", float),
    "max_train_epochs": ("train.epochs", int),
    "train_batch_size": ("train.batch_size", int),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", int),
    "seed": ("train.seed", int),
    "validation_split": ("train.validation_split", float),
    "validation_seed": ("train.validation_seed", int),
    "masked_loss": ("train.masked_loss", _bool),
    "lr_scheduler": ("train.lr_scheduler", str),
    "lr_scheduler_num_cycles": ("train.lr_scheduler_num_cycles", int),
    "lr_scheduler_power": ("train.lr_scheduler_power", float),
    "max_grad_norm": ("train.max_grad_norm", float),
    "mixed_precision": ("train.mixed_precision", str),
    "fp8_base": ("train.base_precision", lambda v: "fp8" if _bool(v) else "auto"),
    "save_every_n_epochs": ("train.save_every_n_epochs", int),
    "save_every_n_steps": ("train.save_every_n_steps", int),
    "max_train_steps": ("train.max_steps", int),
    "save_last_n_epochs": ("output.keep_last", int),
    "save_last_n_steps": ("output.keep_last", int),
    "prior_loss_weight": ("train.prior_loss_weight", float),
    "noise_offset": ("train.noise_offset", float),
    "noise_offset_random_strength": ("train.noise_offset_random_strength", _bool),
    "adaptive_noise_scale": ("train.adaptive_noise_scale", float),
    "ip_noise_gamma": ("train.ip_noise_gamma", float),
    "ip_noise_gamma_random_strength": ("train.ip_noise_gamma_random_strength", _bool),
    "min_timestep": ("train.min_timestep", int),
    "max_timestep": ("train.max_timestep", int),
    "scale_weight_norms": ("train.scale_weight_norms", float),
    "min_snr_gamma": ("train.min_snr_gamma", float),
    "zero_terminal_snr": ("train.zero_terminal_snr", _bool),
    "loss_type": ("train.loss_type", str),
    "huber_c": ("train.huber_c", float),
    "clip_skip": ("textemb.clip_skip", int),
    "max_token_length": ("textemb.max_token_length", int),
    "resolution": ("bucket.resolution", _resolution),
    "min_bucket_reso": ("bucket.min_reso", int),
    "max_bucket_reso": ("bucket.max_reso", int),
    "bucket_reso_steps": ("bucket.step", int),
    "bucket_no_upscale": ("bucket.no_upscale", _bool),
    "caption_extension": ("dataset.caption_extension", str),
    "shuffle_caption": ("captions.shuffle", _bool),
    "keep_tokens": ("captions.keep_tokens", int),
    "keep_tokens_separator": ("captions.keep_tokens_separator", str),
    "caption_dropout_rate": ("captions.dropout", float),
    "caption_tag_dropout_rate": ("captions.tag_dropout", float),
    "caption_dropout_every_n_epochs": ("captions.dropout_every_n_epochs", int),
    "flip_aug": ("latents.flip", _bool),
    "vae_batch_size": ("latents.batch_size", int),
    "gradient_checkpointing": ("train.gradient_checkpointing", _bool),
    "random_crop": ("latents.random_crop", _bool),
    "sample_prompts": ("sample.prompt_file", str),
    "sample_every_n_epochs": ("sample.every_n_epochs", int),
    "sample_every_n_steps": ("sample.every_n_steps", int),
    "sample_at_first": ("sample.at_first", _bool),
    "sample_sampler": ("sample.sampler", _sampler),
    "train_data_dir": ("dataset.dirs", lambda v: [str(v)]),
    "reg_data_dir": ("dataset.reg_dirs", lambda v: [str(v)]),
}
# options that only steer kohya's own machinery, with nothing to set here
NOT_NEEDED = {"enable_bucket", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
              "cache_text_encoder_outputs_to_disk", "sdpa", "xformers", "mem_eff_attn", "persistent_data_loader_workers",
              "max_data_loader_n_workers", "output_dir", "logging_dir", "log_prefix", "save_model_as", "network_module",
              "lowram", "highvram", "config_file", "dataset_config", "save_state",
              "log_with", "wandb_api_key", "no_half_vae", "full_fp16", "full_bf16"}


def parse_command_line(text: str) -> dict:
    """``--key value`` / ``--key=value`` / ``--flag`` options of a saved kohya command line."""
    text = re.sub(r"[\\^`]\r?\n", " ", text)  # bash, cmd and PowerShell line continuations
    tokens = shlex.split(text, comments=True)
    scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
    if scripts:  # what comes before the script is the launcher's (accelerate's) own options
        tokens = tokens[scripts[-1] + 1 :]
    out: dict = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if eq:
                out[key] = val
            else:
                vals = []
                while i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                    vals.append(tokens[i + 1])
                    i += 1
                out[key] = True if not vals else vals[0] if len(vals) == 1 else vals
        i += 1
    return out


def read_config(path: Path) -> dict:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".toml":
        return tomllib.loads(text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return parse_command_line(text)


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        doc = doc.setdefault(p, {})
    doc[last] = value


def convert(cfg: dict, dataset_cfg: dict | None = None) -> tuple[dict, list[str], list[str]]:
    """(project document, unmapped options, notes)."""
    flat: dict = {}
    for k, v in cfg.items():  # kohya also accepts its config keys grouped in TOML tables
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    doc: dict = {}
    unmapped, notes = [], []
    for key, value in flat.items():
        key = key.replace("-", "_")
        if key in SIMPLE:
            dotted, conv = SIMPLE[key]
            try:
                _set(doc, dotted, conv(value))
            except (ValueError, KeyError, TypeError):
                unmapped.append(f"{key} = {value!r} (not understood)")
        elif key == "optimizer_type":
            name = str(value).lower().replace("_", "")
            known = {"adamw": "adamw", "adamw8bit": "adamw8bit", "lion": "lion", "lion8bit": "lion8bit",
                     "prodigy": "prodigy", "adafactor": "adafactor", "sgdnesterov": "sgd", "sgd": "sgd"}
            if name in known:
                _set(doc, "train.optimizer", known[name])
            else:
                unmapped.append(f"optimizer_type = {value!r} (not available; adamw is used)")
        elif key == "optimizer_args":
            _set(doc, "train.optimizer_args", _kv_list(value))
        elif key == "network_args":
            for k2, v2 in _raw_kv(value).items():
                if k2 not in NETWORK_ARGS:
                    unmapped.append(f"network_args {k2}={v2}")
                    continue
                field, conv = NETWORK_ARGS[k2]
                try:
                    _set(doc, f"network.{field}", conv(v2.strip()))
                except ValueError:
                    unmapped.append(f"network_args {k2}={v2} (not understood)")
                if k2 == "exclude_patterns":
                    notes.append("network.exclude_patterns/include_patterns match the whole kohya module name "
                                 "(lora_unet_…_attn2_to_k); kohya's FLUX/SD3 networks match the dotted module path: "
                                 "check the patterns (lorabuild validate; a pattern matching nothing is an error)")
        elif key == "alpha_mask":  # kohya applies an alpha mask whenever it loads one, masked_loss or not
            if _bool(value):
                _set(doc, "train.masked_loss", True)
        elif key == "lr_warmup_steps":
            v = float(value)
            _set(doc, "train.lr_warmup_ratio" if 0 < v < 1 else "train.lr_warmup_steps", v if v < 1 else int(v))
        elif key == "network_train_unet_only" and _bool(value):
            _set(doc, "network.train_text_encoder", False)
        elif key == "network_train_text_encoder_only" and _bool(value):
            _set(doc, "network.train_unet", False)
        elif key == "xformers" and _bool(value):
            _set(doc, "train.attention", "xformers")
        elif key == "sdxl" and _bool(value):
            _set(doc, "model_type", "sdxl")
        elif key in NOT_NEEDED:
            continue
        elif key in ("network_train_unet_only", "network_train_text_encoder_only"):
            continue
        else:
            unmapped.append(f"{key} = {value!r}")
    train = doc.get("train", {})
    if "epochs" in train and "max_steps" in train:  # kohya: max_train_epochs overrides max_train_steps
        notes.append(f"max_train_epochs overrides max_train_steps in kohya: train.max_steps "
                     f"{train.pop('max_steps')} dropped")
    elif "epochs" not in train and "max_steps" not in train:
        _set(doc, "train.max_steps", 1600)
        notes.append("neither max_train_epochs nor max_train_steps: train.max_steps is kohya's default, 1600")
    if dataset_cfg:
        _datasets(doc, dataset_cfg, unmapped, notes)
    doc.setdefault("base_model", "builtin:tiny-sd1")
    doc.setdefault("dataset", {})
    if not doc["dataset"].get("dirs") and not doc["dataset"].get("concepts"):
        notes.append("no dataset found (train_data_dir or a dataset config): fill in dataset.dirs")
    return _ordered(doc), unmapped, notes


def _datasets(doc: dict, dataset_cfg: dict, unmapped: list[str], notes: list[str]) -> None:
    general = dataset_cfg.get("general", {})
    for d in dataset_cfg.get("datasets", []):
        settings = {**general, **{k: v for k, v in d.items() if k != "subsets"}}
        for k in ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                  "caption_extension", "shuffle_caption", "keep_tokens", "flip_aug", "random_crop", "validation_split",
                  "validation_seed"):
            if k in settings:
                dotted, conv = SIMPLE[k]
                _set(doc, dotted, conv(settings[k]))
        if _bool(settings.get("alpha_mask", False)):
            _set(doc, "train.masked_loss", True)
        if "batch_size" in settings:
            _set(doc, "train.batch_size", int(settings["batch_size"]))
        for s in d.get("subsets", []):
            if "image_dir" not in s:
                unmapped.append(f"subset without image_dir: {s}")
                continue
            concept: dict = {"path": str(s["image_dir"]), "repeats": int(s.get("num_repeats", 1))}
            if s.get("class_tokens"):
                concept["trigger"] = str(s["class_tokens"])
            if s.get("is_reg"):
                concept["is_reg"] = True
            if s.get("caption_extension"):
                concept["caption_extension"] = str(s["caption_extension"])
            if "alpha_mask" in s:
                if _bool(s["alpha_mask"]):
                    _set(doc, "train.masked_loss", True)
                elif doc.get("train", {}).get("masked_loss"):
                    notes.append(f"subset {s['image_dir']}: alpha_mask = false, but train.masked_loss masks every image "
                                 "that has an alpha channel (remove the alpha from images that should count everywhere)")
            caps = {k2: s[k] for k, k2 in (("shuffle_caption", "shuffle"), ("keep_tokens", "keep_tokens")) if k in s}
            if caps:
                concept["captions"] = caps
            for k in s:
                if k not in ("image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension",
                             "shuffle_caption", "keep_tokens", "alpha_mask"):
                    unmapped.append(f"subset {s['image_dir']}: {k} = {s[k]!r}")
            doc.setdefault("dataset", {}).setdefault("concepts", []).append(concept)


ORDER = ("base_model", "model_type", "prediction_type", "vae", "dataset", "captions", "resize", "bucket", "latents", "textemb", "network", "train", "sample",
         "output")


def _ordered(doc: dict) -> dict:
    return {k: doc[k] for k in ORDER if k in doc}


def render(doc: dict, unmapped: list[str], notes: list[str], source: str) -> str:
    head = [f"# Imported from kohya sd-scripts settings: {source}", "# Check it with: lorabuild validate; lorabuild plan"]
    if unmapped:
        head.append("# Not mapped (no equivalent here, or not understood):")
        head += [f"#   {u}" for u in unmapped]
    head += [f"# Note: {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def cmd_import(config: Path, dataset_config: Path | None, out: Path | None) -> int:
    import sys

    try:
        cfg = read_config(config)
        ds = tomllib.loads(dataset_config.read_text(encoding="utf-8-sig")) if dataset_config else None
    except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
        print(f"lorabuild import-kohya: {exc}", file=sys.stderr)
        return 1
    doc, unmapped, notes = convert(cfg, ds)
    text = render(doc, unmapped, notes, str(config) + (f" + {dataset_config}" if dataset_config else ""))
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    for u in unmapped:
        print(f"not mapped: {u}", file=sys.stderr)
    return 0
