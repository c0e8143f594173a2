"""Stable Diffusion 1.x: one CLIP ViT-L text encoder (768 wide, clip_skip applies), a UNet with
1×1-conv projections in its transformers, epsilon prediction, 512 px, kohya's ``lora_te``."""
from __future__ import annotations

from pathlib import Path

from .base import SD1_SCHEDULER, TOKENIZER_DIR, Family


class SD1(Family):
    name = "sd1"
    title = "SD 1.x"
    tiny_models = {"tiny-sd1": "tiny_pipeline"}
    shipped_models = ("world-sd1",)
    checkpoint_prefix = "cond_stage_model.transformer."
    cross_attention_width = 768
    base_model_version = "sd_v1"
    modelspec_arch = "stable-diffusion-v1"

    def tiny_pipeline(self):
        """A randomly initialised SD1-architecture pipeline, small enough for CPU tests.

        Real classes, real geometry: the VAE has 4 blocks (downsampling ×8, like SD's), the
        UNet has cross-attention in Transformer2D blocks with 1×1-conv proj_in/out (SD1),
        and the text encoder is a CLIP text model with the full 49408-token vocabulary.
        ``attention_head_dim=8`` means 8 heads, as in SD 1.5's own unet/config.json
        (diffusers' historical naming). Each module is seeded on its own, so changing one
        leaves the others' weights as they were.
        """
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.18215,
        )
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=5,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                projection_dim=32,
            )
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
            unet=unet,
            scheduler=DDPMScheduler(**SD1_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def load_shipped(self, folder: Path):
        """A pretrained built-in (``lorabuild/data/models/<name>``, see scripts/pretrain_world.py) as an
        SD1 pipeline in fp32: its shipped fp16 weights, lorabuild's CLIP tokenizer, SD 1.5's scheduler."""
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        load = dict(torch_dtype=torch.float32, local_files_only=True)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(str(folder / "vae"), **load),
            text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder"), **load),
            tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
            unet=UNet2DConditionModel.from_pretrained(str(folder / "unet"), **load),
            scheduler=PNDMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


FAMILY = SD1()
