"""Write the model configs lorabuild ships (lorabuild/data/configs/<arch>/): what a single-file
checkpoint needs to be read offline. No weights: each class is built on the meta device and
only its config is saved, so the files hold every field the installed diffusers/transformers
would write. Run once; the output is committed. tests/test_model_configs.py checks that they
build the published architectures (parameter counts)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

OUT = Path(__file__).resolve().parent.parent / "lorabuild" / "data" / "configs"
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             steps_offset=1, set_alpha_to_one=False)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD_UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)

ARCHS = {
    # Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5's configs)
    "sd1": dict(
        pipeline="StableDiffusionPipeline",
        unet=dict(SD_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        vae=dict(VAE, sample_size=512, scaling_factor=0.18215),
        text_encoder=("CLIPTextModel", CLIP_L),
        scheduler=(PNDMScheduler, dict(BETAS, skip_prk_steps=True, prediction_type="epsilon")),
    ),
    # Stable Diffusion 2.x, 768-v (stabilityai/stable-diffusion-2-1): OpenCLIP ViT-H text encoder
    # without its last layer (23 of 24), linear projections, v-prediction.
    "sd2": dict(
        pipeline="StableDiffusionPipeline",
        unet=dict(SD_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(VAE, sample_size=768, scaling_factor=0.18215),
        text_encoder=("CLIPTextModel", dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, hidden_act="gelu", projection_dim=512)),
        scheduler=(DDIMScheduler, dict(BETAS, clip_sample=False, prediction_type="v_prediction")),
    ),
    # Stable Diffusion XL base 1.0: two text encoders (CLIP ViT-L, OpenCLIP ViT-bigG with projection)
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        unet=dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, sample_size=128),
        vae=dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=("CLIPTextModel", CLIP_L),
        text_encoder_2=("CLIPTextModelWithProjection", dict(
            CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280)),
        scheduler=(EulerDiscreteScheduler, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                                prediction_type="epsilon")),
    ),
}


def write(arch: str, spec: dict, root: Path) -> None:
    d = root / arch
    shutil.rmtree(d, ignore_errors=True)
    with torch.device("meta"):
        UNet2DConditionModel(**spec["unet"]).save_config(d / "unet")
        AutoencoderKL(**spec["vae"]).save_config(d / "vae")
    index = {"_class_name": spec["pipeline"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    for te in ("text_encoder", "text_encoder_2"):
        if te in spec:
            cls, cfg = spec[te]
            c = CLIPTextConfig(**cfg)
            c.architectures = [cls]
            c.save_pretrained(d / te)
            index[te] = ["transformers", cls]
            index[te.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    sched_cls, sched_cfg = spec["scheduler"]
    sched_cls(**sched_cfg).save_config(d / "scheduler")
    index["scheduler"] = ["diffusers", sched_cls.__name__]
    if spec["pipeline"] == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (d / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


if __name__ == "__main__":
    for name, spec in ARCHS.items():
        write(name, spec, Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print("wrote", ", ".join(ARCHS), "to", OUT)
