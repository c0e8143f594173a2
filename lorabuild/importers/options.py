"""``lorabuild import-kohya``: kohya options (sd-scripts' names) → an equivalent project document.

``importers.read`` turns each supported file into kohya's option names; this module maps each one
(:func:`map_option`, with the tables it reads); ``importers.convert`` runs a whole config through it.
Every option either lands on the field that means the same (remembered, so the written YAML
names its source), or is listed with why it cannot; kohya's "0 = off" values become off,
and options that only steer kohya's own machinery are listed as not needed.
"""
from __future__ import annotations

import ast
import math
import re
import shlex
from dataclasses import dataclass, field

from ..prompts import SAMPLER_ALIASES, SAMPLER_NAMES
from ..yamlio import load as yaml_load
from .common import flag, to_bool  # noqa: F401 - the other importers read to_bool here


def _precision(v: str) -> str:
    return {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[str(v)]


def _raw_kv(v) -> dict[str, str]:
    """kohya's ``["conv_dim=4", "betas=0.9,0.99"]`` → ``{"conv_dim": "4", "betas": "0.9,0.99"}``."""
    items = v if isinstance(v, list) else shlex.split(str(v))
    return {k.strip(): val for k, _, val in (str(item).partition("=") for item in items)}


def _kv_list(v) -> dict:
    """kohya's ``["conv_dim=4", "betas=0.9,0.99"]`` → ``{"conv_dim": 4, "betas": [0.9, 0.99]}``."""
    out = {}
    for k, val in _raw_kv(v).items():
        parts = [yaml_load(p) for p in val.split(",")]
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


def _tags(v) -> list[str]:
    """kohya's caption_prefix/suffix text, e.g. ``"sks, 1girl"``, as the tags lorabuild puts around a caption."""
    return [t.strip() for t in str(v).split(",") if t.strip()]


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
    if name not in SAMPLER_NAMES:
        raise ValueError(f"not a sampler lorabuild has ({', '.join(SAMPLER_NAMES)})")
    return name


def _resolution(v) -> int:
    """kohya's ``512``, ``"512,768"`` or ``[512, 768]``: the side of a square of the same area."""
    sides = [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(x) for x in str(v).split(",")]
    w, h = (sides * 2)[:2]
    return int(math.sqrt(w * h))


def _resolution_note(key: str, value) -> str | None:
    sides = [int(x) for x in value] if isinstance(value, (list, tuple)) else [int(x) for x in str(value).split(",")]
    if len(sides) == 2 and sides[0] != sides[1]:
        return (f"{key} = {value!r} is not square: bucket.resolution is the side of a square of the same area, "
                f"{_resolution(value)} (buckets of every aspect ratio up to that area, as kohya's)")
    return None


# kohya key → (our dotted key, converter)
SIMPLE = {
    "pretrained_model_name_or_path": ("base_model", str),
    "vae": ("vae", str),
    # flux_train_network.py / sd3_train_network.py: the separate VAE and text encoder files (separate.py)
    "ae": ("vae", str),
    "clip_l": ("text_encoders.clip_l", str),
    "clip_g": ("text_encoders.clip_g", str),
    "t5xxl": ("text_encoders.t5xxl", str),
    "v2": ("model_type", lambda v: "sd2"),
    "v_parameterization": ("prediction_type", lambda v: "v_prediction"),
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
    "masked_loss": ("train.masked_loss", to_bool),
    "lr_scheduler": ("train.lr_scheduler", str),
    "lr_scheduler_num_cycles": ("train.lr_scheduler_num_cycles", int),
    "lr_scheduler_power": ("train.lr_scheduler_power", float),
    "max_grad_norm": ("train.max_grad_norm", float),
    "mixed_precision": ("train.mixed_precision", str),
    "fp8_base": ("train.base_precision", lambda v: "fp8" if to_bool(v) else "auto"),
    "save_every_n_epochs": ("train.save_every_n_epochs", int),
    "save_every_n_steps": ("train.save_every_n_steps", int),
    "max_train_steps": ("train.max_steps", int),
    "save_last_n_epochs": ("output.keep_last", int),
    "save_last_n_steps": ("output.keep_last", int),
    "prior_loss_weight": ("train.prior_loss_weight", float),
    "noise_offset": ("train.noise_offset", float),
    "noise_offset_random_strength": ("train.noise_offset_random_strength", to_bool),
    "adaptive_noise_scale": ("train.adaptive_noise_scale", float),
    "ip_noise_gamma": ("train.ip_noise_gamma", float),
    "ip_noise_gamma_random_strength": ("train.ip_noise_gamma_random_strength", to_bool),
    "min_timestep": ("train.min_timestep", int),
    "max_timestep": ("train.max_timestep", int),
    "scale_weight_norms": ("train.scale_weight_norms", float),
    "min_snr_gamma": ("train.min_snr_gamma", float),
    "zero_terminal_snr": ("train.zero_terminal_snr", to_bool),
    "loss_type": ("train.loss_type", str),
    "huber_c": ("train.huber_c", float),
    "clip_skip": ("textemb.clip_skip", int),
    "max_token_length": ("textemb.max_token_length", int),
    "resolution": ("bucket.resolution", _resolution),
    "min_bucket_reso": ("bucket.min_reso", int),
    "max_bucket_reso": ("bucket.max_reso", int),
    "bucket_reso_steps": ("bucket.step", int),
    "bucket_no_upscale": ("bucket.no_upscale", to_bool),
    "caption_extension": ("dataset.caption_extension", str),
    "shuffle_caption": ("captions.shuffle", to_bool),
    "keep_tokens": ("captions.keep_tokens", int),
    "keep_tokens_separator": ("captions.keep_tokens_separator", str),
    "caption_dropout_rate": ("captions.dropout", float),
    "caption_tag_dropout_rate": ("captions.tag_dropout", float),
    "caption_dropout_every_n_epochs": ("captions.dropout_every_n_epochs", int),
    "flip_aug": ("latents.flip", to_bool),
    "vae_batch_size": ("latents.batch_size", int),
    "gradient_checkpointing": ("train.gradient_checkpointing", to_bool),
    "random_crop": ("latents.random_crop", to_bool),
    "debiased_estimation_loss": ("train.debiased_estimation", to_bool),
    "multires_noise_iterations": ("train.multires_noise_iterations", int),
    "multires_noise_discount": ("train.multires_noise_discount", float),
    "caption_prefix": ("captions.prepend", lambda v: _tags(v)),
    "caption_suffix": ("captions.append", lambda v: _tags(v)),
    "enable_wildcard": ("captions.wildcards", to_bool),
    "sample_prompts": ("sample.prompt_file", str),
    "_sample_prompt_lines": ("sample.prompts", list),
    "sample_every_n_epochs": ("sample.every_n_epochs", int),
    "sample_every_n_steps": ("sample.every_n_steps", int),
    "sample_at_first": ("sample.at_first", to_bool),
    "sample_sampler": ("sample.sampler", _sampler),
    "train_data_dir": ("dataset.dirs", lambda v: [str(v)]),
    "reg_data_dir": ("dataset.reg_dirs", lambda v: [str(v)]),
}
# options that only steer kohya's own machinery, with nothing to set here
NOT_NEEDED = {"enable_bucket", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
              "cache_text_encoder_outputs_to_disk", "sdpa", "mem_eff_attn", "persistent_data_loader_workers",
              "max_data_loader_n_workers", "output_dir", "logging_dir", "log_prefix", "save_model_as",
              "lowram", "highvram", "config_file", "dataset_config", "save_state", "log_tracker_name",
              "log_with", "wandb_api_key", "no_half_vae", "full_fp16", "full_bf16", "console_log_simple",
              "save_n_epoch_ratio", "sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs", "ddp_timeout",
              "ddp_gradient_as_bucket_view", "ddp_static_graph", "skip_cache_check", "no_metadata"}
# kohya's "0 = off" (or 0 = its default): 0 leaves lorabuild's field at its own default, which is off too
ZERO_OFF = {"max_train_epochs", "max_train_steps", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
            "save_last_n_steps", "min_snr_gamma", "sample_every_n_epochs", "sample_every_n_steps", "vae_batch_size",
            "clip_skip", "max_token_length", "network_dropout", "lr_scheduler_num_cycles", "lr_scheduler_power",
            "stop_text_encoder_training", "scale_weight_norms", "adaptive_noise_scale", "rank_dropout",
            "module_dropout", "max_timestep", "min_timestep", "ip_noise_gamma", "v_pred_like_loss",
            "network_train_unet_only", "network_train_text_encoder_only", "color_aug", "face_crop_aug_range",
            "weighted_captions", "scale_v_pred_loss_like_noise_pred", "bucket_no_upscale", "v2", "v_parameterization",
            "sdxl", "xformers", "masked_loss", "alpha_mask", "random_crop", "flip_aug", "shuffle_caption",
            "gradient_checkpointing", "sample_at_first", "zero_terminal_snr", "debiased_estimation_loss",
            "caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_tag_dropout_rate", "noise_offset",
            "multires_noise_iterations", "multires_noise_discount", "keep_tokens",
            "lr_warmup_steps", "token_warmup_step", "token_warmup_min",
            "enable_wildcard"}
# the networks sd-scripts can train; lorabuild trains networks.lora (with LoCon), and LyCORIS' locon as that
# lycoris.kohya's network_args for the types lorabuild trains (lora/lyco.py), and its algo names
LYCORIS_ARGS = {"factor": ("factor", int), "decompose_both": ("decompose_both", lambda v: flag(v)),
                "use_tucker": ("use_tucker", lambda v: flag(v)), "use_scalar": ("use_scalar", lambda v: flag(v)),
                "rank_dropout_scale": ("rank_dropout_scale", lambda v: flag(v)),
                "dora_wd": ("dora_wd", lambda v: flag(v)), "constraint": ("constraint", float),
                "rescaled": ("rescaled", lambda v: flag(v)), "train_on_input": ("train_on_input", lambda v: flag(v)),
                "train_norm": ("train_norm", lambda v: flag(v))}
LYCORIS_ALGOS = {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3", "full": "full",
                 "diag-oft": "diag-oft"}


def _is_default(k2: str, v2: str) -> bool:
    """A network_args value that leaves the network as if it were not given (kohya GUIs write them all)."""
    from ..lora.lyco_options import OPTION_DEFAULTS

    try:
        if k2 in LYCORIS_ARGS:
            return LYCORIS_ARGS[k2][1](v2) == OPTION_DEFAULTS[LYCORIS_ARGS[k2][0]]
        return not float(v2 or 0)
    except ValueError:
        return False


def _lycoris_type(r: Result, algo: str, args: dict, module: str) -> str | None:
    """network.type for LyCORIS' ``algo`` (LoRA/LoCon with dora_wd is type dora); None and listed if
    lorabuild has no such network (dylora, glora, boft…)."""
    kind = LYCORIS_ALGOS.get(algo.lower())
    if kind is None:
        r.unmapped.append(f"network_args algo={algo} (lorabuild trains lora, locon, loha, lokr, dora, ia3, full and diag-oft: this "
                          "imports as a LoRA of the same dim and alpha, which is a different network)")
        for k2 in ("conv_dim", "conv_alpha"):
            if k2 in args:
                r.unmapped.append(f"network_args {k2}={args.pop(k2)} ({algo}'s convolution setting: the imported "
                                  "LoRA has none)")
        return None
    if kind in ("lora", "locon") and "dora_wd" in args:
        if flag(args.pop("dora_wd")):
            kind = "dora"
        else:
            r.off.append("network_args dora_wd")
    if kind == "locon" and "conv_dim" not in args:
        kind = "lora"  # LyCORIS' locon without conv_dim trains the Linear layers only: lorabuild's lora
    if kind not in ("lora", "locon"):  # kohya's LoRA and LoCon are lorabuild's lora (+ conv_dim): no type to write
        r.set("network.type", kind, f"network_args algo={algo}")
    else:
        r.notes.append(f"network_module {module} algo={algo}: trained as kohya's LoRA/LoCon (network.conv_dim), "
                       "saved in kohya's layout")
    return kind


NETWORK_MODULES = {"networks.lora": None, "lycoris.kohya": "lycoris", "networks.lora_flux": None, "networks.lora_sd3": None}


# kohya values that mean "nothing happens" although they are not 0
NEUTRAL = {"token_warmup_min": 1, "caption_separator": ",", "network_module": "networks.lora",
           "_script": "train_network.py"}
SCRIPTS = {"train_network.py": None, "sdxl_train_network.py": "sdxl", "flux_train_network.py": None,
           "sd3_train_network.py": "sd3"}  # FLUX.1 is known by its weights


@dataclass
class Result:
    """The project document, where each field came from, and everything that was not carried over."""

    doc: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # dotted field → the kohya option it came from
    unmapped: list = field(default_factory=list)  # "key = value (why)"
    notes: list = field(default_factory=list)
    off: list = field(default_factory=list)  # kohya options at 0/false/empty: off, as lorabuild's default
    not_needed: list = field(default_factory=list)  # kohya machinery with nothing to set here

    def set(self, dotted: str, value, source: str) -> None:
        _set(self.doc, dotted, value)
        self.sources[dotted] = source

    def get(self, dotted: str, default=None):
        node = self.doc
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        doc = doc.setdefault(p, {})
    doc[last] = value


def is_off(key: str, value) -> bool:
    if NEUTRAL.get(key) == value:
        return True
    if value in ("", None) or value == []:
        return True
    if key in ZERO_OFF and not isinstance(value, list):
        try:
            return float(value) == 0 if not isinstance(value, bool) and str(value).lower() not in ("false", "true") \
                else not to_bool(value)
        except (TypeError, ValueError):
            return False
    return False


def map_option(r: Result, key: str, value, module: str) -> None:
    """Map one kohya option (not off) onto the project, or list it."""
    if key == "bucket_reso_steps" and int(value) % 64:
        r.set("bucket.step", 64, key)
        r.notes.append(f"bucket_reso_steps = {value}: SD's UNet needs sides that divide by 64; bucket.step is 64")
    elif key in SIMPLE and key not in ("text_encoder_lr", "unet_lr"):  # those two below: a list, or 0 = off
        dotted, conv = SIMPLE[key]
        r.set(dotted, conv(value), key)
        if key == "resolution" and _resolution_note(key, value):
            r.notes.append(_resolution_note(key, value))
    elif key == "optimizer_type":
        from ..train.optimizers import KOHYA_NAMES

        name = str(value).lower().replace("_", "")
        if name not in KOHYA_NAMES:
            raise ValueError("not an optimizer lorabuild has; adamw is used")
        r.set("train.optimizer", KOHYA_NAMES[name], key)
    elif key == "optimizer_args":
        r.set("train.optimizer_args", _kv_list(value), key)
    elif key == "network_args":
        _network_args(r, value, module)
    elif key == "network_module":
        if module not in NETWORK_MODULES:
            raise ValueError("lorabuild trains kohya's networks.lora (LoRA and LoCon) only: imported as a LoRA, "
                             "which is a different network")
    elif key == "_script":
        kind = SCRIPTS.get(str(value), "?")
        if kind == "?":
            raise ValueError("lorabuild trains LoRAs for SD 1.x, 2.x, SDXL, SD 3.5 and FLUX.1 (train_network.py, "
                             "sdxl_train_network.py, sd3_train_network.py, flux_train_network.py)")
        if kind:
            r.set("model_type", kind, str(value))
    elif key in ("_ema_decay", "_ema_every_n_steps"):  # sd-scripts has no EMA: ai-toolkit's and OneTrainer's
        r.set(f"train.ema.{key[5:]}", value, key)
        r.sources.setdefault("train.ema", key)  # the YAML writes train.ema on one line: its comment
    elif key == "alpha_mask":  # kohya applies an alpha mask whenever it loads one, masked_loss or not
        r.set("train.masked_loss", True, key)
    elif key == "lr_warmup_steps":
        v = float(value)
        if 0 < v < 1:
            r.set("train.lr_warmup_ratio", v, key)
        else:
            r.set("train.lr_warmup_steps", int(v), key)
    elif key == "network_train_unet_only":
        r.set("network.train_text_encoder", False, key)
    elif key == "network_train_text_encoder_only":
        r.set("network.train_unet", False, key)
    elif key == "xformers":
        r.set("train.attention", "xformers", key)
    elif key == "sdxl":
        r.set("model_type", "sdxl", key)
    elif key in ("text_encoder_lr", "unet_lr"):
        part = "text_encoder" if key == "text_encoder_lr" else "unet"
        vals = value if isinstance(value, list) else [value]
        if float(vals[0]) == 0:  # kohya: a part with learning rate 0 does not train
            r.set(f"network.train_{part}", False, key + " = 0")
        else:
            r.set(f"train.{key}", float(vals[0]), key)
            if len(vals) > 1:
                r.set("train.text_encoder_2_lr", float(vals[1]), key + " (second value)")
    elif key in NOT_NEEDED:
        r.not_needed.append(key)
    else:
        raise ValueError("no equivalent in lorabuild")


def _network_args(r: Result, value, module: str) -> None:
    args = _raw_kv(value)
    algo = args.pop("algo", "lora" if module == "lycoris.kohya" else None)
    kind = _lycoris_type(r, algo, args, module) if algo is not None else None
    from ..lora.lyco_options import LYCO_TYPES, NOT_FOR_LYCO, OPTIONS

    from . import flow

    for k2, v2 in args.items():
        if flow.network_arg(r, k2, v2):  # FLUX.1 / SD 3.5's block selection, T5, split_qkv
            continue
        dotted = (LYCORIS_ARGS.get(k2) or NETWORK_ARGS.get(k2) or (k2,))[0]  # network_args dropout: network.dropout
        if kind in LYCO_TYPES and (dotted in NOT_FOR_LYCO or (k2 in LYCORIS_ARGS and kind not in OPTIONS[dotted][1])):
            if _is_default(k2, v2):
                r.off.append(f"network_args {k2}")
            else:  # LyCORIS takes it and does nothing with it for this algo
                r.unmapped.append(f"network_args {k2}={v2} (LyCORIS' {kind} does not use it)")
            continue
        if module == "lycoris.kohya" and k2 == "dropout":
            if float(v2 or 0):
                r.set("network.dropout", float(v2), "network_args dropout")
            else:
                r.off.append("network_args dropout")
            continue
        if k2 in LYCORIS_ARGS and kind not in LYCO_TYPES:
            r.unmapped.append(f"network_args {k2}={v2} (a LyCORIS option for its own algos; not for a LoRA)")
            continue
        if k2 not in NETWORK_ARGS and k2 not in LYCORIS_ARGS:
            r.unmapped.append(f"network_args {k2}={v2} (no equivalent in lorabuild)")
            continue
        dotted, conv = LYCORIS_ARGS.get(k2) or NETWORK_ARGS[k2]
        try:
            r.set(f"network.{dotted}", conv(v2.strip()), f"network_args {k2}")
        except ValueError:
            r.unmapped.append(f"network_args {k2}={v2} (not understood)")
        if k2 == "exclude_patterns":
            r.notes.append("network.exclude_patterns/include_patterns match the whole kohya module name "
                           "(lora_unet_…_attn2_to_k); kohya's FLUX/SD3 networks match the dotted module path: "
                           "check the patterns (lorabuild validate; a pattern matching nothing is an error)")
