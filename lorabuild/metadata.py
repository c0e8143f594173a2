"""kohya's ``ss_*`` training metadata for the saved LoRA (sd-scripts ``train_network.py``).

Every value is a string; nested data is JSON text, as kohya writes it, so tools that
read kohya LoRAs (A1111's additional-networks, ComfyUI-Lora-Manager) find what they expect.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

from .captions import split_tags
from .trainplan import TrainPlan

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}


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
    session_id: str,
    started: float,
    finished: float,
) -> dict[str, str]:
    net, train, cap, bucket = cfg["network"], cfg["train"], cfg["captions"], cfg["bucket"]
    version_key = "sd2-v" if arch == "sd2" and prediction_type == "v_prediction" else arch
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
        "ss_gradient_checkpointing": False,
        "ss_lr_warmup_steps": train["lr_warmup_steps"],
        "ss_lr_scheduler": train["lr_scheduler"],
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={train['weight_decay']})",
        "ss_max_grad_norm": train["max_grad_norm"],
        "ss_network_module": "networks.lora",
        "ss_network_dim": net["dim"],
        "ss_network_alpha": net["alpha"],
        "ss_network_dropout": None,
        "ss_network_train_unet_only": not net["train_text_encoder"],
        "ss_network_train_text_encoder_only": not net["train_unet"],
        "ss_mixed_precision": train["mixed_precision"],
        "ss_full_fp16": False,
        "ss_v2": arch == "sd2",
        "ss_base_model_version": BASE_MODEL_VERSION[version_key],
        "ss_clip_skip": cfg["textemb"]["clip_skip"],
        "ss_max_token_length": None if cfg["textemb"]["max_token_length"] == 75 else cfg["textemb"]["max_token_length"],
        "ss_cache_latents": not cfg["latents"]["random_crop"],
        "ss_cache_text_encoder_outputs": textemb_cached,
        "ss_seed": train["seed"],
        "ss_noise_offset": train["noise_offset"] or None,
        "ss_min_snr_gamma": train["min_snr_gamma"],
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
    }
    return {k: str(v) for k, v in md.items()}
