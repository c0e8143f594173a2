"""SDXL: two text encoders (CLIP-L-like and OpenCLIP-bigG-like with a projection) whose penultimate
layers are joined, the second one's pooled output and the size/crop ``time_ids`` as the UNet's
added inputs, no clip_skip, kohya names in the original SGM layout (``input_blocks_N``) with
``lora_te1``/``lora_te2``, 1024 px."""
from __future__ import annotations

from .base import SD1_SCHEDULER, TOKENIZER_DIR, Family


class SDXL(Family):
    name = "sdxl"
    title = "SDXL"
    tiny_models = {"tiny-sdxl": "tiny_pipeline"}
    text_parts = ("text_encoder", "text_encoder_2")
    pooled = True
    clip_skip = False  # SDXL is trained on the penultimate layers (kohya ignores clip_skip)
    checkpoint_prefix = "conditioner.embedders.1."
    cross_attention_width = 2048
    reads_checkpoint_markers = True  # NoobAI-XL V-pred and other fine-tunes; ComfyUI reads them for SDXL only
    base_model_version = "sdxl_base_v1-0"
    modelspec_arch = "stable-diffusion-xl-v1-base"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    native_size = 1024
    block_layout = (23, 9, 3)  # 1 base, 9 input, 3 middle, 9 output, 1 out
    sgm_names = True
    unet_title = "SDXL"
    bucket_step = 32  # its UNet halves the latents twice
    pipeline_class = "StableDiffusionXLPipeline"

    def claims(self, parts: set[str], te_config: dict) -> bool:
        return "text_encoder_2" in parts

    def pads_with_bang(self, tokenizer: str) -> bool:
        return tokenizer == "tokenizer_2"

    def text_encoder_class(self, which: str) -> str:
        return "CLIPTextModelWithProjection" if which == "text_encoder_2" else "CLIPTextModel"

    def _pipeline_extras(self, load: bool = False, make: bool = False) -> dict:
        return {}  # no safety checker in SDXL's pipeline

    def make_pipeline(self, unet, vae, text_encoders: list, tokenizers: list, scheduler):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def condition(self, tokenizers: list, text_encoders: list, captions: list[str], clip_skip: int = 1,
                  max_token_length: int = 75, **options):
        """SDXL's conditioning (kohya ``get_hidden_states_sdxl``, diffusers' SDXL pipeline): both
        encoders' penultimate hidden states, without the final layer norm, joined along the
        feature axis (768 + 1280 = 2048 for the real models); and the second encoder's projected
        pooled output of the first chunk, ``[B, P]``, which the UNet's ``text_embeds`` takes.
        ``clip_skip`` does not apply."""
        import torch

        from ..precision import to_device
        from ..textenc import join_chunks, tokenize

        states, pooled = [], None
        for i, (tok, te) in enumerate(zip(tokenizers, text_encoders)):
            ids = to_device(tokenize(tok, captions, max_token_length), te.device)
            b, n, width = ids.shape
            out = te(ids.reshape(b * n, width), output_hidden_states=True)
            states.append(join_chunks(out.hidden_states[-2].reshape(b, n, width, -1)))
            if i == 1:
                pooled = out.text_embeds.reshape(b, n, -1)[:, 0]
        return torch.cat(states, dim=-1), pooled

    def added_inputs(self, pooled, time_ids: list) -> dict | None:
        """The pooled text and the size/crop ids (original size, crop top-left, target size) per sample."""
        import torch

        return {"text_embeds": pooled, "time_ids": torch.tensor(time_ids, dtype=torch.float32)}

    def prompt_arguments(self, pipe, hidden, pooled, negative: tuple | None) -> dict:
        out = {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}
        if negative is not None:
            out |= {"negative_prompt_embeds": negative[0], "negative_pooled_prompt_embeds": negative[1]}
        return out

    def encodes_empty_negative(self, pipe) -> bool:
        return not pipe.config.force_zeros_for_empty_prompt  # the pipeline makes an empty negative zeros

    def tiny_pipeline(self):
        """SDXL's architecture in miniature (as diffusers' own SDXL tests build it): two text
        encoders (CLIP-L-like; OpenCLIP-bigG-like with a projection, whose pooled output joins
        the size/crop ``time_ids`` in the UNet's ``text_time`` embedding), a UNet whose first
        level has no attention and whose deeper levels stack transformer blocks, SDXL's VAE
        scale and the Euler scheduler it ships with."""
        import torch
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        torch.manual_seed(2)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
            cross_attention_dim=72, norm_num_groups=32,
        )
        torch.manual_seed(2)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            sample_size=128, scaling_factor=0.13025, force_upcast=True,
        )
        te_cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, projection_dim=32)
        torch.manual_seed(2)
        te1 = CLIPTextModel(CLIPTextConfig(**te_cfg, pad_token_id=49407))
        torch.manual_seed(3)
        # wider than the first, as in SDXL (1280 vs 768): single-file readers tell them apart by width
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**te_cfg, "hidden_size": 40, "intermediate_size": 48},
                                                         pad_token_id=0, hidden_act="gelu"))
        sched = {k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"}
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, unet=unet,
            tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="!"),
            scheduler=EulerDiscreteScheduler(**sched, timestep_spacing="leading"),
        )


FAMILY = SDXL()
