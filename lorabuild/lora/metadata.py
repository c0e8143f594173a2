"""kohya's ``ss_*`` training metadata for the saved LoRA (sd-scripts ``train_network.py``).

Every value is a string; nested data is JSON text, as kohya writes it, so tools that
read kohya LoRAs (A1111's additional-networks, ComfyUI-Lora-Manager) find what they expect.
"""
from __future__ import annotations

import datetime
import json
from collections import Counter
from collections.abc import Mapping

from ..captions import split_tags
from ..families import family
from ..train.plan import TrainPlan
from .flow_select import BLOCKS

# ss_base_model_version, ss_v2 and Stability AI's ModelSpec architecture ids (kohya
# library/sai_model_spec.py) are each model family's (lorabuild/families/)
# what kohya keeps with --no_metadata (train_network.py minimum_keys), plus the ModelSpec keys
MINIMAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
# class paths for ss_optimizer, as kohya writes it ("module.Class(args)")
OPTIMIZER_CLASS = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                   "lion": "lion_pytorch.lion_pytorch.Lion", "lion8bit": "bitsandbytes.optim.lion.Lion8bit",
                   "prodigy": "prodigyopt.prodigy.Prodigy", "adafactor": "transformers.optimization.Adafactor",
                   "sgd": "torch.optim.sgd.SGD"}


