"""OneTrainer (Nerogar) training configs and presets (JSON) → kohya's option names and a dataset config.

Read from its presets' keys (``training_method``, ``model_type``, ``lora_rank``, ``concept_file_name``…);
its concepts file (a JSON list of ``{name, path, repeats, enabled, …}``) becomes subsets, and
its sample definitions become sample prompts. What has no sd-scripts equivalent is listed.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import Source

RENAMED = {"base_model_name": "pretrained_model_name_or_path", "learning_rate": "learning_rate",
           "learning_rate_warmup_steps": "lr_warmup_steps", "learning_rate_cycles": "lr_scheduler_num_cycles",
           "epochs": "max_train_epochs", "batch_size": "train_batch_size",
           "gradient_accumulation_steps": "gradient_accumulation_steps", "text_encoder_learning_rate": "text_encoder_lr",
           "unet_learning_rate": "unet_lr", "offset_noise_weight": "noise_offset", "lora_rank": "network_dim",
           "lora_alpha": "network_alpha", "masked_training": "masked_loss",
           "rescale_noise_scheduler_to_zero_terminal_snr": "zero_terminal_snr", "force_v_prediction": "v_parameterization",
           "min_snr_gamma": "min_snr_gamma", "seed": "seed", "clip_grad_norm": "max_grad_norm"}
DTYPES = {"FLOAT_16": "fp16", "BFLOAT_16": "bf16", "FLOAT_32": "float"}
MODELS = {"STABLE_DIFFUSION_15": None, "STABLE_DIFFUSION_15_INPAINTING": None, "STABLE_DIFFUSION_20": "v2",
          "STABLE_DIFFUSION_20_BASE": "v2", "STABLE_DIFFUSION_21": "v2", "STABLE_DIFFUSION_21_BASE": "v2",
          "STABLE_DIFFUSION_XL_10_BASE": "sdxl", "STABLE_DIFFUSION_XL_10_BASE_INPAINTING": "sdxl"}
SCHEDULERS = {"CONSTANT": "constant", "LINEAR": "linear", "COSINE": "cosine", "COSINE_WITH_RESTARTS": "cosine_with_restarts",
              "COSINE_WITH_HARD_RESTARTS": "cosine_with_restarts", "POLYNOMIAL": "polynomial"}
OPTIMIZERS = {"ADAMW": "AdamW", "ADAMW_8BIT": "AdamW8bit", "LION": "Lion", "LION_8BIT": "Lion8bit", "PRODIGY": "Prodigy",
              "ADAFACTOR": "AdaFactor", "SGD": "SGD"}
# where it writes, caches, logs and backs up; the frozen weights' storage precision
NOT_THE_LORA = {"debug_mode", "debug_dir", "workspace_dir", "cache_dir", "tensorboard", "latent_caching",
                "latent_caching_epochs", "clear_cache_before_training", "train_device", "temp_device", "only_cache",
                "backup_after", "backup_after_unit", "backup_before_save", "output_model_format", "aspect_ratio_bucketing",
                "weight_dtype", "text_encoder_weight_dtype", "unet_weight_dtype", "vae_weight_dtype", "extra_model_name",
                "__version", "continue_last_backup", "tensorboard_expose", "save_after", "save_after_unit",
                "save_filename_prefix", "rolling_backup", "rolling_backup_count", "include_train_config", "dataloader_threads"}


def is_onetrainer(cfg) -> bool:
    return isinstance(cfg, dict) and "training_method" in cfg and "model_type" in cfg


def _name(v) -> str:
    return str(v.get("optimizer") if isinstance(v, dict) else v)


def from_onetrainer(cfg: dict, src: Source, root: Path) -> tuple[dict, dict | None]:
    out: dict = {}
    src.renamed = {}

    def put(option: str, value, key: str) -> None:
        out[option] = value
        src.renamed[option] = key

    for key, v in cfg.items():
        if key in RENAMED:
            put(RENAMED[key], v, key)
        elif key in NOT_THE_LORA:
            src.gui_only.append(key)
        elif key == "training_method":
            if v != "LORA":
                src.unmapped.insert(0, f"training_method = {v!r} (lorabuild trains LoRAs only)")
        elif key == "model_type":
            if v not in MODELS:
                src.unmapped.insert(0, f"model_type = {v!r} (lorabuild trains SD 1.x, 2.x and SDXL LoRAs)")
            elif MODELS[v]:
                put(MODELS[v], True, key)
        elif key in ("output_dtype", "train_dtype"):
            dtype = DTYPES.get(str(v), "?")
            put("save_precision" if key == "output_dtype" else "mixed_precision",
                dtype if key == "output_dtype" else {"float": "no"}.get(dtype, dtype), key)
        elif key == "output_model_destination":
            put("output_name", Path(str(v).replace("\\", "/")).stem, key)
            src.notes.append(f"output_model_destination {v}: lorabuild writes output/<name>/<name>.safetensors")
        elif key == "optimizer":
            put("optimizer_type", OPTIMIZERS.get(_name(v).upper(), _name(v)), key)
            extra = {k: x for k, x in v.items() if k != "optimizer" and x is not None} if isinstance(v, dict) else {}
            if extra:
                put("optimizer_args", [f"{k}={x}" for k, x in extra.items()], "optimizer (its settings)")
        elif key == "weight_decay":
            out.setdefault("optimizer_args", []).append(f"weight_decay={v}")
            src.renamed.setdefault("optimizer_args", key)
        elif key == "learning_rate_scheduler":
            put("lr_scheduler", SCHEDULERS.get(str(v), str(v)), key)
        elif key == "text_encoder_layer_skip":
            put("clip_skip", int(v) + 1, key)  # OneTrainer skips n layers; kohya counts the layer used
        elif key in ("train_text_encoder", "train_unet"):
            if v is False:
                put("network_train_unet_only" if key == "train_text_encoder" else "network_train_text_encoder_only",
                    True, key)
        elif key in ("train_text_encoder_epochs", "train_unet_epochs"):
            if int(v) < int(cfg.get("epochs", 0) or 0):
                src.unmapped.append(f"{key} = {v!r} (lorabuild trains each part for the whole run)")
        elif key == "attention_mechanism":
            if str(v).upper() == "XFORMERS":
                put("xformers", True, key)
        elif key == "resolution":
            sides = [int(x) for x in str(v).split(",") if x.strip()]
            put("resolution", max(sides), key)
            if len(sides) > 1:
                src.unmapped.append(f"resolution = {v!r} (OneTrainer trains at each; a project at one: {max(sides)})")
        elif key == "ema":
            if str(v) != "OFF":  # GPU or CPU: where OneTrainer keeps it; lorabuild keeps it beside the weights
                out["_ema_decay"] = float(cfg.get("ema_decay", 0.999))
                out["_ema_every_n_steps"] = int(cfg.get("ema_update_step_interval", 5))
                src.renamed.update(_ema_decay=f"ema = {v}, ema_decay", _ema_every_n_steps="ema_update_step_interval")
        elif key in ("ema_decay", "ema_update_step_interval"):
            continue
        elif key == "sample_after":
            _sample_every(cfg, out, src)
        elif key in ("concept_file_name", "concepts", "sample_definition_file_name", "samples", "sample_after_unit"):
            continue
        else:
            src.unmapped.append(f"{key} = {v!r} (no equivalent in lorabuild)")
    _samples(cfg, root, out, src)
    return out, _concepts(cfg, root, src)


def _sample_every(cfg: dict, out: dict, src: Source) -> None:
    unit, n = str(cfg.get("sample_after_unit", "")), cfg.get("sample_after")
    if unit == "EPOCH":
        out["sample_every_n_epochs"] = n
        src.renamed["sample_every_n_epochs"] = "sample_after"
    elif unit == "STEP":
        out["sample_every_n_steps"] = n
        src.renamed["sample_every_n_steps"] = "sample_after"
    else:
        src.unmapped.append(f"sample_after = {n} {unit} (lorabuild samples every n epochs or steps)")


def _load(cfg: dict, inline: str, file_key: str, root: Path, src: Source) -> list:
    if isinstance(cfg.get(inline), list):
        return cfg[inline]
    if not cfg.get(file_key):
        return []
    path = root / str(cfg[file_key])
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        src.unmapped.append(f"{file_key} = {cfg[file_key]!r} (cannot read {path}: {exc})")
        return []
    return items if isinstance(items, list) else []


def _samples(cfg: dict, root: Path, out: dict, src: Source) -> None:
    lines = []
    for s in _load(cfg, "samples", "sample_definition_file_name", root, src):
        if isinstance(s, dict) and s.get("enabled", True) and s.get("prompt"):
            opts = " ".join(f"--{f} {s[k]}" for k, f in (("width", "w"), ("height", "h"), ("seed", "d"),
                                                          ("diffusion_steps", "s"), ("cfg_scale", "l")) if k in s)
            neg = f" --n {s['negative_prompt']}" if s.get("negative_prompt") else ""
            lines.append(f"{s['prompt']} {opts}{neg}".strip())
    if lines:
        out["_sample_prompt_lines"] = lines
        src.renamed["_sample_prompt_lines"] = "sample definitions (prompt, width, height, seed, steps, cfg)"


def _concepts(cfg: dict, root: Path, src: Source) -> dict | None:
    subsets = []
    for c in _load(cfg, "concepts", "concept_file_name", root, src):
        if not isinstance(c, dict) or not c.get("path"):
            src.unmapped.append(f"concept {c!r} (no path)")
        elif not c.get("enabled", True):
            src.unmapped.append(f"concept {c.get('name') or c['path']!r}: disabled in OneTrainer, left out")
        else:
            repeats = c.get("repeats", 1)
            subsets.append({"image_dir": str(c["path"]), "num_repeats": max(1, round(float(repeats)))})
            if float(repeats) != round(float(repeats)):
                src.unmapped.append(f"concept {c['path']}: repeats = {repeats} (whole repeats here: "
                                    f"{subsets[-1]['num_repeats']})")
    if not subsets:
        return None
    src.renamed["[[datasets.subsets]] image_dir, num_repeats, class_tokens, is_reg"] = "concepts path, repeats"
    return {"datasets": [{"subsets": subsets}]}
