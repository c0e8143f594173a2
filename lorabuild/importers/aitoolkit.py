"""ai-toolkit (ostris) training configs → kohya's option names and a dataset config.

An ai-toolkit job is ``config: {name, process: [{type: sd_trainer, network, save, datasets,
train, model, sample}]}``. Its settings are renamed to the sd-scripts options that mean the
same, so the kohya importer maps them (and comments each field with its ai-toolkit name);
what has no sd-scripts equivalent is listed. Most of its examples train FLUX or other
transformer models, which lorabuild does not: that is said first.
"""
from __future__ import annotations

from .common import Source

NETWORK = {"linear": "network_dim", "linear_alpha": "network_alpha"}
TRAIN = {"batch_size": "train_batch_size", "steps": "max_train_steps", "lr": "learning_rate",
         "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
         "gradient_checkpointing": "gradient_checkpointing", "optimizer": "optimizer_type", "lr_scheduler": "lr_scheduler",
         "unet_lr": "unet_lr", "text_encoder_lr": "text_encoder_lr", "min_snr_gamma": "min_snr_gamma",
         "noise_offset": "noise_offset", "max_grad_norm": "max_grad_norm"}
SAVE = {"save_every": "save_every_n_steps", "max_step_saves_to_keep": "save_last_n_steps"}
PRECISION = {"float16": "fp16", "fp16": "fp16", "bf16": "bf16", "bfloat16": "bf16", "float32": "float", "fp32": "float"}
OTHER_ARCHS = ("is_flux", "is_v3", "is_pixart", "is_auraflow", "is_lumina2", "is_ssd", "is_vega")
NOT_THE_LORA = {"training_folder", "device", "performance_log_every", "push_to_hub", "hf_repo_id", "hf_private",
                "cache_latents_to_disk", "cache_latents", "low_vram", "meta", "log_every", "logging"}


def is_aitoolkit(cfg) -> bool:
    process = cfg.get("config", {}).get("process") if isinstance(cfg, dict) and isinstance(cfg.get("config"), dict) else None
    return isinstance(process, list) and bool(process) and isinstance(process[0], dict) and "type" in process[0]


def _section(p: dict, name: str, src: Source) -> dict:
    value = p.get(name, {})
    if not isinstance(value, dict):
        src.unmapped.append(f"{name} = {value!r} (not a mapping)")
        return {}
    return value


def from_aitoolkit(cfg: dict, src: Source) -> tuple[dict, dict | None]:
    """(kohya options, dataset config) of an ai-toolkit job; ``src`` collects the rest."""
    job = cfg["config"]
    p, out = job["process"][0], {}
    src.unmapped += [f"process {i}: type {q.get('type')!r} (one project per training process: import it "
                     "separately)" for i, q in enumerate(job["process"][1:], 1) if isinstance(q, dict)]
    src.renamed = {}
    if job.get("name"):
        out["output_name"] = str(job["name"])
        src.renamed["output_name"] = "config.name"

    def take(section: str, table: dict, values: dict) -> None:
        for k, v in values.items():
            if k in table:
                out[table[k]] = v
                src.renamed[table[k]] = f"{section}.{k}"
            elif k in NOT_THE_LORA:
                src.gui_only.append(f"{section}.{k}")
            else:
                src.unmapped.append(f"{section}.{k} = {v!r} (no equivalent in lorabuild)")

    net = dict(_section(p, "network", src))
    kind = str(net.pop("type", "lora")).lower()
    if kind == "lokr":  # LyCORIS' LoKr, as kohya's GUIs name it: lycoris.kohya with algo=lokr
        out["network_module"] = "lycoris.kohya"
        out.setdefault("network_args", []).append("algo=lokr")
        if "lokr_factor" in net:
            out["network_args"].append(f"factor={net.pop('lokr_factor')}")
        src.renamed["network_module"] = "network.type"
        if net.pop("lokr_full_rank", False):
            src.unmapped.append("network.lokr_full_rank = True (lorabuild's lokr factors its second matrix at "
                                "network.dim: a smaller network than ai-toolkit's full-rank one)")
    elif kind not in ("lora", "locon"):
        src.unmapped.append(f"network.type = {kind!r} (lorabuild trains LoRA, LoCon and LoKr from ai-toolkit: "
                            "imported as a LoRA)")
    for k in ("conv", "conv_alpha"):
        if k in net:
            out.setdefault("network_args", []).append(f"{'conv_dim' if k == 'conv' else k}={net.pop(k)}")
    take("network", NETWORK, net)
    save = dict(_section(p, "save", src))
    if "dtype" in save:
        out["save_precision"] = PRECISION.get(str(save.pop("dtype")), "?")
        src.renamed["save_precision"] = "save.dtype"
    take("save", SAVE, save)
    train = dict(_section(p, "train", src))
    _train(train, out, src)
    take("train", TRAIN, train)
    model = dict(_section(p, "model", src))
    _model(model, out, src)
    take("model", {}, model)
    _sample(_section(p, "sample", src), out, src)
    if p.get("trigger_word"):
        out["caption_prefix"] = str(p["trigger_word"])
        src.renamed["caption_prefix"] = "trigger_word"
        src.notes.append("trigger_word: ai-toolkit adds it to captions that lack it; captions.prepend puts it "
                         "before every caption ([trigger] inside a caption is not replaced)")
    for k, v in p.items():
        if k not in ("type", "network", "save", "train", "model", "sample", "datasets", "trigger_word"):
            (src.gui_only.append(k) if k in NOT_THE_LORA else
             src.unmapped.append(f"{k} = {v!r} (no equivalent in lorabuild)"))
    return out, _datasets(p.get("datasets", []), src)