def tag_frequency(captions: Mapping[str, str], folder_of: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """{concept folder name: {tag: number of images whose caption has it}} (kohya ``ss_tag_frequency``)."""
    out: dict[str, Counter] = {}
    for image_id, caption in captions.items():
        out.setdefault(folder_of[image_id], Counter()).update(set(split_tags(caption)))
    return {folder: dict(sorted(c.items())) for folder, c in sorted(out.items())}


def kohya_metadata(
    *,
    cfg: Mapping,
    output_name: str,
    arch: str,
    prediction_type: str,
    plan: TrainPlan,
    epoch: int,
    step: int,
    dataset_dirs: Mapping[str, Mapping[str, int]],
    tag_freq: Mapping,
    bucket_info: Mapping,
    textemb_cached: bool,
    model_name: str,
    model_hash: str,
    model_source: Mapping | None = None,
    session_id: str,
    started: float,
    finished: float,
    datasets: list | None = None,
) -> dict[str, str]:
    """``datasets``: kohya's ``ss_datasets`` (one per resolution) of a multi-resolution run."""
    net, train, cap, bucket = cfg["network"], cfg["train"], cfg["captions"], cfg["bucket"]
    if datasets:  # ss_resolution and modelspec name the largest; ss_datasets has each (as kohya's dataset configs)
        bucket = {**bucket, "resolution": max(d["resolution"][0] for d in datasets)}
    fam = family(arch)
    md = {
        "ss_session_id": session_id,
        "ss_training_started_at": started,
        "ss_training_finished_at": finished,
        "ss_output_name": output_name,
        "ss_learning_rate": train["learning_rate"],
        "ss_unet_lr": train["unet_lr"] or train["learning_rate"],
        "ss_text_encoder_lr": train["text_encoder_lr"] or train["learning_rate"],
        "ss_num_train_images": plan.samples_per_epoch - plan.reg_samples_per_epoch,
        "ss_num_reg_images": plan.reg_samples_per_epoch,
        "ss_num_batches_per_epoch": plan.batches_per_epoch,
        "ss_num_epochs": plan.epochs,
        "ss_epoch": epoch,
        "ss_steps": step,
        "ss_max_train_steps": plan.total_steps,
        "ss_batch_size_per_device": plan.batch_size,
        "ss_total_batch_size": plan.effective_batch,
        "ss_gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "ss_gradient_checkpointing": bool(train["gradient_checkpointing"]),
        "ss_lr_warmup_steps": train["lr_warmup_steps"],
        "ss_lr_scheduler": train["lr_scheduler"],
        "ss_optimizer": _optimizer_text(train),
        "ss_max_grad_norm": train["max_grad_norm"],
        "ss_network_module": "lycoris.kohya" if _lycoris(net) else fam.network_module,
        "ss_network_dim": net["dim"],
        "ss_network_alpha": net["alpha"],
        "ss_network_dropout": net["dropout"] or None,
        "ss_network_args": json.dumps(args) if (args := network_args(net, arch)) else None,
        "ss_network_train_unet_only": not net["train_text_encoder"],
        "ss_network_train_text_encoder_only": not net["train_unet"],
        "ss_mixed_precision": train["mixed_precision"],
        "ss_full_fp16": False,
        **({"ss_fp8_base": True} if train.get("base_precision") == "fp8" else {}),
        "ss_v2": fam.ss_v2,
        "ss_base_model_version": fam.metadata_version(prediction_type),
        "ss_clip_skip": cfg["textemb"]["clip_skip"],
        "ss_max_token_length": None if cfg["textemb"]["max_token_length"] == 75 else cfg["textemb"]["max_token_length"],
        "ss_cache_latents": not cfg["latents"]["random_crop"],
        "ss_cache_text_encoder_outputs": textemb_cached,
        "ss_seed": train["seed"],
        "ss_noise_offset": train["noise_offset"] or None,
        "ss_min_snr_gamma": train["min_snr_gamma"],
        "ss_zero_terminal_snr": bool(train.get("zero_terminal_snr")),
        "ss_multires_noise_iterations": train["multires_noise_iterations"] or None,
        "ss_multires_noise_discount": train["multires_noise_discount"],
        "ss_debiased_estimation": bool(train["debiased_estimation"]),
        **_set_only(train, "min_timestep", "max_timestep", "ip_noise_gamma", "ip_noise_gamma_random_strength",
                    "noise_offset_random_strength", "adaptive_noise_scale", "scale_weight_norms"),
        "ss_loss_type": train["loss_type"],
        "ss_huber_c": train["huber_c"],
        "ss_prior_loss_weight": train["prior_loss_weight"],
        "ss_training_comment": cfg["output"]["comment"],
        "ss_caption_dropout_rate": cap["dropout"],
        "ss_caption_tag_dropout_rate": cap["tag_dropout"],
        "ss_caption_dropout_every_n_epochs": cap["dropout_every_n_epochs"],
        "ss_shuffle_caption": cap["shuffle"],
        "ss_keep_tokens": cap["keep_tokens"],
        "ss_flip_aug": cfg["latents"]["flip"],
        "ss_color_aug": False,
        "ss_random_crop": cfg["latents"]["random_crop"],
        "ss_enable_bucket": True,
        "ss_bucket_no_upscale": bucket["no_upscale"],
        "ss_min_bucket_reso": bucket["min_reso"],
        "ss_max_bucket_reso": bucket["max_reso"],
        "ss_resolution": f"({bucket['resolution']}, {bucket['resolution']})",
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps(tag_freq),
        "ss_sd_model_name": model_name,
        "ss_new_sd_model_hash": model_hash,
        "ss_training_tool": "lorabuild",
        **({"ss_datasets": json.dumps(datasets)} if datasets else {}),
        **fam.metadata_extra(cfg),  # a flow model's objective (kohya's names)
    }
    src = model_source or {}
    if src.get("sha256"):  # a single file: A1111's hashes of it, as kohya writes them
        md.update(ss_new_sd_model_hash=src["sha256"], ss_sd_model_hash=src["legacy_hash"])
    if src.get("vae"):
        md["ss_vae_name"] = src["vae"].replace("\\", "/").rsplit("/", 1)[-1]
        if src.get("vae_sha256"):
            md.update(ss_new_vae_hash=src["vae_sha256"], ss_vae_hash=src["vae_legacy_hash"])
    resolution = bucket["resolution"]
    md.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": fam.modelspec_architecture(prediction_type) + "/lora",
        "modelspec.implementation": fam.modelspec_implementation,
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.encoder_layer": str(cfg["textemb"]["clip_skip"]),
        "modelspec.implementation_version": "lorabuild",
    })
    md = {k: str(v) for k, v in md.items() if not (k == "ss_network_args" and v is None)}
    return apply_mode(md, cfg["output"].get("metadata", "full"))


def _lycoris(net: Mapping) -> bool:
    from .lyco_options import LYCO_TYPES

    return net.get("type") in LYCO_TYPES


def network_args(net: Mapping, arch: str | None = None) -> dict[str, str]:
    """kohya's ``ss_network_args``: the network options beyond dim/alpha, as strings. ``arch``: the
    model family (FLUX.1 and SD 3.5 state ``split_qkv`` either way)."""
    out = {}
    if _lycoris(net):
        from .lyco_options import algo_args

        out.update(algo_args(net))
    if net.get("conv_dim"):
        out["conv_dim"] = str(net["conv_dim"])
        out["conv_alpha"] = str(net["conv_alpha"] if net.get("conv_alpha") is not None else net["conv_dim"])
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "rank_dropout",
                "module_dropout"):
        if net.get(key):
            out[key] = str(net[key])
    # block-wise options as kohya's command line gives them: comma-separated, or a preset name
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                "down_lr_weight", "mid_lr_weight", "up_lr_weight"):
        v = net.get(key)
        if v is not None:
            out[key] = v if isinstance(v, str) else ",".join(str(x) for x in v)
    if any(net.get(k) is not None for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")) \
            and net.get("block_lr_zero_threshold"):
        out["block_lr_zero_threshold"] = str(net["block_lr_zero_threshold"])
    # kohya reads these with ast.literal_eval: a Python list literal
    for key in ("exclude_patterns", "include_patterns"):
        if net.get(key):
            out[key] = repr(list(net[key]))
    # FLUX.1 / SD 3.5 (kohya networks.lora_flux, lora_sd3): as kohya's command line gives them
    for key in ("train_double_block_indices", "train_single_block_indices", "train_blocks", "train_block_indices"):
        if net.get(key) is not None:
            out[key] = str(net[key])
    if net.get("train_t5xxl"):
        out["train_t5xxl"] = "True"
    for key in ("in_dims", "emb_dims"):  # kohya parses "[4,0,0,0,4]" (its brackets optional)
        if net.get(key) is not None:
            out[key] = "[" + ",".join(str(d) for d in net[key]) + "]"
    # kohya (networks/lora_flux.py, lora_sd3.py) reads a missing split_qkv as False, so a flow model's file
    # says which it is: False, one LoRA per fused layer; True, lorabuild's default, the parts' own LoRAs.
    # Metadata is in no key: only files written from now on say it.
    if net.get("split_qkv") is False or arch in BLOCKS:
        out["split_qkv"] = str(net.get("split_qkv") is not False)
    for key, default in (("unet_target_modules", ["Transformer2DModel"]),
                         ("text_encoder_target_modules", ["CLIPAttention", "CLIPMLP"])):
        if net.get(key) and list(net[key]) != default:  # no kohya equivalent; recorded so the file says how it was made
            out[key] = ",".join(net[key])
    return out


def _set_only(train: Mapping, *keys: str) -> dict:
    """``ss_<key>`` for the train options added later, only where set (kohya writes them always; a
    LoRA trained without them keeps the metadata it had)."""
    return {f"ss_{k}": train[k] for k in keys if train.get(k) not in (None, False)}


def _optimizer_text(train: Mapping) -> str:
    args = {"weight_decay": train["weight_decay"], **(train.get("optimizer_args") or {})}
    name = train.get("optimizer", "adamw")
    return f"{OPTIMIZER_CLASS[name]}({','.join(f'{k}={v}' for k, v in args.items())})"


def apply_mode(md: dict[str, str], mode: str) -> dict[str, str]:
    """``full``: everything; ``public``: no local paths or folder names (safe to share);
    ``minimal``: kohya's minimum set (its ``--no_metadata``) and the ModelSpec keys."""
    if mode == "minimal":
        return {k: v for k, v in md.items() if k in MINIMAL_KEYS or k.startswith("modelspec.")}
    if mode == "public":
        md = dict(md)
        renames: dict[str, str] = {}
        for key in ("ss_dataset_dirs", "ss_tag_frequency"):
            if key in md:
                data = json.loads(md[key])
                for i, folder in enumerate(sorted(data), 1):
                    renames.setdefault(folder, f"dataset_{i}")
                md[key] = json.dumps({renames[f]: v for f, v in data.items()})
        md.pop("ss_sd_model_name", None)
        md.pop("ss_vae_name", None)
        md.pop("ss_training_comment", None)
    return md


def lora_hashes(tensors: Mapping, metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash``: the hashes A1111's additional-networks indexes a
    LoRA by, precomputed as kohya does: the file serialised with its ``ss_*`` metadata only, then
    sha256 of everything after the header, and sha256 of the 64 KiB at offset 1 MiB (8 hex)."""
    import hashlib

    from safetensors.torch import save

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(blob[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(blob[header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}