def _train(train: dict, out: dict, src: Source) -> None:
    if "dtype" in train:
        dtype = str(train.pop("dtype"))
        out["mixed_precision"] = {"float32": "no", "fp32": "no"}.get(dtype, PRECISION.get(dtype, dtype))
        src.renamed["mixed_precision"] = "train.dtype"
    # ai-toolkit trains the text encoder only when asked; sd-scripts by default
    if not train.pop("train_text_encoder", False):
        out["network_train_unet_only"] = True
        src.renamed["network_train_unet_only"] = "train.train_text_encoder (false)"
    if train.pop("train_unet", True) is False:
        out["network_train_text_encoder_only"] = True
    ema = train.pop("ema_config", None)
    if isinstance(ema, dict) and ema.get("use_ema"):
        out["_ema_decay"] = float(ema.get("ema_decay", 0.99))  # ai-toolkit's default decay
        src.renamed["_ema_decay"] = "train.ema_config"
    elif ema is not None and not isinstance(ema, dict):
        src.unmapped.append(f"train.ema_config = {ema!r} (not a mapping)")
    if isinstance(train.get("optimizer_params"), dict):
        out["optimizer_args"] = [f"{k}={v}" for k, v in train.pop("optimizer_params").items()]
        src.renamed["optimizer_args"] = "train.optimizer_params"
    if train.get("noise_scheduler") in ("ddpm", "euler"):
        src.gui_only.append(f"train.noise_scheduler ({train.pop('noise_scheduler')}: the model's own)")
    if train.get("skip_first_sample") is False or "skip_first_sample" not in train:
        out["sample_at_first"] = True  # ai-toolkit samples the base model unless told not to
        src.renamed["sample_at_first"] = "train.skip_first_sample (unset)"
    train.pop("skip_first_sample", None)


def _model(model: dict, out: dict, src: Source) -> None:
    if "name_or_path" in model:
        out["pretrained_model_name_or_path"] = str(model.pop("name_or_path"))
        src.renamed["pretrained_model_name_or_path"] = "model.name_or_path"
    for flag, option in (("is_xl", "sdxl"), ("is_v2", "v2"), ("is_v_pred", "v_parameterization")):
        if model.pop(flag, False):
            out[option] = True
            src.renamed[option] = f"model.{flag}"
    for arch in OTHER_ARCHS:
        if model.get(arch):
            src.unmapped.insert(0, f"model.{arch} = true (lorabuild trains SD 1.x, 2.x and SDXL LoRAs; this is "
                                   "another architecture, so the project will not train this model)")
            model.pop(arch)


def _sample(sample: dict, out: dict, src: Source) -> None:
    opts = " ".join(f"--{flag} {sample[k]}" for k, flag in (("width", "w"), ("height", "h"), ("sample_steps", "s"),
                                                            ("guidance_scale", "l"), ("seed", "d")) if k in sample)
    if sample.get("neg"):
        opts += f" --n {sample['neg']}"
    prompts = [str(x) for x in sample.get("prompts", [])]
    if prompts:
        out["_sample_prompt_lines"] = [f"{x} {opts}".strip() for x in prompts]
        src.renamed["_sample_prompt_lines"] = "sample.prompts (with width, height, sample_steps, guidance_scale, seed)"
    if sample.get("sample_every"):
        out["sample_every_n_steps"] = sample["sample_every"]
        src.renamed["sample_every_n_steps"] = "sample.sample_every"
    if sample.get("sampler"):
        out["sample_sampler"] = sample["sampler"]
        src.renamed["sample_sampler"] = "sample.sampler"
    for k, v in sample.items():
        if k not in ("width", "height", "sample_steps", "guidance_scale", "seed", "neg", "prompts", "sample_every",
                     "sampler") and not (k == "sample_start_step" and not v):
            src.unmapped.append(f"sample.{k} = {v!r} (no equivalent in lorabuild)")


def _datasets(datasets, src: Source) -> dict | None:
    out = []
    for d in datasets if isinstance(datasets, list) else []:
        if not isinstance(d, dict) or "folder_path" not in d:
            src.unmapped.append(f"datasets entry {d!r} (no folder_path)")
            continue
        sub = {"image_dir": str(d["folder_path"]), "num_repeats": d.get("num_repeats", 1)}
        entry: dict = {"subsets": [sub]}
        res = d.get("resolution")
        many = []  # ai-toolkit trains the folder at each resolution: one kohya dataset each (lorabuild.multires)
        if isinstance(res, list) and res:
            entry["resolution"] = res[0]
            many = [{**entry, "resolution": r} for r in res[1:]]
        elif res:
            entry["resolution"] = res
        for k, kohya in (("caption_dropout_rate", "caption_dropout_rate"), ("shuffle_tokens", "shuffle_caption"),
                         ("is_reg", "is_reg"), ("keep_tokens", "keep_tokens")):
            if k in d:
                sub[kohya] = d[k]
        if d.get("caption_ext"):
            sub["caption_extension"] = "." + str(d["caption_ext"]).lstrip(".")
        for k, v in d.items():
            if k in ("folder_path", "num_repeats", "resolution", "caption_dropout_rate", "shuffle_tokens", "is_reg",
                     "keep_tokens", "caption_ext"):
                continue
            (src.gui_only.append(f"datasets.{k}") if k in NOT_THE_LORA else
             src.unmapped.append(f"datasets {d['folder_path']}: {k} = {v!r} (no equivalent in lorabuild)"))
        out += [entry] + many
    src.renamed["[[datasets.subsets]] image_dir, num_repeats, class_tokens, is_reg"] = "datasets folder_path, num_repeats"
    src.renamed["[[datasets]] resolution"] = "datasets resolution"
    return {"datasets": out} if out else None
